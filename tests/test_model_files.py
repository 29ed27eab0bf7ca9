"""Broken model folders are refused with one line naming the file, before any weights load (issue 8, class 7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sdvgen_core.errors import ModelLoadError
from sdvgen_core.pipeline import SDVGenPipeline

LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 123456789\n".format("0" * 64)


def edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


BREAKAGES = {
    "tokenizer without its vocabulary": (
        lambda root: (root / "tokenizer" / "spiece.model").unlink(),
        r"tokenizer folder .* has no vocabulary file .*spiece.model",
    ),
    "LFS pointer for the transformer weights": (
        lambda root: (root / "transformer" / "diffusion_pytorch_model.safetensors").write_text(LFS_POINTER),
        r"diffusion_pytorch_model.safetensors' is a Git-LFS pointer, not the file itself; run `git lfs pull`",
    ),
    "LFS pointer for the tokenizer vocabulary": (
        lambda root: (root / "tokenizer" / "spiece.model").write_text(LFS_POINTER),
        r"tokenizer file .*spiece.model' is a Git-LFS pointer",
    ),
    "transformer config from another model": (
        lambda root: edit_json(root / "transformer" / "config.json", attention_head_dim=8),
        r"weight '.*' has shape .* but .*transformer/config.json' implies .*different models",
    ),
    "text encoder config from another model": (
        lambda root: edit_json(root / "text_encoder" / "config.json", d_ff=48),
        r"text_encoder.*weight '.*wi_0.weight' has shape \(64, 32\) but .* implies \(48, 32\)",
    ),
    "unreadable scheduler config": (
        lambda root: (root / "scheduler" / "scheduler_config.json").write_text("{'beta_start': 0.00085,"),
        r"scheduler_config.json' is not valid JSON",
    ),
    "unreadable tokenizer config": (
        lambda root: (root / "tokenizer" / "tokenizer_config.json").write_bytes(b"\xff\xfe{"),
        r"tokenizer_config.json' is not valid JSON",
    ),
    "text encoder table of another size": (
        lambda root: edit_json(root / "text_encoder" / "config.json", vocab_size=150),
        r"weight 'shared.weight' has shape \(\d+, 32\) but .* implies \(150, 32\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_broken_folder_is_refused_before_weights_load(tiny_model_dir, tmp_path, monkeypatch, case):
    breakage, message = BREAKAGES[case]
    root = tmp_path / "model"
    shutil.copytree(tiny_model_dir, root)
    breakage(root)

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the folder was refused")

    monkeypatch.setattr("sdvgen_core.pipeline.SDVGenTransformer3DModel.from_pretrained", no_load)
    monkeypatch.setattr("sdvgen_core.pipeline.T5EncoderModel.from_pretrained", no_load)
    with pytest.raises(ModelLoadError, match=message) as error:
        SDVGenPipeline.from_model_dir(root, dtype="fp32")
    assert "\n" not in str(error.value)


def test_tokenizer_that_maps_words_to_unk_is_refused(tiny_model_dir, tmp_path):
    """A vocabulary that loads but knows no letters (a sentencepiece model trained on digits only)."""
    import io

    import sentencepiece as spm

    root = tmp_path / "model"
    shutil.copytree(tiny_model_dir, root)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["0123 4567 89", "9876 5432 10", "1357 2468 0"] * 10), model_writer=model,
        vocab_size=20, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    (root / "tokenizer" / "spiece.model").write_bytes(model.getvalue())
    with pytest.raises(ModelLoadError, match=r"turns the plain words .* into <unk>"):
        SDVGenPipeline.from_model_dir(root, dtype="fp32")


def test_tokenizer_longer_than_the_text_encoder_table_is_refused(tiny_model_dir, full_table_model_dir, tmp_path):
    """Tokenizer and table mismatched by more than the one <cls> row: refused after the (small) T5 load."""
    from transformers import AutoTokenizer

    root = tmp_path / "model"
    shutil.copytree(full_table_model_dir, root)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    tokenizer.save_pretrained(root / "tokenizer")
    with pytest.raises(ModelLoadError, match=r"has \d+ tokens but the text encoder only \d+ embedding rows"):
        SDVGenPipeline.from_model_dir(root, dtype="fp32")
