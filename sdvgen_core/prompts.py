"""`<cls>` prompts and T5 prompt encoding (spec: "The `<cls>` token").

The authors' release adds `<cls>` as an additional special token, so its id is the tokenizer's old
length (32100 for CogVideoX), then resizes T5's 32128-row table to the new length: row 32100 of the
checkpoint survives untouched and *is* the `<cls>` embedding. We reproduce that without shrinking the
table. Only a tokenizer that already fills the table forces a new row, which is then the mean of the
existing rows (deterministic) and recorded in `ClsTokenInfo`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, T5EncoderModel

from .errors import SDVGenError

logger = logging.getLogger(__name__)

CLS_TOKEN = "<cls>"
MAX_TEXT_TOKENS = 226


@dataclass(frozen=True)
class ClsTokenInfo:
    """How `<cls>` was wired into a tokenizer / text encoder pair."""

    token_id: int
    row: str  # "existing": the checkpoint's unused row; "added-mean": appended, mean of the old rows

    def as_metadata(self) -> dict[str, str]:
        return {"sdvgen.cls_token": CLS_TOKEN, "sdvgen.cls_token_id": str(self.token_id), "sdvgen.cls_row": self.row}


def add_cls_token(tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel) -> ClsTokenInfo:
    """Register `<cls>` with id = old tokenizer length and make sure the encoder (T5 or UMT5) has a row for it.

    Idempotent: a tokenizer that already knows `<cls>` keeps its id.
    """
    vocab = tokenizer.get_vocab()
    embeddings = text_encoder.get_input_embeddings()
    if CLS_TOKEN in vocab:
        token_id = vocab[CLS_TOKEN]
    else:
        token_id = len(tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": [CLS_TOKEN]})
        added_id = tokenizer.convert_tokens_to_ids(CLS_TOKEN)
        if added_id != token_id:
            raise SDVGenError(f"tokenizer gave <cls> id {added_id}, expected its old length {token_id}")
    if token_id < embeddings.num_embeddings:
        return ClsTokenInfo(token_id=token_id, row="existing")

    with torch.no_grad():
        mean_row = embeddings.weight.mean(dim=0, keepdim=True)
        text_encoder.resize_token_embeddings(token_id + 1, mean_resizing=False)
        text_encoder.get_input_embeddings().weight[token_id:] = mean_row
    logger.info("text encoder table was full: added row %d for <cls> (mean of existing rows)", token_id)
    return ClsTokenInfo(token_id=token_id, row="added-mean")


def insert_cls(prompt: str, subject: str | None = None) -> str:
    """Place `<cls>` before the first whole-word `subject` in `prompt`, or at the start.

    A prompt that already holds `<cls>` is returned unchanged. A subject word missing from the prompt
    is an error, since silently putting the token elsewhere would change what the model binds to.
    """
    if CLS_TOKEN in prompt:
        return prompt
    subject = (subject or "").strip()
    if not subject:
        return f"{CLS_TOKEN} {prompt.lstrip()}"
    match = re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", prompt, flags=re.IGNORECASE)
    if match is None:
        raise SDVGenError(
            f"subject word {subject!r} does not occur in the prompt {prompt!r}; use a word from the prompt "
            f"(e.g. the noun naming the subject) or leave the subject empty to put <cls> at the start"
        )
    return f"{prompt[:match.start()]}{CLS_TOKEN} {prompt[match.start():]}"


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int = MAX_TEXT_TOKENS
) -> torch.Tensor:
    """Token ids `[N, max_length]`, padded like the stock CogVideoX pipeline; warns with the text cut off."""
    encoded = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
        return_tensors="pt",
    )
    for prompt, kept in zip(prompts, encoded.input_ids):
        full = tokenizer(prompt, add_special_tokens=True, verbose=False).input_ids
        if len(full) > max_length:
            cut = tokenizer.decode(full[max_length - 1 : -1], skip_special_tokens=False)
            logger.warning(
                "prompt is %d tokens; only the first %d are used. Cut off: %r", len(full), max_length, cut
            )
    return encoded.input_ids


@torch.no_grad()
def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: T5EncoderModel,
    prompts: list[str],
    device: torch.device | str,
    dtype: torch.dtype,
    max_length: int = MAX_TEXT_TOKENS,
) -> torch.Tensor:
    """T5 embeddings `[N, max_length, text_dim]` for the prompts."""
    ids = tokenize_prompts(tokenizer, prompts, max_length)
    return text_encoder(ids.to(device))[0].to(dtype=dtype)
