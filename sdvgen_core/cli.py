"""`sdvgen` command line: generate a subject-driven video, or write the tiny demo model."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SDVGenError

if TYPE_CHECKING:
    import torch

    from .backbones import Backbone

from .acceleration_options import MEMORY_MODES, add_acceleration_arguments, options_from_arguments

logger = logging.getLogger("sdvgen")

TINY_LABEL = "tiny preset: a randomly initialised CogVideoX-architecture model; its video is noise"


TINY_WAN_LABEL = "tiny-wan preset: a randomly initialised Wan 2.2 TI2V-architecture model; its video is noise"


def _tiny_model_dir(preset: str = "tiny") -> Path:
    from .presets import build_tiny_model
    from .wan_presets import build_tiny_wan_model

    builders = {"tiny": ("tiny-model-v1", build_tiny_model), "tiny-wan": ("tiny-wan-model-v1", build_tiny_wan_model)}
    name, build = builders[preset]
    cache = Path(os.environ.get("SDVGEN_CACHE", Path.home() / ".cache" / "sdvgen")) / name
    if not (cache / "model_index.json").is_file():
        logger.info("building the %s model in %s", preset, cache)
        build(cache)
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
    p.add_argument("--out", default="sdvgen.mp4",
                   help="output .mp4 path (default: %(default)s); if it exists, the next free numbered name "
                        "(name_00001.mp4, ...) is written instead, unless --overwrite; missing folders are created")
    p.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model folder in diffusers layout: CogVideoX-5B (THUDM/CogVideoX-5b) or "
                        "Wan 2.2 TI2V-5B (Wan-AI/Wan2.2-TI2V-5B-Diffusers); the backbone is read from it")
    source.add_argument("--preset", choices=["tiny", "tiny-wan"], help=f"embedded model ({TINY_LABEL}; {TINY_WAN_LABEL})")
    p.add_argument("--family", choices=["cogvideox", "wan22"], default=None,
                   help="backbone of --model (default: detected from transformer/config.json)")
    p.add_argument("--text-encoder", default=None,
                   help="single-file T5-XXL .safetensors (t5xxl_fp16 / _fp8_e4m3fn / _fp8_e4m3fn_scaled, as in "
                        "ComfyUI's models/text_encoders) instead of the model folder's text_encoder/ (CogVideoX)")
    p.add_argument("--tokenizer", default=None,
                   help="T5 tokenizer folder for a model folder without tokenizer/ (e.g. ComfyUI's "
                        "comfy/text_encoders/t5_tokenizer)")
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
    p.add_argument("--width", type=int, default=None,
                   help="video width (default: CogVideoX 720, multiple of 16; Wan 1280, multiple of 32)")
    p.add_argument("--height", type=int, default=None,
                   help="video height (default: CogVideoX 480, multiple of 16; Wan 704, multiple of 32)")
    p.add_argument("--frames", type=int, default=None, help="frame count 4k+1 (default: CogVideoX 49, at most 49; Wan 121)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50)")
    p.add_argument("--cfg", type=float, default=None, help="text guidance scale (default: CogVideoX 6.0, Wan 5.0)")
    p.add_argument("--dynamic-cfg", action="store_true", help="CogVideoX dynamic CFG schedule (CogVideoX only)")
    p.add_argument("--reference-timestep", choices=["clean", "video"], default=None,
                   help="Wan only: timestep of the reference tokens, clean = 0 (default) or the video's")
    p.add_argument("--reference-guidance", type=float, default=0.0,
                   help="extra guidance towards the reference (extra model pass; 0 = off, the release default)")
    p.add_argument("--fit", choices=["crop", "pad", "stretch"], default="crop",
                   help="how the reference is fitted to the video size (default: %(default)s)")
    p.add_argument("--mask", default=None, help="subject mask image (white = subject) to blank the background")
    p.add_argument("--scheduler", choices=["ddim", "dpm", "unipc", "euler"], default=None,
                   help="sampler (default: CogVideoX ddim, Wan unipc; ddim/dpm are CogVideoX's, unipc/euler Wan's)")
    p.add_argument("--eta", type=float, default=0.0, help="CogVideoX DDIM/DPM eta, 0..1 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="random seed, 0..2^64-1 (default: %(default)s)")
    p.add_argument("--fps", type=int, default=None, help="mp4 frame rate, 1..240 (default: CogVideoX 8, Wan 24)")
    p.add_argument("--tiled-decode", action="store_true", help="decode the VAE in tiles (less memory)")


# What the pipeline calls each setting -> the option that sets it, so errors name what the user typed.
OPTION_NAMES = {
    "height": "--height", "width": "--width", "frames": "--frames", "steps": "--steps", "cfg": "--cfg",
    "reference_guidance": "--reference-guidance", "eta": "--eta",
}


def _settings(args: argparse.Namespace, defaults: dict[str, int]) -> dict[str, int]:
    """Size and steps: what was given, else the model's default (`None` means not given; 0 is an error, not a default)."""
    given = {"height": args.height, "width": args.width, "num_frames": args.frames, "num_inference_steps": args.steps}
    return {key: defaults[key] if value is None else value for key, value in given.items()}


def _check_output(out: str, overwrite: bool) -> Path:
    """Refuse an --out that cannot be written, before anything is loaded."""
    path = Path(out)
    if path.is_dir():
        raise SDVGenError(f"--out {out!r} is a folder; give a file name, e.g. {str(path / 'video.mp4')!r}")
    if path.suffix.lower() != ".mp4":
        raise SDVGenError(f"--out {out!r} must be an .mp4 file name (the video is written as H.264 mp4)")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise SDVGenError(f"--out {out!r}: {str(folder)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise SDVGenError(f"--out {out!r}: cannot write in {str(folder)!r} ({error.strerror}); choose another --out") from None
    if path.exists() and not overwrite:
        logger.info("%s exists; the video will get the next free numbered name (--overwrite replaces it)", path)
    return path


def _write(frames, out: Path, fps: int, overwrite: bool) -> Path:
    """Write the video to `out`, or without --overwrite to the next free numbered name if `out` exists."""
    from .files import OutputExistsError, next_free_path
    from .video import write_mp4

    while True:
        path = out if overwrite else next_free_path(out)
        try:
            return write_mp4(frames, path, fps=fps, overwrite=overwrite)
        except OutputExistsError:  # another run took the name meanwhile: take the next one
            continue


@dataclass
class GenerationPlan:
    """`sdvgen generate` options resolved against the model: backbone defaults applied, everything checked."""

    model_dir: Path
    backbone: "Backbone"
    settings: dict[str, int]  # height, width, num_frames, num_inference_steps
    guidance_scale: float
    fps: int
    family_options: dict[str, object]  # __call__ options only one backbone has (dynamic CFG, eta, ...)
    device: "torch.device"
    precision: str
    load_options: dict[str, object]  # from_model_dir options only one backbone has (single-file T5, ...)
    acceleration: dict[str, object]  # `configure_acceleration` options (fp8, compile, attention, cache, ...)

    def call_options(self, args: argparse.Namespace) -> dict[str, object]:
        """Keyword arguments for the pipeline's `__call__` that do not depend on the video being made."""
        return {
            "negative_prompt": args.negative_prompt, "guidance_scale": self.guidance_scale,
            "reference_guidance_scale": args.reference_guidance, "fit": args.fit, **self.settings,
            **self.family_options,
        }

    def load_pipeline(self, args: argparse.Namespace):
        """The backbone's pipeline with the LoRA, placed as asked (the one place the CLI builds a pipeline)."""
        from .backbones import load_pipeline

        pipe = load_pipeline(
            self.model_dir, self.backbone.family, dtype=self.precision, lora_path=args.lora,
            lora_strength=args.lora_strength, fuse_lora=args.fuse_lora, scheduler=args.scheduler,
            **self.load_options,
        )
        pipe.configure_acceleration(device=self.device, **self.acceleration)
        pipe.set_memory_mode(args.memory_mode, self.device)
        return pipe


def plan_generation(args: argparse.Namespace) -> GenerationPlan:
    """Check every model-independent `generate` option and resolve the backbone's defaults, before any loading."""
    from .acceleration import AccelerationConfig, check_acceleration, with_options
    from .backbones import detect_family, get_backbone
    from .lora import check_lora_header
    from .pipeline import check_model_dir, resolve_dtype
    from .presets import TINY_GENERATION_DEFAULTS
    from .validation import (
        FPS_RANGE, LORA_STRENGTH_RANGE, SEED_RANGE, GenerationLimits, check_float, check_generation_settings,
        check_int, resolve_device,
    )
    from .wan_presets import TINY_WAN_GENERATION_DEFAULTS

    model_dir = (
        _tiny_model_dir(args.preset) if args.preset
        else check_model_dir(args.model, text_encoder_file=args.text_encoder is not None)
    )
    backbone = get_backbone(args.family or detect_family(model_dir))
    load_options = {
        name: value for name, value in
        (("text_encoder_file", args.text_encoder), ("fallback_tokenizer_dir", args.tokenizer)) if value is not None
    }
    if load_options and backbone.family != "cogvideox":
        raise SDVGenError(f"--text-encoder/--tokenizer (single-file T5-XXL) are for CogVideoX, not {backbone.label}")
    fallback = backbone.defaults
    defaults = {"height": fallback.height, "width": fallback.width, "num_frames": fallback.num_frames,
                "num_inference_steps": fallback.num_inference_steps}
    if args.preset:
        logger.warning(TINY_LABEL if args.preset == "tiny" else TINY_WAN_LABEL)
        defaults.update(TINY_GENERATION_DEFAULTS if args.preset == "tiny" else TINY_WAN_GENERATION_DEFAULTS)
    settings = _settings(args, defaults)
    cfg = fallback.guidance_scale if args.cfg is None else args.cfg
    fps = fallback.fps if args.fps is None else args.fps
    family_options: dict[str, object] = {}
    if args.dynamic_cfg:
        family_options["use_dynamic_cfg"] = True
    if args.reference_timestep is not None:
        family_options["reference_timestep"] = args.reference_timestep
    if args.eta != 0.0:
        family_options["eta"] = args.eta
    unsupported = sorted(set(family_options) - set(backbone.reference_options))
    if unsupported:
        flags = {"use_dynamic_cfg": "--dynamic-cfg", "reference_timestep": "--reference-timestep", "eta": "--eta"}
        raise SDVGenError(f"{', '.join(flags[o] for o in unsupported)} is not available for {backbone.label}")
    check_generation_settings(
        GenerationLimits.from_model_dir(model_dir), **settings, guidance_scale=cfg,
        reference_guidance_scale=args.reference_guidance, eta=args.eta, names=OPTION_NAMES,
    )
    check_float("--lora-strength", args.lora_strength, *LORA_STRENGTH_RANGE)
    check_int("--fps", fps, *FPS_RANGE)
    check_int("--seed", args.seed, *SEED_RANGE)
    device = resolve_device(args.device, "--device")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    acceleration = options_from_arguments(args)
    check_acceleration(with_options(AccelerationConfig(), **acceleration), device, resolve_dtype(precision))
    if args.lora is not None:
        check_lora_header(args.lora)
    elif args.fuse_lora:
        raise SDVGenError("--fuse-lora needs --lora (there is no LoRA to fuse)")
    return GenerationPlan(
        model_dir, backbone, settings, cfg, fps, family_options, device, precision, load_options, acceleration
    )


def _generate(args: argparse.Namespace) -> int:
    from .prompts import insert_cls
    from .reference import load_image, prepare_reference_image

    import torch

    started = time.perf_counter()
    # Everything the user typed is checked first; the model loads only when all of it is usable.
    plan = plan_generation(args)
    out = _check_output(args.out, args.overwrite)
    if not args.prompt.strip():
        raise SDVGenError("--prompt is empty; describe what the subject does")
    prompt = insert_cls(args.prompt, args.subject)
    reference = load_image(args.ref)
    mask = load_image(args.mask) if args.mask else None
    settings = plan.settings
    prepare_reference_image(reference, settings["height"], settings["width"], fit=args.fit, subject_mask=mask)

    pipe = plan.load_pipeline(args)
    logger.info("prompt: %s", prompt)
    logger.info(
        "%dx%d, %d frames, %d steps, cfg %s, %s on %s",
        settings["width"], settings["height"], settings["num_frames"], settings["num_inference_steps"],
        plan.guidance_scale, plan.precision, plan.device,
    )
    generator = torch.Generator("cpu").manual_seed(args.seed)
    latents = pipe(
        prompt, reference_image=reference, subject_mask=mask, generator=generator, output_type="latent",
        **plan.call_options(args),
    ).latents
    frames = pipe.decode(latents, tiled=args.tiled_decode)
    path = _write(frames[0], out, plan.fps, args.overwrite)
    if path != out:
        logger.warning("%s exists, so the video was written to %s (--overwrite replaces the file)", out, path)
    logger.info("wrote %s (%d frames, %.1f s)", path, frames.shape[1], time.perf_counter() - started)
    print(path)
    return 0


def _add_tiny_model(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tiny-model", help="write the tiny random demo model (diffusers layout) to a folder",
        description=f"Write the {TINY_LABEL}, e.g. into ComfyUI/models/CogVideo/ to try the nodes.",
    )
    p.add_argument("folder", help="destination folder (new or empty)")
    p.add_argument("--family", choices=["cogvideox", "wan22"], default="cogvideox",
                   help="architecture of the tiny model (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that already has files")


def _tiny_model(args: argparse.Namespace) -> int:
    from .presets import build_tiny_model
    from .wan_presets import build_tiny_wan_model

    folder = Path(args.folder)
    if folder.exists() and not folder.is_dir():
        raise SDVGenError(f"{args.folder!r} is a file; give a folder for the tiny model")
    if folder.is_dir() and any(folder.iterdir()) and not args.overwrite:
        raise SDVGenError(
            f"folder {args.folder!r} is not empty (a real model there would be replaced by random weights); "
            f"give a new folder, or --overwrite"
        )
    print((build_tiny_wan_model if args.family == "wan22" else build_tiny_model)(folder))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdvgen", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    _add_tiny_model(subparsers)
    from .evaluation.cli import add_evaluate_parser, run_evaluate

    add_evaluate_parser(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import torch

    try:
        if args.command == "evaluate":
            return run_evaluate(args)
        return _generate(args) if args.command == "generate" else _tiny_model(args)
    except SDVGenError as error:  # bad input: the message names it and what is expected
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:
        print("error: out of memory; try --memory-mode model_offload or sequential_offload, --tiled-decode, "
              "or a smaller --width/--height/--frames", file=sys.stderr)
        return 1
    except OSError as error:  # the machine, not the input: a full disk, a folder made read-only meanwhile...
        print(f"error: {_describe_os_error(error)}", file=sys.stderr)
        return 1


def _describe_os_error(error: OSError) -> str:
    where = f" {error.filename!r}" if error.filename else ""
    fix = {
        errno.ENOSPC: "free some disk space or write elsewhere (--out, SDVGEN_CACHE)",
        errno.EACCES: "check the folder's permissions or write elsewhere",
        errno.EROFS: "the file system is read-only: write elsewhere",
        errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    }.get(error.errno, "check the file and the disk")
    return f"cannot read or write{where}: {error.strerror or error}; {fix}"


if __name__ == "__main__":
    sys.exit(main())
