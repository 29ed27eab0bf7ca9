"""Shared fixtures: tiny CogVideoX-architecture models saved in the diffusers layout, and media drawn in code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from sdvgen_core.pipeline import SDVGenPipeline
from sdvgen_core.presets import TinyModelConfig, build_tiny_model

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-cogvideox"))


@pytest.fixture(scope="session")
def full_table_model_dir(tmp_path_factory) -> Path:
    """A model whose T5 table has exactly as many rows as the tokenizer has tokens."""
    folder = tmp_path_factory.mktemp("tiny-full-table")
    from sdvgen_core.presets import write_t5_tokenizer

    length = write_t5_tokenizer(folder / "probe", TinyModelConfig().spm_vocab_size)
    return build_tiny_model(folder / "model", TinyModelConfig(table_rows=length))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir) -> SDVGenPipeline:
    return SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32")


def draw_subject(size=(200, 150), color=(220, 60, 40), mode="RGB", background=(40, 120, 200)) -> Image.Image:
    """A coloured ellipse on a plain background (RGBA: transparent background)."""
    if mode == "RGBA":
        image = Image.new("RGBA", size, (0, 0, 0, 0))
        fill = (*color, 255)
    else:
        image = Image.new("RGB", size, background)
        fill = color
    width, height = size
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=fill)
    return image


@pytest.fixture
def subject_image() -> Image.Image:
    return draw_subject()
