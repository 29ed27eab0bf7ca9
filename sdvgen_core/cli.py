"""`sdvgen` command line: generate a subject-driven video, or write the tiny demo model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .acceleration_options import MEMORY_MODES, add_acceleration_arguments, options_from_arguments

logger = logging.getLogger("sdvgen")

TINY_LABEL = "tiny preset: a randomly initialised CogVideoX-architecture model; its video is noise"


def _tiny_model_dir() -> Path:
    from .presets import build_tiny_model

    cache = Path(os.environ.get("SDVGEN_CACHE", Path.home() / ".cache" / "sdvgen")) / "tiny-model-v1"
    if not (cache / "model_index.json").is_file():
        logger.info("building the tiny model in %s", cache)
        build_tiny_model(cache)
    return cache


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="make a video of the subject in --ref doing what --prompt says",
        description="Zero-shot subject-driven video generation (SDV-Gen) on CogVideoX-5B.",
    )
    p.add_argument("--ref", required=True, help="subject photo (any size; RGBA alpha blanks the background)")
    p.add_argument("--prompt", required=True, help="what the subject does; <cls> is placed before --subject")
    p.add_argument("--subject", default=None, help="word in the prompt naming the subject (<cls> goes before it)")
    p.add_argument("--negative-prompt", default="", help="negative prompt for classifier-free guidance")
    p.add_argument("--out", default="sdvgen.mp4", help="output mp4 path (default: %(default)s)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="CogVideoX-5B folder in diffusers layout (THUDM/CogVideoX-5b)")
    source.add_argument("--preset", choices=["tiny"], help=f"embedded model ({TINY_LABEL})")
    p.add_argument("--lora", default=None, help="SDV-Gen LoRA .safetensors (the authors' release or ours)")
    p.add_argument("--lora-strength", type=float, default=1.0, help="LoRA strength (default: %(default)s)")
    p.add_argument("--fuse-lora", action="store_true", help="merge the LoRA into the weights (faster steps)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weights dtype; auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", help="torch device, e.g. cuda, cuda:1, cpu (default: auto)")
    p.add_argument("--memory-mode", choices=MEMORY_MODES, default="auto",
                   help="where the models live between uses; auto: by GPU memory, on_device on a CPU "
                        "(default: %(default)s)")
    add_acceleration_arguments(p)
    p.add_argument("--width", type=int, default=None, help="video width, multiple of 16 (default 720)")
    p.add_argument("--height", type=int, default=None, help="video height, multiple of 16 (default 480)")
    p.add_argument("--frames", type=int, default=None, help="frame count 4k+1, at most 49 (default 49)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50)")
    p.add_argument("--cfg", type=float, default=6.0, help="text guidance scale (default: %(default)s)")
    p.add_argument("--dynamic-cfg", action="store_true", help="CogVideoX dynamic CFG schedule")
    p.add_argument("--reference-guidance", type=float, default=0.0,
                   help="extra guidance towards the reference (extra model pass; 0 = off, the release default)")
    p.add_argument("--fit", choices=["crop", "pad", "stretch"], default="crop",
                   help="how the reference is fitted to the video size (default: %(default)s)")
    p.add_argument("--mask", default=None, help="subject mask image (white = subject) to blank the background")
    p.add_argument("--scheduler", choices=["ddim", "dpm"], default="ddim", help="sampler (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: %(default)s)")
    p.add_argument("--fps", type=int, default=8, help="mp4 frame rate (default: %(default)s)")
    p.add_argument("--tiled-decode", action="store_true", help="decode the VAE in tiles (less memory)")


def _generate(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image, UnidentifiedImageError

    from .acceleration import AccelerationConfig, check_acceleration, with_options
    from .pipeline import SDVGenPipeline, resolve_dtype
    from .presets import TINY_GENERATION_DEFAULTS
    from .prompts import insert_cls
    from .video import write_mp4

    started = time.perf_counter()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    defaults = {"height": 480, "width": 720, "num_frames": 49, "num_inference_steps": 50}
    if args.preset == "tiny":
        logger.warning(TINY_LABEL)
        defaults = dict(TINY_GENERATION_DEFAULTS)
        model_dir = _tiny_model_dir()
    else:
        model_dir = Path(args.model)
    settings = {
        "height": args.height or defaults["height"],
        "width": args.width or defaults["width"],
        "num_frames": args.frames or defaults["num_frames"],
        "num_inference_steps": args.steps or defaults["num_inference_steps"],
    }
    try:
        reference = Image.open(args.ref)
        reference.load()
        mask = Image.open(args.mask).convert("L") if args.mask else None
    except (OSError, UnidentifiedImageError) as error:
        raise SystemExit(f"error: cannot read image: {error}")
    prompt = insert_cls(args.prompt, args.subject)

    acceleration = options_from_arguments(args)
    check_acceleration(with_options(AccelerationConfig(), **acceleration), device, resolve_dtype(precision))
    pipe = SDVGenPipeline.from_model_dir(
        model_dir, dtype=precision, lora_path=args.lora, lora_strength=args.lora_strength,
        fuse_lora=args.fuse_lora, scheduler=args.scheduler,
    )
    pipe.configure_acceleration(device=device, **acceleration)
    pipe.set_memory_mode(args.memory_mode, device)
    logger.info("prompt: %s", prompt)
    logger.info(
        "%dx%d, %d frames, %d steps, cfg %s, %s on %s",
        settings["width"], settings["height"], settings["num_frames"], settings["num_inference_steps"],
        args.cfg, precision, device,
    )
    generator = torch.Generator("cpu").manual_seed(args.seed)
    latents = pipe(
        prompt, reference_image=reference, negative_prompt=args.negative_prompt, guidance_scale=args.cfg,
        use_dynamic_cfg=args.dynamic_cfg, reference_guidance_scale=args.reference_guidance, fit=args.fit,
        subject_mask=mask, generator=generator, output_type="latent", **settings,
    ).latents
    frames = pipe.decode(latents, tiled=args.tiled_decode)
    path = write_mp4(frames[0], args.out, fps=args.fps)
    logger.info("wrote %s (%d frames, %.1f s)", path, frames.shape[1], time.perf_counter() - started)
    print(path)
    return 0


def _add_tiny_model(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tiny-model", help="write the tiny random demo model (diffusers layout) to a folder",
        description=f"Write the {TINY_LABEL}, e.g. into ComfyUI/models/CogVideo/ to try the nodes.",
    )
    p.add_argument("folder", help="destination folder")


def _tiny_model(args: argparse.Namespace) -> int:
    from .presets import build_tiny_model

    print(build_tiny_model(args.folder))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdvgen", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    _add_tiny_model(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from .errors import SDVGenError

    try:
        return _generate(args) if args.command == "generate" else _tiny_model(args)
    except SDVGenError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
