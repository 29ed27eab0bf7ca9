"""The run folder (`train.output_dir`): a new run never mixes into an earlier one, and `latest` stays on the
lineage that was resumed.

Rules (checked before any model loads):
- a folder holding an earlier run is refused unless the run resumes it (`train.resume=latest` or one of its
  checkpoints) or `--overwrite` is given, which moves the earlier run into `replaced-<UTC time>/` inside it;
- resuming an older checkpoint moves the newer ones (and a newer final LoRA and validation videos) into
  `checkpoints/abandoned-after-step-N-<UTC time>/`, so `latest` and `export` follow the resumed run;
- `train_log.csv` and `grad_monitor.csv` rows after the resumed step (also those a killed run wrote after
  its last checkpoint) are cut, so no step is logged twice; the full logs are copied to the abandoned folder;
- a changed LoRA rank, alpha or target modules on resume is refused, naming both values.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from sdvgen_core.files import atomic_write_text

from .config import Config, ConfigError

logger = logging.getLogger(__name__)

LORA_FILE = "sdvgen_lora.safetensors"  # the exported LoRA (core writer: folded alpha, diffusers-loadable)
STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "step-"
TRAIN_LOG = "train_log.csv"
MONITOR_LOG = "grad_monitor.csv"
# What a run writes into its folder; any of them present means the folder holds a run.
RUN_OUTPUTS = ("checkpoints", LORA_FILE, TRAIN_LOG, "config.yaml", "logs", MONITOR_LOG, "grad_monitor.png",
               "validation")


class OutputDirError(ConfigError):
    """The output folder and the requested run do not fit together."""


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix(CHECKPOINT_PREFIX))


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints with their trainer state (written last, inside the renamed folder), oldest first by step."""
    found = [c for c in (output_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*[0-9]")
             if c.name.removeprefix(CHECKPOINT_PREFIX).isdigit() and (c / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def find_checkpoint(output_dir: Path, which: str) -> Path | None:
    """`latest` -> the newest complete checkpoint (or None); otherwise the named folder."""
    if which != "latest":
        path = Path(which)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a checkpoint folder (no {STATE_FILE})")
        return path
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def earlier_run_outputs(output_dir: Path) -> list[str]:
    """Names of run outputs already in the folder (empty `checkpoints/` or `logs/` folders do not count)."""
    found = []
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def check_writable(folder: Path, option: str) -> None:
    """Create `folder` and write a probe file in it; `ConfigError` naming the option when that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(f"{option} {str(folder)!r} is not writable ({error.strerror or error}): "
                          f"fix its permissions or choose another folder") from None


@dataclass
class RunPlan:
    """What `train` does with the output folder: start fresh, replace an earlier run, or resume a checkpoint."""

    checkpoint: Path | None = None  # checkpoint to resume
    replace_earlier: bool = False  # move the earlier run aside first (--overwrite)


def plan_run(config: Config, overwrite: bool = False) -> RunPlan:
    """Check the output folder against `train.resume` and `--overwrite`; read-only, every rank may call it."""
    output_dir = Path(config.train.output_dir)
    resume = config.train.resume
    earlier = earlier_run_outputs(output_dir)
    ways = (f"continue it with --set train.resume=latest, or start a new run with another train.output_dir or "
            f"--overwrite (moves the earlier run into {str(output_dir / 'replaced-<time>')!r})")
    if overwrite and resume:
        raise OutputDirError("--overwrite starts a new run; it cannot be combined with train.resume")
    if not resume:
        if earlier and not overwrite:
            raise OutputDirError(f"train.output_dir {str(output_dir)!r} already holds a run ({', '.join(earlier)}): "
                                 f"{ways}")
        return RunPlan(replace_earlier=bool(earlier))
    try:
        checkpoint = find_checkpoint(output_dir, resume)
    except FileNotFoundError as error:
        raise OutputDirError(f"train.resume: {error}; use `latest` or a step-NNNNNN folder") from None
    if checkpoint is None:
        if earlier:
            raise OutputDirError(
                f"train.resume=latest: no complete checkpoint in {str(output_dir / 'checkpoints')!r}, but the folder "
                f"holds an earlier run ({', '.join(earlier)}); restore its checkpoints, or start over with "
                f"another train.output_dir or --overwrite")
        logger.info("no checkpoint in %s: starting fresh", output_dir)
        return RunPlan()
    own = checkpoint.resolve().parent == (output_dir / "checkpoints").resolve()
    if not own and earlier:
        raise OutputDirError(f"train.resume={resume!r} is a checkpoint of another run, but train.output_dir "
                             f"{str(output_dir)!r} holds its own run ({', '.join(earlier)}): use a new train.output_dir")
    step = checkpoint_state(checkpoint)["step"]
    if step >= config.train.max_steps:
        raise OutputDirError(f"checkpoint {str(checkpoint)!r} is at step {step}, train.max_steps is "
                             f"{config.train.max_steps}: nothing to train; raise train.max_steps to continue, or "
                             f"write its LoRA with `python -m training export`")
    check_lora_unchanged(config, checkpoint)
    return RunPlan(checkpoint=checkpoint)


def checkpoint_state(checkpoint: Path) -> dict:
    """The checkpoint's trainer state; a damaged or outdated one names the file and the way out."""
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise _damaged(path, error) from None
    if isinstance(state, dict) and "batches" in state and "consumed" not in state:
        raise OutputDirError(
            f"{str(path)!r} was written by an earlier sdvgen, which counted batches rather than the items each "
            f"task consumed, so it cannot be resumed exactly; write its LoRA with `python -m training export "
            f"--checkpoint {str(checkpoint)!r}`, or start a new run in another train.output_dir"
        )
    try:
        return {"step": int(state["step"]), "consumed": {k: int(v) for k, v in state["consumed"].items()}}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise _damaged(path, error) from None


def _damaged(path: Path, error: Exception) -> OutputDirError:
    return OutputDirError(f"{str(path)!r} is damaged ({type(error).__name__}: {error}): resume an earlier "
                          f"checkpoint with --set train.resume=<its folder>")


def check_lora_unchanged(config: Config, checkpoint: Path) -> None:
    """The adapter's shape and scale cannot change on resume: refuse naming both values."""
    header = read_header(checkpoint / LORA_FILE)
    saved = {"lora.rank": int(header["sdvgen.rank"]), "lora.alpha": float(header["sdvgen.alpha"]),
             "lora.target_modules": sorted(json.loads(header["sdvgen.target_modules"]))}
    wanted = {"lora.rank": config.lora.rank, "lora.alpha": float(config.lora.alpha),
              "lora.target_modules": sorted(config.lora.target_modules)}
    for option, value in saved.items():
        if wanted[option] != value:
            raise OutputDirError(f"{option} is {wanted[option]} but checkpoint {str(checkpoint)!r} was trained with "
                                 f"{value}: resume with --set {option}={json.dumps(value).replace(' ', '')}, "
                                 f"or start a new run")


def read_header(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise OutputDirError(f"{str(path)!r} is not a readable safetensors file ({error}); the checkpoint is "
                             f"damaged: resume an earlier one") from None


LOW_DISK_BYTES = 256 << 20


def checkpoint_write_error(error: Exception, staging: Path) -> Exception:
    """An `OSError` naming the checkpoint, the likely cause and the last good checkpoint; other errors unchanged."""
    if isinstance(error, RuntimeError) and "writ" not in str(error).lower():
        return error  # not an I/O failure: a bug, keep its traceback
    full = shutil.disk_usage(staging.parent).free < LOW_DISK_BYTES
    good = find_checkpoint(staging.parent.parent, "latest")
    code = errno.ENOSPC if full else getattr(error, "errno", None) or errno.EIO
    cause = "the disk is full" if full else str(error)
    last = f"the last complete checkpoint is {str(good)!r}" if good else "no complete checkpoint was written yet"
    return OSError(code, f"could not write the checkpoint ({cause}); {last}", str(staging))


def utc_stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def replace_earlier_run(output_dir: Path) -> Path:
    """`--overwrite`: move the earlier run's outputs into `replaced-<time>/` (a rename: nothing is deleted)."""
    archive = output_dir / f"replaced-{utc_stamp()}"
    archive.mkdir()
    for name in earlier_run_outputs(output_dir):
        (output_dir / name).rename(archive / name)
    logger.warning("--overwrite: the earlier run in %s was moved to %s (delete it when no longer needed)",
                   output_dir, archive)
    return archive


# CSV logs whose first column is a step, and the offset that makes a row belong to the run resumed at step N
# when `row step + offset <= N`: train_log rows come after step N's update, gradient-monitor rows before it.
CSV_LOGS = {TRAIN_LOG: 0, MONITOR_LOG: 1}


def abandon_newer(output_dir: Path, step: int) -> Path | None:
    """After resuming step `step`: set aside newer checkpoints, a newer final LoRA, newer validation videos and
    later log rows (the full logs are copied), so the folder holds one lineage; returns the folder used."""
    newer = [c for c in complete_checkpoints(output_dir) if checkpoint_step(c) > step]
    final = output_dir / LORA_FILE
    if final.is_file() and _lora_step(final) > step:
        newer.append(final)
    newer += [video for video in sorted((output_dir / "validation").glob(f"{CHECKPOINT_PREFIX}*.mp4"))
              if int(video.name.split("-")[1]) > step]
    cut = {name: _rows_after(output_dir / name, step - offset) for name, offset in CSV_LOGS.items()}
    if not newer and not any(cut.values()):
        return None
    folder = output_dir / "checkpoints" / f"abandoned-after-step-{step:06d}-{utc_stamp()}"
    folder.mkdir(parents=True)
    for path in newer:
        target = folder / "validation" / path.name if path.parent.name == "validation" else folder / path.name
        target.parent.mkdir(exist_ok=True)
        path.rename(target)
    for name, rows in cut.items():
        if rows:
            log = output_dir / name
            shutil.copy2(log, folder / name)
            header, *kept = list(csv.reader(io.StringIO(log.read_text())))
            out = io.StringIO()
            csv.writer(out).writerows([header, *(row for row in kept if not _after(row, step - CSV_LOGS[name]))])
            atomic_write_text(log, out.getvalue())
    moved = [p.name for p in newer] + [f"{rows} rows of {name}" for name, rows in cut.items() if rows]
    logger.warning("resumed step %d: the newer run (%s) was moved to %s", step, ", ".join(moved), folder)
    return folder


def _lora_step(path: Path) -> int:
    try:
        return int(read_header(path).get("sdvgen.train_step", "-1"))
    except (OutputDirError, ValueError):
        return 1 << 62  # unreadable: treat as newer, so it is set aside rather than trusted


def _rows_after(log: Path, step: int) -> int:
    if not log.is_file():
        return 0
    rows = list(csv.reader(io.StringIO(log.read_text())))[1:]
    return sum(1 for row in rows if _after(row, step))


def _after(row: list[str], step: int) -> bool:
    return bool(row) and row[0].isdigit() and int(row[0]) > step
