"""Shared helpers for the benchmarks: interleaved timing with medians, machine info, table/CSV/JSON output."""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def benchmark_parser(description: str, frames: int) -> argparse.ArgumentParser:
    """A parser with the model size, placement and video size options every benchmark takes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "mid", "5b"], default="mid",
                        help="random-weight model size: tiny, mid (CPU: matmuls dominate), 5b (real size, GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--height", type=int, default=160)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--frames", type=int, default=frames, help="video frames (4k+1)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the CSV/JSON results")
    return parser


def parse(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, torch.device, torch.dtype]:
    """Parsed arguments, the torch device and dtype they name; diffusers' info logging silenced."""
    from diffusers.utils import logging as diffusers_logging

    from sdvgen_core.pipeline import resolve_dtype

    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()
    return args, torch.device(args.device), resolve_dtype(args.dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], device: torch.device, warmup: int = 2, repeats: int = 5
) -> dict[str, float]:
    """Median seconds per call of each candidate, measured round-robin so drift hits all of them alike."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def machine_info(device: torch.device) -> dict[str, str]:
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "device": str(device),
        "accelerator": accelerator,
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
    }


def markdown_table(rows: list[dict[str, object]]) -> str:
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(row[h]) for h in headers) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, rows: list[dict[str, object]], info: dict[str, str], out_dir: Path = RESULTS_DIR) -> None:
    """Print the table and write `<name>.csv` and `<name>.json` (rows plus machine info)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print(markdown_table(rows))
    with open(out_dir / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / f"{name}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))


def peak_memory_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"


def peak_reserved_gib(device: torch.device) -> str:
    """Peak memory held by PyTorch's caching allocator (what the driver sees), next to `peak_memory_gib`'s allocated."""
    if device.type != "cuda":
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_reserved(device) / 2**30:.1f}"
