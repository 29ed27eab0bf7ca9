"""Training cost: identity vs video step time and memory, data-loader throughput, `prepare` cache hit vs miss,
and the paper recipe extrapolated to GPU-hours.

    python bench/train_steps.py                                           # CPU: mid-size model, ratios only
    python bench/train_steps.py --model 5b --device cuda --dtype bf16 --height 480 --width 720 --lora-rank 128
    python bench/train_steps.py --family wan22                            # Wan 2.2 TI2V: flow matching

One step = forward + backward of the trainer's own loss (CogVideoX: `v_prediction_loss`; Wan 2.2: the
flow-matching objective with per-token timesteps) with the LoRA trainable, gradient checkpointing on, one
identity pair or one clip per micro-batch.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import benchmark_parser, parse, interleaved_medians, machine_info, report, synchronize  # noqa: E402
from models import TRANSFORMER, WAN_TRANSFORMER  # noqa: E402
from reference_overhead import TEXT_TOKENS, WAN_TEXT_TOKENS, transformer_flops, wan_flops  # noqa: E402

from sdvgen_core.lora import DEFAULT_ADAPTER, WAN_LORA_TARGET_MODULES, make_lora_config  # noqa: E402
from sdvgen_core.presets import cogvideox_5b_scheduler  # noqa: E402
from sdvgen_core.transformer import SDVGenTransformer3DModel  # noqa: E402
from sdvgen_core.wan_presets import WAN22_FLOW_SHIFT, WAN22_LATENT_CHANNELS  # noqa: E402
from sdvgen_core.wan_transformer import SDVGenWanTransformer3DModel  # noqa: E402
from training.batches import Batch, reference_keep_indices  # noqa: E402
from training.families import FlowMatchingObjective  # noqa: E402
from training.trainer import v_prediction_loss  # noqa: E402

# The paper's recipe (appendix A) and its reported cost.
PAPER_STEPS, PAPER_IMAGES, PAPER_VIDEOS, PAPER_P_VIDEO, PAPER_A100_HOURS = 4000, 256, 32, 0.2, 288
PEAK_BF16_TFLOPS = {"A100": 312, "H100": 989}
ASSUMED_MFU = 0.4
CHECKPOINTED_TRAINING_FLOPS = 4  # forward + backward (2x) + recomputed forward


def step_flops(width: int, layers: int, tokens_per_frame: int, latent_frames: int, p_token_drop: float) -> float:
    """Training FLOPs of one sample: identity (T=1) or video (T latent frames), reference tokens after the drop."""
    reference = tokens_per_frame * (1 - p_token_drop if latent_frames > 1 else 1)
    tokens = TEXT_TOKENS + reference + latent_frames * tokens_per_frame
    return CHECKPOINTED_TRAINING_FLOPS * transformer_flops(width, layers, int(tokens))


def wan_step_flops(width: int, ffn: int, layers: int, tokens_per_frame: int, latent_frames: int,
                   p_token_drop: float) -> float:
    """Wan training FLOPs of one sample: the target frames plus the reference frame (after the drop on video)."""
    reference = tokens_per_frame * (1 - p_token_drop if latent_frames > 1 else 1)
    return CHECKPOINTED_TRAINING_FLOPS * wan_flops(width, ffn, layers, int(reference + latent_frames * tokens_per_frame))


def paper_recipe_seconds(image_sample_s: float, video_sample_s: float) -> float:
    """Single-device seconds for the paper's 4,000 steps from per-sample step times."""
    per_step = (1 - PAPER_P_VIDEO) * PAPER_IMAGES * image_sample_s + PAPER_P_VIDEO * PAPER_VIDEOS * video_sample_s
    return PAPER_STEPS * per_step


def step_row(model: str, args, medians: dict[str, float], flop_ratio: float, peaks: dict[str, str],
             **extra: str) -> dict[str, str]:
    """One table row: measured identity/video step times, their ratio next to the FLOP ratio, peak memory."""
    return {
        "model": model,
        "size": f"{args.frames}x{args.height}x{args.width}",
        "LoRA rank": str(args.lora_rank),
        "identity step s": f"{medians['identity']:.3f}",
        "video step s": f"{medians['video']:.3f}",
        "video / identity": f"{medians['video'] / medians['identity']:.1f}",
        "FLOP ratio": f"{flop_ratio:.1f}",
        **extra,
        "identity peak GiB": peaks.get("identity", "n/a (CPU)"),
        "video peak GiB": peaks.get("video", "n/a (CPU)"),
    }


def recipe_estimates(label: str, flops: tuple[float, float], medians: dict[str, float], args, device: torch.device,
                     **extra: str) -> list[dict[str, str]]:
    """The paper recipe's GPU-hours from per-sample `flops` (identity, video) on A100/H100 at the assumed MFU, plus
    the measured step times when the 5B model ran on a GPU; `extra` columns go on every row."""
    recipe_flops = paper_recipe_seconds(*flops)
    estimates = [{
        "source": f"{label}, {gpu} at {ASSUMED_MFU:.0%} of bf16 peak",
        "video/identity cost": f"{flops[1] / flops[0]:.1f}",
        "GPU-hours": f"{recipe_flops / (PEAK_BF16_TFLOPS[gpu] * 1e12 * ASSUMED_MFU) / 3600:.0f}",
        **extra,
    } for gpu in ("A100", "H100")]
    if args.model == "5b" and device.type == "cuda":
        measured = paper_recipe_seconds(medians["identity"], medians["video"]) / 3600
        estimates.append({"source": f"measured step times on {machine_info(device)['accelerator']}",
                          "video/identity cost": f"{medians['video'] / medians['identity']:.1f}",
                          "GPU-hours": f"{measured:.0f}", **extra})
    return estimates


def write_clips(folder: Path, count: int, frames: int, height: int, width: int) -> list[Path]:
    from sdvgen_core.video import write_mp4

    paths = []
    for index in range(count):
        t = torch.linspace(0, 1, frames)[:, None, None, None]
        y = torch.linspace(0, 1, height)[None, None, :, None]
        x = torch.linspace(0, 1, width)[None, None, None, :]
        channel = torch.arange(3)[None, :, None, None]
        pattern = 0.5 + 0.5 * torch.sin(6.28 * (x * (index + 1) + y * (channel + 1) + 2 * t))
        paths.append(write_mp4(pattern, folder / f"clip{index}.mp4", fps=24, overwrite=True))
    return paths


def main() -> None:
    parser = benchmark_parser(__doc__, frames=49)
    parser.add_argument("--lora-rank", type=int, default=128)
    parser.add_argument("--p-token-drop", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clips", type=int, default=4, help="clips for the data-loader throughput")
    parser.add_argument("--demo-prepare", action="store_true",
                        help="also time `prepare` on the tiny demo data (cache miss, then hit)")
    parser.add_argument("--family", choices=["cogvideox", "wan22"], default="cogvideox")
    args, device, dtype = parse(parser)
    torch.manual_seed(0)
    if args.family == "wan22":
        return wan_main(args, device, dtype)
    config = dict(TRANSFORMER[args.model], use_rotary_positional_embeddings=True, sample_frames=49)
    model = SDVGenTransformer3DModel(**config).to(device, dtype)
    model.add_adapter(make_lora_config(args.lora_rank, args.lora_rank / 2, 0.1), adapter_name=DEFAULT_ADAPTER)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.enable_gradient_checkpointing()
    model.train()
    scheduler = cogvideox_5b_scheduler()

    latent_frames = (args.frames - 1) // 4 + 1
    h, w = args.height // 8, args.width // 8
    tokens_per_frame = (h // 2) * (w // 2)
    text = torch.randn(1, TEXT_TOKENS, config["text_embed_dim"], device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)

    def batch(frames: int, keep: torch.Tensor | None) -> Batch:
        return Batch(
            task="video" if frames > 1 else "identity",
            latents=torch.randn(1, frames, 16, h, w, device=device, dtype=dtype),
            text=text,
            reference=torch.randn(1, 1, 16, h, w, device=device, dtype=dtype),
            keep_indices=None if keep is None else keep.to(device),
        )

    identity = batch(1, None)
    video = batch(latent_frames, reference_keep_indices(tokens_per_frame, "token", args.p_token_drop, generator))
    peaks: dict[str, str] = {}
    loss = lambda which: v_prediction_loss(model, scheduler, which, generator)  # noqa: E731
    medians = interleaved_medians(
        {"identity": train_step(model, loss, identity, "identity", device, dtype, peaks),
         "video": train_step(model, loss, video, "video", device, dtype, peaks)},
        device, args.warmup, args.repeats,
    )
    width = config["num_attention_heads"] * config["attention_head_dim"]
    flops_img = step_flops(width, config["num_layers"], tokens_per_frame, 1, args.p_token_drop)
    flops_vid = step_flops(width, config["num_layers"], tokens_per_frame, latent_frames, args.p_token_drop)
    rows = [step_row(args.model, args, medians, flops_vid / flops_img, peaks, **{"paper's estimate": "169 (T^2)"})]
    info = machine_info(device) | {"setting": f"{args.dtype}, gradient checkpointing, p_token_drop {args.p_token_drop}"}
    report(f"training_steps_{args.model}_{device.type}", rows, info, args.out)

    # The paper recipe at CogVideoX-5B size: FLOP model (any machine) and measured step times (GPU, --model 5b).
    flops_5b_img = step_flops(3072, 42, 1350, 1, args.p_token_drop)
    flops_5b_vid = step_flops(3072, 42, 1350, 13, args.p_token_drop)
    estimates = recipe_estimates("FLOP model", (flops_5b_img, flops_5b_vid), medians, args, device,
                                 paper=f"{PAPER_A100_HOURS} A100-hours")
    report("training_recipe_estimate", estimates, info, args.out)

    with tempfile.TemporaryDirectory() as folder:
        from training.data import decode_clip

        source_frames = math.ceil(args.frames * 24 / 8) + 3  # enough 24 fps frames for `frames` at 8 fps
        clips = write_clips(Path(folder), args.clips, frames=source_frames, height=360, width=640)
        start = time.perf_counter()
        for clip in clips:
            decode_clip(clip, fps=8, num_frames=args.frames, height=args.height, width=args.width)
        elapsed = time.perf_counter() - start
    loader = [{"what": f"decode + fit {args.frames} frames at 8 fps from 640x360 24 fps mp4 to {args.width}x{args.height}",
               "seconds": f"{elapsed:.2f}",
               "rate": f"{len(clips) / elapsed:.2f} clips/s, {len(clips) * args.frames / elapsed:.0f} frames/s"}]
    if args.demo_prepare:
        loader += prepare_hit_vs_miss()
    report("training_data", loader, info, args.out)


def train_step(model, loss_of, which: Batch, name: str, device: torch.device, dtype: torch.dtype,
               peaks: dict[str, str]):
    """A timed closure: one forward + backward of `loss_of(which)`, peak memory recorded on CUDA."""
    def run():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_of(which)
        loss.backward()
        if device.type == "cuda":
            synchronize(device)
            peaks[name] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
    return run


WAN_RECIPE_SIZE = (121, 704, 1280)  # training/configs/wan22_ti2v5b.yaml: 31 latent frames of 880 tokens


def wan_main(args, device: torch.device, dtype: torch.dtype) -> None:
    """Wan 2.2 TI2V: identity vs video step of the trainer's flow-matching objective, and the recipe's cost."""
    config = WAN_TRANSFORMER[args.model]
    model = SDVGenWanTransformer3DModel(**config).to(device, dtype)
    model.add_adapter(make_lora_config(args.lora_rank, args.lora_rank / 2, 0.0, WAN_LORA_TARGET_MODULES),
                      adapter_name=DEFAULT_ADAPTER)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.enable_gradient_checkpointing()
    model.train()
    objective = FlowMatchingObjective(WAN22_FLOW_SHIFT, "none", "b c t h w", tuple(config["patch_size"]), "clean")

    latent_frames = (args.frames - 1) // 4 + 1
    h, w = args.height // 16, args.width // 16
    tokens_per_frame = (h // 2) * (w // 2)
    text = torch.randn(1, WAN_TEXT_TOKENS, config["text_dim"], device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)

    def batch(frames: int, keep: torch.Tensor | None) -> Batch:  # the cache's `b t c h w` layout
        shape = (1, frames, WAN22_LATENT_CHANNELS, h, w)
        return Batch(task="video" if frames > 1 else "identity", latents=torch.randn(shape, device=device, dtype=dtype),
                     text=text, reference=torch.randn(1, 1, WAN22_LATENT_CHANNELS, h, w, device=device, dtype=dtype),
                     keep_indices=None if keep is None else keep.to(device))

    identity = batch(1, None)
    video = batch(latent_frames, reference_keep_indices(tokens_per_frame, "token", args.p_token_drop, generator))
    peaks: dict[str, str] = {}
    loss = lambda which: objective.loss(model, which, generator)  # noqa: E731
    medians = interleaved_medians(
        {"identity": train_step(model, loss, identity, "identity", device, dtype, peaks),
         "video": train_step(model, loss, video, "video", device, dtype, peaks)},
        device, args.warmup, args.repeats,
    )
    width, ffn, layers = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"], config["num_layers"]
    flops_img = wan_step_flops(width, ffn, layers, tokens_per_frame, 1, args.p_token_drop)
    flops_vid = wan_step_flops(width, ffn, layers, tokens_per_frame, latent_frames, args.p_token_drop)
    rows = [step_row(f"wan22-{args.model}", args, medians, flops_vid / flops_img, peaks)]
    info = machine_info(device) | {"setting": f"{args.dtype}, gradient checkpointing, p_token_drop {args.p_token_drop}"}
    report(f"training_steps_wan22_{args.model}_{device.type}", rows, info, args.out)

    five_b = WAN_TRANSFORMER["5b"]
    frames, height, width_px = WAN_RECIPE_SIZE
    recipe_tokens, recipe_frames = (height // 32) * (width_px // 32), (frames - 1) // 4 + 1
    flops_5b = [wan_step_flops(3072, five_b["ffn_dim"], five_b["num_layers"], recipe_tokens, t, args.p_token_drop)
                for t in (1, recipe_frames)]
    estimates = recipe_estimates(f"FLOP model, Wan2.2-TI2V-5B at {frames}x{height}x{width_px}", flops_5b, medians,
                                 args, device)
    report("training_recipe_estimate_wan22", estimates, info, args.out)


def prepare_hit_vs_miss() -> list[dict[str, str]]:
    """Time `prepare` on the tiny demo data twice: everything encoded (miss), then everything cached (hit)."""
    from training.config import load_config
    from training.demo import make_demo_data
    from training.prepare import run_prepare

    config_path = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny_cpu.yaml"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        cwd = os.getcwd()
        os.chdir(folder)  # the demo config's paths are relative
        try:
            make_demo_data("demo")
            config = load_config(config_path)
            seconds = []
            for _ in ("miss", "hit"):
                start = time.perf_counter()
                run_prepare(config)
                seconds.append(time.perf_counter() - start)
            rows.append({"what": "prepare, tiny demo data, cache miss (encode all)", "seconds": f"{seconds[0]:.2f}",
                         "rate": ""})
            rows.append({"what": "prepare, tiny demo data, cache hit (all cached)", "seconds": f"{seconds[1]:.2f}",
                         "rate": f"{seconds[0] / seconds[1]:.0f}x faster than a miss"})
        finally:
            os.chdir(cwd)
    return rows


if __name__ == "__main__":
    main()
