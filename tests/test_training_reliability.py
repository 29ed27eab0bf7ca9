"""Trainer reliability: earlier runs are never overwritten, resume keeps `latest` on its lineage, cache files are
atomic and verified, and bad input is refused before any model loads, with one line and exit code 2."""

from __future__ import annotations

import csv
import errno
import json
import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from test_training import TINY_CONFIG, config_for, demo, demo_overrides  # noqa: F401 (module fixture)
from training.__main__ import main as training_cli
from training.batches import TrainingCache
from training.cachefiles import META_FILE, CacheFileError, read_item, read_meta, write_meta
from training.config import ConfigError, load_config
from training.data import DataError
from training.export import run_export
from training.prepare import BROKEN_REDONE, STALE_SET_ASIDE, run_prepare
from training.rundir import OutputDirError
from training.trainer import Trainer

QUICK = ["monitor.every=0", "train.seed=44", "task.p_video=0.5", "train.checkpoint_every=1"]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Make any model load fail loudly: what is refused must be refused before the expensive part."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was refused")

    monkeypatch.setattr("training.trainer.load_transformer", forbidden)
    monkeypatch.setattr("training.export.load_transformer", forbidden)


def cli_args(demo, tiny_model_dir, run: str, *overrides: str) -> list[str]:
    root, _ = demo
    sets = [*demo_overrides(root, tiny_model_dir, run), *QUICK, *overrides]
    return ["--config", str(TINY_CONFIG), *(a for o in sets for a in ("--set", o))]


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """Copies: safetensors may map the file, which the tests then damage or replace."""
    return {key: value.clone() for key, value in load_file(path).items()}


def train_step(path: Path) -> int:
    with safe_open(str(path), "pt") as handle:
        return int(handle.metadata()["sdvgen.train_step"])


def logged_steps(run: Path) -> list[int]:
    with (run / "train_log.csv").open() as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


# --- class 5: outputs are never overwritten or lost -----------------------------------------------------------


def test_rerun_is_refused_and_overwrite_moves_the_earlier_run_aside(demo, tiny_model_dir, monkeypatch, capsys):
    root, _ = demo
    run = root / "rerun"
    Trainer(config_for(demo, tiny_model_dir, "rerun", *QUICK, "train.max_steps=1")).train()
    first = tensors_of(run / "sdvgen_lora.safetensors")

    with monkeypatch.context() as patch:
        patch.setattr("training.trainer.load_transformer", lambda *a: pytest.fail("loaded before refusing"))
        with pytest.raises(OutputDirError, match=r"rerun'? already holds a run \(checkpoints, sdvgen_lora"):
            Trainer(config_for(demo, tiny_model_dir, "rerun", *QUICK, "train.max_steps=2"))
        assert training_cli(["train", *cli_args(demo, tiny_model_dir, "rerun", "train.max_steps=2")]) == 2
        message = capsys.readouterr().err
        assert "train.resume=latest" in message and "--overwrite" in message and str(run) in message
        with pytest.raises(OutputDirError, match="cannot be combined"):
            Trainer(config_for(demo, tiny_model_dir, "rerun", *QUICK, "train.resume=latest"), overwrite=True)
    for key, value in tensors_of(run / "sdvgen_lora.safetensors").items():
        assert torch.equal(value, first[key])

    assert training_cli(["train", *cli_args(demo, tiny_model_dir, "rerun", "train.max_steps=2"), "--overwrite"]) == 0
    (archive,) = run.glob("replaced-*")
    for key, value in tensors_of(archive / "sdvgen_lora.safetensors").items():  # the earlier run, intact
        assert torch.equal(value, first[key])
    assert [p.name for p in (archive / "checkpoints").iterdir()] == ["step-000001"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert logged_steps(run) == [1, 2] and logged_steps(archive) == [1]


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(demo, tiny_model_dir, tmp_path, monkeypatch):
    root, _ = demo
    run = root / "lineage"
    Trainer(config_for(demo, tiny_model_dir, "lineage", *QUICK, "train.max_steps=3")).train()
    abandoned_lora = tensors_of(run / "checkpoints" / "step-000003" / "sdvgen_lora.safetensors")

    # a changed adapter shape is refused before anything loads, naming both values
    with monkeypatch.context() as patch:
        patch.setattr("training.trainer.load_transformer", lambda *a: pytest.fail("loaded before refusing"))
        with pytest.raises(OutputDirError, match=r"lora.rank is 8 but checkpoint .*step-000003.* with 16"):
            Trainer(config_for(demo, tiny_model_dir, "lineage", *QUICK, "train.resume=latest", "lora.rank=8"))
        with pytest.raises(OutputDirError, match=r"lora.alpha is 4.0 but .* with 8.0"):
            Trainer(config_for(demo, tiny_model_dir, "lineage", *QUICK, "train.resume=latest", "lora.alpha=4"))
        with pytest.raises(OutputDirError, match=r"train.resume: .*nowhere.* is not a checkpoint folder"):
            Trainer(config_for(demo, tiny_model_dir, "lineage", *QUICK, f"train.resume={tmp_path / 'nowhere'}"))

    older = run / "checkpoints" / "step-000001"
    resumed = Trainer(config_for(demo, tiny_model_dir, "lineage", *QUICK, "train.max_steps=2",
                                 "train.seed=45", f"train.resume={older}"))
    resumed.train()
    (aside,) = (run / "checkpoints").glob("abandoned-after-step-000001-*")
    assert sorted(p.name for p in aside.iterdir()) == ["sdvgen_lora.safetensors", "step-000002", "step-000003",
                                                       "train_log.csv"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")) == [
        "step-000001", "step-000002"]
    assert logged_steps(run) == [1, 2] and logged_steps(aside) == [1, 2, 3]  # no duplicated steps in the log
    for key, value in tensors_of(aside / "step-000003" / "sdvgen_lora.safetensors").items():
        assert torch.equal(value, abandoned_lora[key])

    # export `latest` follows the resumed run (its step 2, drawn with another seed), not the abandoned step 3
    config = config_for(demo, tiny_model_dir, "lineage")
    latest = tensors_of(run_export(config, "latest", tmp_path / "latest.safetensors", "fp32"))
    assert train_step(tmp_path / "latest.safetensors") == 2
    new_step2 = tensors_of(run_export(config, str(run / "checkpoints" / "step-000002"), tmp_path / "new.safetensors",
                                      "fp32"))
    old_step2 = tensors_of(run_export(config, str(aside / "step-000002"), tmp_path / "old.safetensors", "fp32"))
    assert latest.keys() == new_step2.keys() and all(torch.equal(latest[k], new_step2[k]) for k in latest)
    assert any(not torch.equal(latest[k], old_step2[k]) for k in latest)


def test_resume_latest_without_checkpoints_does_not_start_over_an_earlier_run(demo, tiny_model_dir, no_model_loads):
    root, _ = demo
    run = root / "lost-checkpoints"
    (run / "checkpoints").mkdir(parents=True)
    (run / "sdvgen_lora.safetensors").write_bytes(b"an earlier run's LoRA")
    (run / "train_log.csv").write_text("step,task,loss,lr,step_seconds\n1,identity,0.5,0.001,0.1\n")
    with pytest.raises(OutputDirError, match=r"no complete checkpoint .* holds an earlier run"):
        Trainer(config_for(demo, tiny_model_dir, "lost-checkpoints", *QUICK, "train.resume=latest"))
    # a checkpoint of another run, resumed into a folder that holds its own run, would mix two lineages
    other = root / "other-run" / "checkpoints" / "step-000001"
    other.mkdir(parents=True)
    (other / "trainer_state.json").write_text('{"step": 1, "batches": {}}')
    with pytest.raises(OutputDirError, match="checkpoint of another run"):
        Trainer(config_for(demo, tiny_model_dir, "lost-checkpoints", *QUICK, f"train.resume={other}"))
    assert (run / "sdvgen_lora.safetensors").read_bytes() == b"an earlier run's LoRA"


def test_half_written_checkpoints_are_never_latest(demo, tiny_model_dir, tmp_path):
    """A kill during a checkpoint leaves `step-N.partial` or a folder without trainer state: both are skipped;
    steps sort numerically past 999999."""
    from training.rundir import find_checkpoint

    checkpoints = tmp_path / "checkpoints"
    for name, complete in (("step-000002", True), ("step-000003.partial", True), ("step-000004", False),
                           ("step-1000000", True), ("step-999999", True)):
        (checkpoints / name).mkdir(parents=True)
        if complete:
            (checkpoints / name / "trainer_state.json").write_text("{}")
    assert find_checkpoint(tmp_path, "latest").name == "step-1000000"
    shutil.rmtree(checkpoints / "step-1000000")
    assert find_checkpoint(tmp_path, "latest").name == "step-999999"


def test_export_and_demo_data_never_overwrite(demo, tiny_model_dir, tmp_path, no_model_loads, capsys):
    root, _ = demo
    existing = tmp_path / "mine.safetensors"
    existing.write_bytes(b"someone's LoRA")
    config = config_for(demo, tiny_model_dir, "never-trained")
    with pytest.raises(ConfigError, match=r"mine.safetensors'? already exists.*--overwrite"):
        run_export(config, "latest", existing, "fp32")
    with pytest.raises(ConfigError, match="is a folder"):
        run_export(config, "latest", tmp_path, "fp32")
    assert training_cli(["export", *cli_args(demo, tiny_model_dir, "never-trained"), "-o", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"someone's LoRA"

    data = tmp_path / "my-clips"
    (data / "videos").mkdir(parents=True)
    (data / "videos" / "clip00.mp4").write_bytes(b"a real clip")
    assert training_cli(["make-demo-data", "--root", str(data)]) == 2
    assert "already holds videos/" in capsys.readouterr().err
    assert (data / "videos" / "clip00.mp4").read_bytes() == b"a real clip"


# --- class 6: caches and small files are atomic and verified ---------------------------------------------------


@pytest.fixture
def cache_copy(demo, tmp_path) -> Path:
    root, _ = demo
    return Path(shutil.copytree(root / "cache", tmp_path / "cache"))


def test_full_disk_leaves_the_old_meta_and_a_one_line_error(cache_copy, demo, tiny_model_dir, monkeypatch, capsys):
    before = (cache_copy / META_FILE).read_text()
    real_write = pathlib.Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2])  # the disk fills up halfway through the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left") as caught:
        write_meta(cache_copy, {"complete": True})
    assert caught.value.filename == str(cache_copy / META_FILE)
    args = cli_args(demo, tiny_model_dir, "x", f"data.cache_dir={cache_copy}")
    assert training_cli(["prepare", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: No space left on device") and "meta.json" in err[-1]
    assert "free disk space" in err[-1] and "Traceback" not in "\n".join(err)
    monkeypatch.undo()
    assert (cache_copy / META_FILE).read_text() == before  # never a 0-byte or half meta.json
    assert not list(cache_copy.glob(".*.tmp"))


def test_damaged_meta_json_names_the_file(cache_copy, demo, tiny_model_dir, capsys):
    for content in ("", '{"height": 6', "[1, 2]"):
        (cache_copy / META_FILE).write_text(content)
        with pytest.raises(CacheFileError, match=r"meta.json'? is damaged .*delete it and re-run"):
            read_meta(cache_copy)
    args = cli_args(demo, tiny_model_dir, "x", f"data.cache_dir={cache_copy}", "train.mixed_precision=no")
    assert training_cli(["train", *args]) == 2
    assert "meta.json' is damaged" in capsys.readouterr().err


def test_train_names_broken_cache_files_and_prepare_redoes_them(cache_copy, demo, tiny_model_dir):
    config = config_for(demo, tiny_model_dir, "x", f"data.cache_dir={cache_copy}")
    meta = read_meta(cache_copy)
    assert meta["complete"] is True and meta["item_shapes"]["video"]["frames"] == [9, 16, 8, 12]
    identity = sorted((cache_copy / "identity").glob("*.safetensors"))
    videos = sorted((cache_copy / "video").glob("*.safetensors"))
    good = {p: tensors_of(p) for p in (identity[0], videos[0], videos[1])}
    # the shapes recorded in meta.json are the shapes `prepare` really wrote
    assert list(good[videos[0]]["frames.mean"].shape) == meta["item_shapes"]["video"]["frames"]
    assert list(good[identity[0]]["view0.mean"].shape) == meta["item_shapes"]["identity"]["view0"]

    truncated = identity[0]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(CacheFileError, match=rf"{truncated.name}.*not a readable safetensors.*re-run `python -m "
                                             rf"training prepare`"):
        TrainingCache(config)
    videos[0].write_bytes(b"")  # a 0-byte file from a full disk
    left_over = cache_copy / "identity" / "pair-removed-source-00000000-0000001.safetensors"
    shutil.copy(identity[1], left_over)  # cached from a source the config no longer names
    wrong = dict(good[videos[1]])
    wrong["frames.mean"] = wrong["frames.mean"][:5]
    save_file(wrong, videos[1])

    skips = run_prepare(config)
    assert skips[BROKEN_REDONE] == 3 and skips[STALE_SET_ASIDE] == 1
    assert not left_over.exists() and (cache_copy / "stale" / "identity" / left_over.name).is_file()
    for path, tensors in good.items():
        redone = load_file(path)
        assert redone.keys() == tensors.keys()
        for key, value in tensors.items():
            torch.testing.assert_close(redone[key], value, atol=1e-5, rtol=1e-5)  # encoding is deterministic
    cache = TrainingCache(config)
    assert {path.name for path, _ in cache.identity + cache.held_identity} == {p.name for p in identity}
    assert json.loads((cache_copy / "report-rank0.json").read_text())[BROKEN_REDONE] == 3

    # values garbled on disk (same size, header intact) are caught when the item is read
    tensors = tensors_of(videos[0])
    tensors["text"][0, 0] = float("nan")
    save_file(tensors, videos[0])
    with pytest.raises(CacheFileError, match=rf"{videos[0].name}.*non-finite values in text"):
        read_item(videos[0])


def test_interrupted_prepare_is_not_trained_on(cache_copy, demo, tiny_model_dir, no_model_loads):
    meta = read_meta(cache_copy)
    write_meta(cache_copy, meta | {"complete": False})
    with pytest.raises(DataError, match=r"`prepare` did not finish the cache"):
        Trainer(config_for(demo, tiny_model_dir, "x", f"data.cache_dir={cache_copy}"))


# --- classes 4 and 8: every value checked before anything loads, one line, exit code 2 --------------------------


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1e-4", "optim.lr must be > 0"),
    ("optim.lr=.nan", "optim.lr must be a finite number"),
    ("optim.max_grad_norm=.inf", "optim.max_grad_norm must be a finite number"),
    ("data.identity.min_quality=.nan", "min_quality must be a finite number"),
    ("optim.betas=[0.9,1.5]", "optim.betas must be two numbers in"),
    ("optim.scheduler=cosine_annealing", "optim.scheduler must be one of"),
    ("optim.num_cycles=0", "optim.num_cycles must be >= 1"),
    ("train.identity_batch=3", "train.identity_batch=3 must be divisible by train.gradient_accumulation"),
    ("train.video_batch=0", "train.video_batch must be >= 1"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.seed=-1", "train.seed must be in"),
    ("train.max_steps=-5", "train.max_steps must be positive"),
    ("train.mixed_precision=fp8", "train.mixed_precision must be"),
    ("model.dtype=int8", "model.dtype must be"),
    ("task.p_view_drop=1.5", "task.p_view_drop must be in"),
    ("lora.rank=0", "lora.rank must be >= 1"),
    ("lora.dropout=1", r"lora.dropout must be in \[0, 1\)"),
    ("lora.target_modules=[]", "lora.target_modules must be a non-empty"),
    ("data.height=0", "data.height must be >= 16"),
    ("monitor.video_batch=0", "monitor.video_batch must be >= 1"),
    ("validation.num_inference_steps=0", "validation.num_inference_steps must be >= 1"),
    ("validation.guidance_scale=-1", "validation.guidance_scale must be >= 0"),
])
def test_bad_values_are_refused_by_name(override, message, capsys):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY_CONFIG, [override]).validate()
    assert training_cli(["train", "-c", str(TINY_CONFIG), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unwritable_output_folder_is_one_line(demo, tiny_model_dir, tmp_path, monkeypatch, no_model_loads, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = cli_args(demo, tiny_model_dir, "x", f"train.output_dir={blocker / 'run'}", "train.mixed_precision=no")
    assert training_cli(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "train.output_dir" in err and "a-file/run" in err and "not writable" in err and err.count("\n") == 1

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("training.rundir.tempfile.TemporaryFile", read_only)
    with pytest.raises(ConfigError, match=r"train.output_dir .* is not writable \(Read-only file system\)"):
        Trainer(config_for(demo, tiny_model_dir, "read-only", *QUICK))


def test_damaged_or_finished_checkpoints_are_refused_before_loading(demo, tiny_model_dir, tmp_path, no_model_loads):
    root, _ = demo
    run = root / "finished"
    checkpoint = run / "checkpoints" / "step-000003"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"step": 3, "consumed": {"identity": 2, "video": 1}}')
    with pytest.raises(OutputDirError, match=r"at step 3, train.max_steps is 3: nothing to train"):
        Trainer(config_for(demo, tiny_model_dir, "finished", *QUICK, "train.max_steps=3", "train.resume=latest"))
    (checkpoint / "trainer_state.json").write_text('{"step": 3, "batches": {"identity": 2, "video": 1}}')
    with pytest.raises(OutputDirError, match=r"written by an earlier sdvgen.*python -m training export"):
        Trainer(config_for(demo, tiny_model_dir, "finished", *QUICK, "train.resume=latest"))
    (checkpoint / "trainer_state.json").write_text("")
    with pytest.raises(OutputDirError, match=r"trainer_state.json'? is damaged .*train.resume=<its folder>"):
        Trainer(config_for(demo, tiny_model_dir, "finished", *QUICK, "train.resume=latest"))


def test_inputs_read_late_are_checked_before_models_load(demo, tiny_model_dir, tmp_path, no_model_loads, capsys):
    missing = tmp_path / "missing.png"
    with pytest.raises(DataError, match=r"validation reference .*missing.png.*does not exist"):
        Trainer(config_for(demo, tiny_model_dir, "validate", *QUICK, "validation.every=1",
                           f"validation.references=[{missing}]", "validation.prompts=[a <cls>]"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert training_cli(["prepare", *cli_args(demo, tiny_model_dir, "x", f"data.cache_dir={blocker / 'cache'}")]) == 2
    err = capsys.readouterr().err
    assert "data.cache_dir" in err and "not writable" in err and err.count("\n") == 1


def test_full_disk_while_checkpointing_keeps_the_last_good_one(demo, tiny_model_dir, monkeypatch, capsys):
    from training.rundir import find_checkpoint

    root, _ = demo
    trainer = Trainer(config_for(demo, tiny_model_dir, "disk-full", *QUICK, "train.max_steps=2"))
    save_state = trainer.accelerator.save_state

    def fills_the_disk(folder, **kwargs):
        if trainer.state.step == 2:
            monkeypatch.setattr("training.rundir.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return save_state(folder, **kwargs)

    monkeypatch.setattr(trainer.accelerator, "save_state", fills_the_disk)
    with pytest.raises(OSError, match=r"could not write the checkpoint \(the disk is full\); the last complete "
                                      r"checkpoint is .*step-000001") as caught:
        trainer.train()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename.endswith("step-000002.partial")
    assert find_checkpoint(root / "disk-full", "latest").name == "step-000001"
    from training.__main__ import describe_os_error

    assert "free disk space" in describe_os_error(caught.value)


def test_logs_and_videos_after_the_resumed_step_are_set_aside(tmp_path):
    """A killed run logs steps after its last checkpoint; resuming must not log them twice. The gradient
    monitor logs step N before its update, train_log after it."""
    from training.rundir import abandon_newer

    (tmp_path / "train_log.csv").write_text("step,task,loss\n1,identity,0.5\n2,video,0.4\n3,identity,0.3\n")
    (tmp_path / "grad_monitor.csv").write_text("step,cosine\n0,0.1\n2,0.2\n")
    for step in (2, 3):
        video = tmp_path / "validation" / f"step-{step:06d}-ref0.mp4"
        video.parent.mkdir(exist_ok=True)
        video.write_bytes(b"mp4 %d" % step)
    assert abandon_newer(tmp_path, 3) is None  # everything logged belongs to the run up to step 3
    folder = abandon_newer(tmp_path, 2)
    assert logged_steps(tmp_path) == [1, 2] and logged_steps(folder) == [1, 2, 3]
    assert (tmp_path / "grad_monitor.csv").read_text().split() == ["step,cosine", "0,0.1"]
    assert (folder / "grad_monitor.csv").read_text().split() == ["step,cosine", "0,0.1", "2,0.2"]
    assert [p.name for p in (tmp_path / "validation").iterdir()] == ["step-000002-ref0.mp4"]
    assert (folder / "validation" / "step-000003-ref0.mp4").read_bytes() == b"mp4 3"
