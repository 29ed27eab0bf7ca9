"""End-to-end generation cost: seconds per video and peak memory per memory mode, tiled vs plain VAE decode,
LoRA fused vs unfused.

    python bench/generation.py                                    # CPU: mid-size random model, ratios only
    python bench/generation.py --model 5b --device cuda --dtype bf16 --frames 49 --height 480 --width 720 --steps 50

Absolute seconds and memory mean something only on a GPU with `--model 5b`; on a CPU read the ratios.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_parser, parse, machine_info, peak_memory_gib, report, synchronize  # noqa: E402
from models import random_pipeline  # noqa: E402

from sdvgen_core.lora import DEFAULT_ADAPTER, make_lora_config, save_lora  # noqa: E402
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


def main() -> None:
    parser = benchmark_parser(__doc__, frames=25)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lora-rank", type=int, default=128)
    args, device, dtype = parse(parser)
    pipe = random_pipeline(args.model, dtype)
    pipe.set_progress_bar_config(disable=True)
    reference = torch.rand(3, args.height, args.width)
    size = {"height": args.height, "width": args.width, "num_frames": args.frames}

    def generate(tiled: bool) -> tuple[float, float, float]:
        """(seconds for sampling, seconds for decoding, total) of one video with CFG."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        latents = pipe(PROMPT, reference_image=reference, fit=FitMode.STRETCH, num_inference_steps=args.steps,
                       guidance_scale=6.0, generator=torch.Generator().manual_seed(0), output_type="latent",
                       **size).latents
        synchronize(device)
        sampled = time.perf_counter()
        pipe.decode(latents, tiled=tiled)
        synchronize(device)
        end = time.perf_counter()
        return sampled - start, end - sampled, end - start

    rows = []
    modes = ["on_device", "model_offload", "sequential_offload"] if device.type == "cuda" else ["on_device"]
    for mode in modes:
        pipe.set_memory_mode(mode, device)
        generate(tiled=True)  # warm-up
        for tiled in (False, True):
            sample_s, decode_s, total_s = generate(tiled)
            rows.append({"config": f"{mode}, {'tiled' if tiled else 'plain'} decode", "sampling s": f"{sample_s:.2f}",
                         "decode s": f"{decode_s:.2f}", "s/video": f"{total_s:.2f}", "peak GiB": peak_memory_gib(device)})

    pipe.set_memory_mode("on_device", device)
    with tempfile.TemporaryDirectory() as folder:
        lora = write_random_lora(pipe, Path(folder) / "lora.safetensors", args.lora_rank)
        pipe.set_lora(lora, fuse=False)
        generate(tiled=True)
        unfused = generate(tiled=True)
        pipe.set_lora(lora, fuse=True)
        fused = generate(tiled=True)
    base = float(rows[1]["sampling s"])
    for label, timing in (("LoRA unfused", unfused), ("LoRA fused", fused)):
        rows.append({"config": f"on_device, {label}, tiled decode", "sampling s": f"{timing[0]:.2f}",
                     "decode s": f"{timing[1]:.2f}", "s/video": f"{timing[2]:.2f}", "peak GiB": peak_memory_gib(device)})
    print(f"sampling time vs no LoRA: unfused x{unfused[0] / base:.2f}, fused x{fused[0] / base:.2f}")
    info = machine_info(device) | {"setting": f"{args.model}, {args.frames}x{args.height}x{args.width}, "
                                               f"{args.steps} steps, CFG 6, {args.dtype}, LoRA rank {args.lora_rank}"}
    report(f"generation_{args.model}_{device.type}", rows, info, args.out)


if __name__ == "__main__":
    main()
