"""End-to-end generation cost of the speed/memory options: seconds per video and per step, peak memory
(allocated and reserved), step caching's skipped steps and each option's change of the output against the
plain run (same seed), plus tiled decode and LoRA fused vs unfused.

    python bench/generation.py                                    # CPU: mid-size random model, ratios only
    python bench/generation.py --model 5b --device cuda --dtype bf16 --frames 49 --height 480 --width 720 --steps 50

Combinations: every memory mode (`--modes`; offload modes need a GPU) x `--weights` x `--compile` x `--cache`.
Output change is measured on the final latents against the first combination (plain: precision, compile off,
cache off, first memory mode), same seed. Absolute seconds and memory mean something only on a GPU with `--model 5b`; on a
CPU read the ratios.
"""

from __future__ import annotations

import itertools
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    benchmark_parser, machine_info, parse, peak_memory_gib, peak_reserved_gib, report, synchronize,
)
from models import random_pipeline  # noqa: E402

from sdvgen_core.acceleration_options import CACHES, COMPILE_MODES, MEMORY_MODES, WEIGHTS  # noqa: E402
from sdvgen_core.lora import DEFAULT_ADAPTER, make_lora_config, save_lora  # noqa: E402
from sdvgen_core.pipeline import MemoryMode  # noqa: E402
from sdvgen_core.reference import FitMode  # noqa: E402

PROMPT = "a <cls> toy robot walks through a snowy forest"


def write_random_lora(pipe, path: Path, rank: int) -> Path:
    """A LoRA with the paper's targets and random non-zero weights, saved with our writer."""
    pipe.transformer.add_adapter(make_lora_config(rank=rank, alpha=rank / 2), adapter_name=DEFAULT_ADAPTER)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if ".lora_" in name:
                param.copy_((torch.randn(param.shape, generator=generator) * 0.01).to(param.dtype))
    assert get_peft_model_state_dict(pipe.transformer, adapter_name=DEFAULT_ADAPTER)
    save_lora(pipe.transformer, path)
    pipe.transformer.delete_adapters(DEFAULT_ADAPTER)
    return path


def change(latents: torch.Tensor, reference: torch.Tensor) -> tuple[str, str]:
    """(max-abs difference, PSNR in dB over the reference's range) of final latents against the reference run."""
    latents, reference = latents.float().cpu(), reference.float().cpu()
    max_abs = (latents - reference).abs().max().item()
    mse = ((latents - reference) ** 2).mean().item()
    peak = (reference.max() - reference.min()).item()
    psnr = "exact" if mse == 0 else f"{10 * math.log10(peak**2 / mse):.1f}"
    return f"{max_abs:.4f}", psnr


class BlockRunCounter:
    """Counts how often the first and the last transformer block really ran (a cached step skips the last)."""

    def __init__(self, pipe) -> None:
        self.first = self.last = 0
        blocks = pipe.transformer.transformer_blocks
        blocks[0].attn1.register_forward_hook(lambda *_: self._count("first"))
        blocks[-1].attn1.register_forward_hook(lambda *_: self._count("last"))

    def _count(self, which: str) -> None:
        setattr(self, which, getattr(self, which) + 1)

    def skipped(self) -> str:
        first, last = self.first, self.last
        self.first = self.last = 0
        return f"{first - last}/{first}"


def main() -> None:
    parser = benchmark_parser(__doc__, frames=25)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lora-rank", type=int, default=128)
    parser.add_argument("--modes", nargs="+", choices=[m for m in MEMORY_MODES if m != "auto"], default=None,
                        help="memory modes (default: all on a GPU, on_device on a CPU)")
    parser.add_argument("--weights", nargs="+", choices=WEIGHTS, default=list(WEIGHTS))
    parser.add_argument("--compile", nargs="+", choices=COMPILE_MODES, default=None,
                        help="default: off and blocks on a GPU, off on a CPU (Inductor on 2 cores takes minutes)")
    parser.add_argument("--cache", nargs="+", choices=CACHES, default=list(CACHES))
    parser.add_argument("--cache-threshold", type=float, nargs="+", default=[0.05],
                        help="first_block thresholds to measure (each a combination)")
    parser.add_argument("--blocks-per-group", type=int, default=1)
    parser.add_argument("--skip-lora", action="store_true", help="leave out the LoRA fused/unfused rows")
    args, device, dtype = parse(parser)
    gpu = device.type == "cuda"
    modes = args.modes or ([m.value for m in MemoryMode if m is not MemoryMode.AUTO] if gpu else ["on_device"])
    compiles = args.compile or (list(COMPILE_MODES) if gpu else ["off"])
    reference_image = torch.rand(3, args.height, args.width)
    size = {"height": args.height, "width": args.width, "num_frames": args.frames}

    def timed(fn):
        """(result, seconds, peak allocated GiB, peak reserved GiB) of `fn()`."""
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        return result, time.perf_counter() - start, peak_memory_gib(device), peak_reserved_gib(device)

    def sample(pipe) -> torch.Tensor:
        pipe.vae.disable_tiling()  # the reference is VAE-encoded inside: the same way in every run
        return pipe(PROMPT, reference_image=reference_image, fit=FitMode.STRETCH, num_inference_steps=args.steps,
                    guidance_scale=6.0, generator=torch.Generator().manual_seed(0), output_type="latent",
                    **size).latents

    rows, baseline = [], None
    for weights in args.weights:
        pipe = random_pipeline(args.model, dtype)  # fp8 storage is one-way: a fresh model per weights setting
        pipe.set_progress_bar_config(disable=True)
        pipe.configure_acceleration(device=device, weights=weights, blocks_per_group=args.blocks_per_group)
        counter = BlockRunCounter(pipe)
        caches = [("off", None)] * ("off" in args.cache) + [("first_block", t) for t in args.cache_threshold] * (
            "first_block" in args.cache)
        for mode, compile_mode, (cache, threshold) in itertools.product(modes, compiles, caches):
            pipe.configure_acceleration(compile=compile_mode, cache=cache,
                                        cache_threshold=threshold or pipe.acceleration.cache_threshold)
            # MemoryMode as asked: on a CPU, group offload runs with the CPU as both devices (the code path only).
            pipe._place(MemoryMode(mode), device)
            _, warmup, _, _ = timed(lambda: sample(pipe))  # with compile "blocks" this is where compilation happens
            counter.skipped()
            latents, sampling, alloc, reserved = timed(lambda: sample(pipe))
            skipped = counter.skipped()
            _, plain_s, plain_alloc, _ = timed(lambda: pipe.decode(latents))
            _, tiled_s, tiled_alloc, _ = timed(lambda: pipe.decode(latents, tiled=True))
            if baseline is None:
                baseline = latents
            max_abs, psnr = change(latents, baseline)
            rows.append({
                "memory mode": mode, "weights": weights, "compile": compile_mode,
                "cache": cache if cache == "off" else f"{cache} {threshold}",
                "s/video (tiled decode)": f"{sampling + tiled_s:.2f}", "s/step": f"{sampling / args.steps:.3f}",
                "first run s/step": f"{warmup / args.steps:.3f}", "decode plain / tiled s": f"{plain_s:.2f} / {tiled_s:.2f}",
                "peak alloc GiB sampling": alloc, "peak reserved GiB sampling": reserved,
                "peak alloc GiB decode plain / tiled": f"{plain_alloc} / {tiled_alloc}",
                "skipped blocks/runs": skipped, "latent max-abs vs plain": max_abs, "PSNR dB": psnr,
            })
        del pipe
    print(markdown_summary(rows))

    if not args.skip_lora:
        pipe = random_pipeline(args.model, dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.set_memory_mode(modes[0], device)
        _, plain, _, _ = timed(lambda: sample(pipe))
        with tempfile.TemporaryDirectory() as folder:
            lora = write_random_lora(pipe, Path(folder) / "lora.safetensors", args.lora_rank)
            for label, fuse in (("LoRA unfused", False), ("LoRA fused", True)):
                pipe.set_lora(lora, fuse=fuse)
                sample(pipe)
                _, sampling, alloc, reserved = timed(lambda: sample(pipe))
                print(f"{label}: sampling x{sampling / plain:.2f} of no LoRA")
                rows.append({**{key: "" for key in rows[0]}, "memory mode": modes[0], "weights": f"precision, {label}",
                             "compile": "off", "cache": "off", "s/step": f"{sampling / args.steps:.3f}",
                             "peak alloc GiB sampling": alloc, "peak reserved GiB sampling": reserved})
    info = machine_info(device) | {"setting": f"{args.model}, {args.frames}x{args.height}x{args.width}, "
                                               f"{args.steps} steps, CFG 6, {args.dtype}, LoRA rank {args.lora_rank}"}
    report(f"generation_{args.model}_{device.type}", rows, info, args.out)


def markdown_summary(rows: list[dict[str, object]]) -> str:
    """Each row's sampling time relative to the first (the plain run)."""
    base = float(rows[0]["s/step"])
    return "\n".join(
        f"{row['memory mode']}, {row['weights']}, compile {row['compile']}, cache {row['cache']}: "
        f"s/step x{float(row['s/step']) / base:.2f}, skipped {row['skipped blocks/runs']}" for row in rows
    )


if __name__ == "__main__":
    main()
