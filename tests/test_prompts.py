"""`<cls>` token rule, placement helper and prompt truncation."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoTokenizer, T5EncoderModel

from sdvgen_core.errors import SDVGenError
from sdvgen_core.prompts import CLS_TOKEN, add_cls_token, encode_prompts, insert_cls


def load_text_side(model_dir):
    return AutoTokenizer.from_pretrained(model_dir / "tokenizer"), T5EncoderModel.from_pretrained(model_dir / "text_encoder")


def test_tokenizer_shorter_than_table_uses_existing_row(tiny_model_dir):
    tokenizer, encoder = load_text_side(tiny_model_dir)
    old_length = len(tokenizer)
    table = encoder.get_input_embeddings().weight.detach().clone()
    assert table.shape[0] == old_length + 28  # like CogVideoX: 32100 tokens, 32128 rows

    info = add_cls_token(tokenizer, encoder)
    assert info.token_id == old_length and info.row == "existing"
    assert tokenizer.convert_tokens_to_ids(CLS_TOKEN) == old_length
    after = encoder.get_input_embeddings().weight
    assert after.shape == table.shape
    torch.testing.assert_close(after, table, rtol=0, atol=0)  # nothing new, random or mean-initialised
    ids = tokenizer("An <cls> armchair").input_ids
    assert ids.count(old_length) == 1
    assert add_cls_token(tokenizer, encoder) == info  # idempotent
    assert len(tokenizer) == old_length + 1


def test_cls_embedding_is_the_checkpoint_row(tiny_model_dir):
    tokenizer, encoder = load_text_side(tiny_model_dir)
    info = add_cls_token(tokenizer, encoder)
    ids = tokenizer("<cls> a dog runs", return_tensors="pt").input_ids
    position = ids[0].tolist().index(info.token_id)
    embedded = encoder.get_input_embeddings()(ids)[0, position]
    reloaded = T5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder").get_input_embeddings().weight
    torch.testing.assert_close(embedded, reloaded[info.token_id], rtol=0, atol=0)


def test_full_table_gets_one_deterministic_row(full_table_model_dir):
    tokenizer, encoder = load_text_side(full_table_model_dir)
    old_length = len(tokenizer)
    table = encoder.get_input_embeddings().weight.detach().clone()
    assert table.shape[0] == old_length

    info = add_cls_token(tokenizer, encoder)
    assert info.token_id == old_length and info.row == "added-mean"
    after = encoder.get_input_embeddings().weight.detach()
    assert after.shape[0] == old_length + 1
    torch.testing.assert_close(after[:old_length], table, rtol=0, atol=0)
    torch.testing.assert_close(after[old_length], table.mean(dim=0))
    assert info.as_metadata()["sdvgen.cls_row"] == "added-mean"

    tokenizer2, encoder2 = load_text_side(full_table_model_dir)
    add_cls_token(tokenizer2, encoder2)
    torch.testing.assert_close(encoder2.get_input_embeddings().weight, after, rtol=0, atol=0)


@pytest.mark.parametrize(
    "prompt, subject, expected",
    [
        ("An armchair in the living room", "armchair", "An <cls> armchair in the living room"),
        ("A pig chases a ball", None, "<cls> A pig chases a ball"),
        ("A pig chases a ball", "", "<cls> A pig chases a ball"),
        ("The Dog runs; the dog sleeps", "dog", "The <cls> Dog runs; the dog sleeps"),
        ("a catalog and a cat", "cat", "a catalog and a <cls> cat"),
        ("An <cls> armchair", "armchair", "An <cls> armchair"),
        ("a teddy bear waves", "teddy bear", "a <cls> teddy bear waves"),
    ],
)
def test_insert_cls(prompt, subject, expected):
    assert insert_cls(prompt, subject) == expected


def test_insert_cls_subject_missing():
    with pytest.raises(SDVGenError, match="'robot' does not occur in the prompt"):
        insert_cls("a dog runs", "robot")


def test_long_prompt_is_truncated_with_warning(tiny_model_dir, caplog):
    tokenizer, encoder = load_text_side(tiny_model_dir)
    long_prompt = " ".join(["the dog runs on the beach"] * 60) + " then a kettle sleeps"
    with caplog.at_level(logging.WARNING, logger="sdvgen_core.prompts"):
        embeds = encode_prompts(tokenizer, encoder, [long_prompt, "a cat"], "cpu", torch.float32)
    assert embeds.shape == (2, 226, 32)
    messages = [r.getMessage() for r in caplog.records if r.name == "sdvgen_core.prompts"]
    assert len(messages) == 1  # only the long prompt
    assert "only the first 226 are used" in messages[0] and "then a kettle sleeps" in messages[0]
