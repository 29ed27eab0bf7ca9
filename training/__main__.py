"""`python -m training {prepare,train,export,plot-monitor}` from the repository root (launch through accelerate
for GPUs)."""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from sdvgen_core.errors import SDVGenError

from .config import ConfigError, load_config
from .data import DataError

USAGE_EXAMPLES = """examples:
  python -m training make-demo-data --root demo        # tiny model + generated media for tiny_cpu.yaml
  python -m training make-demo-data --root demo-wan --family wan22   # the same for tiny_wan_cpu.yaml
  python -m training prepare --config training/configs/tiny_cpu.yaml
  accelerate launch --config_file training/accelerate/multi_gpu.yaml -m training train \\
      --config training/configs/paper_cogvideox5b.yaml --set optim.lr=1e-4 --set train.resume=latest
  python -m training train -c training/configs/paper_cogvideox5b.yaml -c training/configs/ablations/tab3_image_only.yaml
  python -m training export --config training/configs/paper_cogvideox5b.yaml --checkpoint latest -o lora.safetensors
  python -m training plot-monitor runs/dual runs/image-only -o fig5_vs_fig9.png
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training", description="SDV-Gen dual-task LoRA fine-tuner",
                                     epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("make-demo-data", help="write a tiny random model and synthetic training media")
    demo.add_argument("--root", default="demo", help="folder to fill (default: demo, as tiny_cpu.yaml expects)")
    demo.add_argument("--overwrite", action="store_true", help="rewrite the demo media in a folder that holds files")
    demo.add_argument("--family", default="cogvideox", choices=("cogvideox", "wan22"),
                      help="tiny model to build: cogvideox (for tiny_cpu.yaml) or wan22 (for tiny_wan_cpu.yaml)")
    plot = commands.add_parser("plot-monitor", help="overlay the gradient monitors of one or more runs in one PNG")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="train.output_dir of each run")
    plot.add_argument("--output", "-o", required=True, help="PNG file to write")
    for name, help_text in (("prepare", "cache VAE latents and T5 embeddings (resumable, split across ranks)"),
                            ("train", "train the LoRA on the prepared cache"),
                            ("export", "write a checkpoint's LoRA to a standalone file")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", "-c", action="append", metavar="CONFIG.yaml",
                             help="YAML config (see training/configs/); repeat to apply overlays on top, e.g. "
                                  "-c paper_cogvideox5b.yaml -c ablations/tab6_no_cls.yaml; defaults if omitted")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                             help="override one option, e.g. --set optim.lr=1e-4 (repeatable)")
        if name == "train":
            command.add_argument("--overwrite", action="store_true",
                                 help="start afresh in an output folder holding an earlier run (it is moved into "
                                      "replaced-<time>/ there, not deleted)")
        if name == "export":
            command.add_argument("--checkpoint", default="latest", help="checkpoint folder or `latest` (default)")
            command.add_argument("--output", "-o", required=True, help="LoRA file to write (.safetensors)")
            command.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
            command.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "plot-monitor":
        from .monitor import MonitorError, plot_monitor

        try:
            print(plot_monitor(args.run_dirs, args.output))
        except MonitorError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    try:
        if args.command == "make-demo-data":
            from .demo import make_demo_data

            print(make_demo_data(args.root, overwrite=args.overwrite, family=args.family))
            return 0
        config = load_config(args.config, args.overrides)
        config.validate()
        if args.command == "prepare":
            from .prepare import run_prepare

            run_prepare(config)
        elif args.command == "train":
            from .trainer import run_train

            print(run_train(config, overwrite=args.overwrite))
        else:
            from .export import run_export

            print(run_export(config, args.checkpoint, args.output, args.dtype, overwrite=args.overwrite))
    except (ConfigError, DataError, SDVGenError, FileNotFoundError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # full disk, read-only or vanished folders: the environment, not a bug
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # `train` saves a checkpoint on the first Ctrl-C; this is `prepare` or a second one
        if args.command not in ("prepare", "train"):
            raise
        print(f"interrupted: run the same `{args.command}` command again to continue (finished work is kept)",
              file=sys.stderr)
        return 130
    return 0


def describe_os_error(error: OSError) -> str:
    """One line naming the file and the likely fix."""
    where = f" ({error.filename})" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space or point train.output_dir / data.cache_dir / --output to another disk, then run again"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the folder writable or choose another train.output_dir / data.cache_dir / --output"
    else:
        fix = "check the path and the disk, then run again"
    return f"{error.strerror or error}{where}: {fix}"


if __name__ == "__main__":
    sys.exit(main())
