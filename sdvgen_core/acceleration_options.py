"""Choices and CLI flags of the speed/memory options, without importing torch (the CLI's --help and the
ComfyUI node definitions stay fast). The options themselves are applied in `sdvgen_core.acceleration`."""

from __future__ import annotations

import argparse
from typing import Any

WEIGHTS = ("precision", "fp8")  # precision: stored as loaded (bf16/fp16/fp32); fp8: float8_e4m3fn storage
COMPILE_MODES = ("off", "blocks")
ATTENTION_NAMES = ("sdpa", "flash", "sage", "xformers")  # sdvgen_core.attention.ATTENTION_BACKENDS
CACHES = ("off", "first_block")
MEMORY_MODES = ("auto", "on_device", "model_offload", "group_offload", "sequential_offload")  # pipeline.MemoryMode
DEFAULT_CACHE_THRESHOLD = 0.05  # diffusers' FirstBlockCacheConfig default
DEFAULT_BLOCKS_PER_GROUP = 1


def add_acceleration_arguments(parser: argparse.ArgumentParser) -> None:
    """The CLI flags of `AccelerationConfig` (README, "Speed and memory")."""
    parser.add_argument("--weights", choices=WEIGHTS, default="precision",
                        help="weight storage: precision (as --precision) or fp8 (e4m3 storage: about half the "
                             "transformer and T5 memory of bf16, a small change in the output)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="off",
                        help="blocks: torch.compile the transformer blocks (the first video compiles, later ones "
                             "run faster; LoRA strength, reference and prompt changes do not recompile)")
    parser.add_argument("--attention", choices=ATTENTION_NAMES, default="sdpa",
                        help="attention kernel: sdpa (PyTorch), flash (flash-attn), sage (SageAttention), xformers; "
                             "all but sdpa need a CUDA GPU, bf16/fp16 and their package")
    parser.add_argument("--cache", choices=CACHES, default="off",
                        help="first_block: skip the remaining blocks on steps where the first block's output "
                             "barely changed (diffusers' First Block Cache)")
    parser.add_argument("--cache-threshold", type=float, default=DEFAULT_CACHE_THRESHOLD,
                        help="first_block cache: relative change under which a step reuses the cached blocks "
                             "(default: %(default)s; higher = faster, rougher)")
    parser.add_argument("--blocks-per-group", type=int, default=DEFAULT_BLOCKS_PER_GROUP,
                        help="group_offload: transformer blocks brought to the GPU per transfer (default: %(default)s)")


def options_from_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """`configure_acceleration` keyword arguments from parsed CLI flags."""
    return {"weights": args.weights, "compile": args.compile, "attention": args.attention, "cache": args.cache,
            "cache_threshold": args.cache_threshold, "blocks_per_group": args.blocks_per_group}
