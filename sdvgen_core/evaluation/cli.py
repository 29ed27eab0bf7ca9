"""`sdvgen evaluate`: generate an eval set with any `sdvgen generate` settings, score it, report it."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import SDVGenError

logger = logging.getLogger("sdvgen.evaluate")

# `sdvgen generate` options that the eval set gives per video (or that name its one output file).
PER_VIDEO_OPTIONS = {"ref", "prompt", "subject", "mask", "out", "overwrite", "help"}


def _generate_parser() -> argparse.ArgumentParser:
    from ..cli import _add_generate

    subparsers = argparse.ArgumentParser(add_help=False).add_subparsers()
    _add_generate(subparsers)
    return subparsers.choices["generate"]


def add_generation_options(parser: argparse.ArgumentParser) -> list[str]:
    """Give `parser` every `sdvgen generate` option except the per-video ones; return their dest names.

    The option objects are taken from generate's own parser, so a new generate option (a backbone, a
    memory setting) is available here without being written twice. The model choice stays mutually
    exclusive but not required: comparing runs or scoring finished videos needs no model.
    """
    generate = _generate_parser()
    group = parser.add_argument_group("generation (as in `sdvgen generate`; --seed is the seed of every video "
                                      "whose set entry has none)")
    exclusive_of = {id(action): source for source in generate._mutually_exclusive_groups
                    for action in source._group_actions}
    copied_groups: dict[int, argparse._MutuallyExclusiveGroup] = {}
    names = []
    for action in generate._actions:
        if action.dest in PER_VIDEO_OPTIONS:
            continue
        source = exclusive_of.get(id(action))
        if source is None:
            group._add_action(action)
        else:
            if id(source) not in copied_groups:
                copied_groups[id(source)] = group.add_mutually_exclusive_group()
            copied_groups[id(source)]._add_action(action)
        names.append(action.dest)
    return names


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `sdvgen evaluate` (called from `sdvgen_core.cli.main`)."""
    p = subparsers.add_parser(
        "evaluate", help="generate an eval set and score it with the paper's metrics",
        description="Generate every (reference, prompt) video of an eval set (resumable), score CLIP-T, CLIP-I, "
                    "DINO-I, motion smoothness and dynamic degree, and write per_video.csv, summary.md, "
                    "metrics.json and contact_sheet.png into --out.",
    )
    p.add_argument("--set", dest="eval_set", help="eval set file (.yaml or .jsonl; see README > Evaluation)")
    p.add_argument("--out", help="run folder (videos, references, reports); rerun to resume")
    p.add_argument("--make-demo-set", metavar="DIR", help="write a 2-subject x 2-prompt demo set (and tiny random CLIP/DINO encoders in DIR/encoders) into DIR and stop")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="put two finished runs side by side (compare.md, compare.json, compare_sheet.png in --out)")
    p.add_argument("--metrics-only", action="store_true",
                   help="score the finished videos in --out without generating (no model needed)")
    encoders = p.add_argument_group("encoders (local files only; a metric whose encoder is not given is skipped)")
    encoders.add_argument("--clip", metavar="DIR", help="CLIP ViT-B/32 folder (openai/clip-vit-base-patch32): CLIP-T, CLIP-I")
    encoders.add_argument("--dino", metavar="DIR", help="DINO ViT-S/16 folder (facebook/dino-vits16): DINO-I")
    encoders.add_argument("--raft", metavar="FILE", help="torchvision RAFT weights (.safetensors): dynamic degree")
    encoders.add_argument("--amt", metavar="FILE", help="AMT-S weights (.safetensors, needs `vbench`): motion smoothness")
    encoders.add_argument("--metric-frames", type=int, default=16,
                          help="central frames scored by CLIP-T/CLIP-I/DINO-I (default: %(default)s)")
    p.set_defaults(generation_options=add_generation_options(p))


def _check_args(args: argparse.Namespace) -> None:
    if args.make_demo_set:
        return
    if not args.out:
        raise SDVGenError("--out is required (the run folder, or where --compare writes)")
    if args.compare:
        return
    if not args.eval_set:
        raise SDVGenError("--set is required: the eval set file (make one with --make-demo-set DIR)")
    if not args.metrics_only and not (args.model or args.preset):
        raise SDVGenError("give --model DIR or --preset tiny to generate (or --metrics-only to score finished videos)")
    if args.metric_frames < 1:
        raise SDVGenError(f"--metric-frames must be at least 1; got {args.metric_frames}")


def _load_scorers(args: argparse.Namespace, device):
    from .metrics import ClipScorer, DinoScorer, load_amt, load_raft
    from .report import Scorers

    return Scorers(
        clip=ClipScorer(args.clip, device) if args.clip else None,
        dino=DinoScorer(args.dino, device) if args.dino else None,
        flow=load_raft(args.raft, device) if args.raft else None,
        interpolate=load_amt(args.amt, device) if args.amt else None,
        metric_frames=args.metric_frames,
    )


def _check_encoder_files(args: argparse.Namespace) -> None:
    """Fail on a wrong encoder path before any video is generated."""
    from .metrics import EncoderLoadError, check_encoder_folder

    for option, what in (("clip", "CLIP"), ("dino", "DINO")):
        if getattr(args, option):
            check_encoder_folder(getattr(args, option), what)
    for option, what in (("raft", "RAFT weights"), ("amt", "AMT-S weights")):
        path = getattr(args, option)
        if path and (not Path(path).is_file() or Path(path).suffix != ".safetensors"):
            raise EncoderLoadError(f"{what} {path!r} must be an existing .safetensors file (--{option})")


def run_evaluate(args: argparse.Namespace) -> int:
    """Returns 0 when every video was generated and scored, 2 when some failed (listed by name)."""
    import torch

    from .evalset import load_eval_set, make_demo_set
    from ..cli import plan_generation
    from ..validation import resolve_device
    from .generation import GenerationResult, generate_videos, generation_settings, pipeline_generator, read_sidecar
    from .report import compare_runs, score_run, summarize, write_contact_sheet, write_reports

    _check_args(args)
    if args.make_demo_set:
        print(make_demo_set(args.make_demo_set))
        return 0
    if args.compare:
        result = compare_runs(*args.compare, args.out)
        print((Path(args.out) / "compare.md").read_text())
        logger.info("wrote compare.md, compare.json, compare_sheet.png in %s (%d shared videos)", args.out, result["videos"])
        return 0
    eval_set = load_eval_set(args.eval_set)
    _check_encoder_files(args)
    out_dir = Path(args.out)
    device = resolve_device(args.device, "--device")
    if args.metrics_only:
        generation = GenerationResult()
        finished = [read_sidecar(out_dir, video.video_id) for video in eval_set.videos]
        finished = [record for record in finished if record is not None]
        if not finished:
            raise SDVGenError(f"--metrics-only: {out_dir} holds no finished video of {eval_set.path}")
        settings = finished[0]["settings"]  # the settings the videos were made with, for the reports
    else:
        plan = plan_generation(args)
        settings = generation_settings(args, args.generation_options, plan)
        generator = pipeline_generator(args, plan)
        generation = generate_videos(eval_set, out_dir, generator, settings, base_seed=args.seed, fps=plan.fps)
        del generator  # frees the pipeline before the encoders load
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("generated %d, already finished %d, failed %d (%.1f s)", len(generation.generated),
                    len(generation.skipped), len(generation.failed), generation.seconds)
    scorers = _load_scorers(args, device)
    rows = score_run(eval_set, out_dir, scorers, generation.failed)
    summary = summarize(rows)
    meta = {"eval_set": str(eval_set.path.resolve()), "cls_placement": eval_set.cls_placement, "settings": settings,
            "metric_frames": args.metric_frames, "skipped": scorers.skipped(),
            "encoders": {name: getattr(args, name) for name in ("clip", "dino", "raft", "amt")},
            "generation_seconds": round(generation.seconds, 1)}
    write_reports(out_dir, rows, summary, meta)
    write_contact_sheet(out_dir, rows, settings["width"] / settings["height"])
    print((out_dir / "summary.md").read_text())
    failed = [row for row in rows if row["status"] != "ok"]
    for row in failed:
        print(f"error: {row['video_id']}: {row['status']}", file=sys.stderr)
    return 2 if failed else 0
