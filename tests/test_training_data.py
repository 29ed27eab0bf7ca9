"""Trainer config, data sources and samplers (no model needed)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdvgen_core.lora import LORA_TARGET_MODULES
from sdvgen_core.video import write_mp4
from training.batches import (
    IDENTITY,
    VIDEO,
    BatchStream,
    TaskSampler,
    check_batch_sizes,
    jitter_offsets,
    reference_frames,
    reference_keep_indices,
    seeded_subset,
    slot_starts,
)
from training.config import Config, ConfigError, load_config
from training.data import (
    SUBJECTS200K_BOXES,
    ClipTooShort,
    DataError,
    Shard,
    SkipCounter,
    _open_composite,
    caption_sources,
    decode_clip,
    jsonl_pair_records,
    subjects200k_records,
    video_records,
)
from training.demo import write_subjects200k

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


# What the authors' run did (shared/spec/authors-training-run.md), option by option.
RUN_RECIPE = {
    "lora.dropout": 0.0, "task.p_video": 0.2, "task.task_draw": "per_rank", "task.reference_drop": "image",
    "task.p_reference_drop": 0.5, "task.p_view_drop": 0.0, "task.reference_frame": "every_9th",
    "task.video_conditioning": "i2v", "task.schedule": "dual", "data.identity.jitter_px": 0,
    "data.identity.cls_placement": "prefix", "data.video.cls_placement": "none", "data.cls_token": True,
    "data.identity.max_pairs": 0, "data.video.max_clips": 0, "train.seed": 42, "optim.weight_decay": 1e-4,
    "optim.lr": 5e-5, "optim.betas": [0.9, 0.95], "optim.eps": 1e-8, "optim.warmup_steps": 200,
    "optim.max_grad_norm": 1.0, "monitor.pcgrad": False,
}


def _option(config: Config, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("source", ["defaults", "paper_cogvideox5b.yaml", "single_gpu_24gb.yaml"])
def test_defaults_and_shipped_recipes_reproduce_the_run(source):
    config = load_config(None if source == "defaults" else CONFIGS / source)
    assert {key: _option(config, key) for key in RUN_RECIPE} == RUN_RECIPE


def test_paper_config_is_the_recipe():
    config = load_config(CONFIGS / "paper_cogvideox5b.yaml")
    config.validate()
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (128, 64, 0.0)
    assert tuple(config.lora.target_modules) == LORA_TARGET_MODULES
    assert (config.optim.lr, config.optim.betas, config.optim.warmup_steps) == (5e-5, [0.9, 0.95], 200)
    assert (config.optim.scheduler, config.optim.max_grad_norm) == ("cosine_with_restarts", 1.0)
    train = config.train
    assert (train.max_steps, train.identity_batch, train.video_batch, train.checkpoint_every) == (4000, 256, 32, 50)
    assert (train.mixed_precision, train.allow_tf32, train.gradient_checkpointing) == ("bf16", True, True)
    assert (config.data.height, config.data.width, config.data.video.fps, config.data.video.num_frames) == (480, 720, 8, 49)
    assert check_batch_sizes(config, 8) == {IDENTITY: 8, VIDEO: 1}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_validate(name):
    load_config(CONFIGS / name).validate()


def test_overrides_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: m}\noptim: {lr: 1.0e-3}\n")
    config = load_config(path, ["optim.lr=1e-4", "optim.betas=[0.8, 0.9]", "train.gradient_checkpointing=false",
                                "data.identity.subjects200k=a.parquet,b.parquet", "task.p_video=0"])
    assert config.optim.lr == 1e-4 and config.optim.betas == [0.8, 0.9]
    assert config.train.gradient_checkpointing is False
    assert config.data.identity.subjects200k == ["a.parquet", "b.parquet"]
    assert config.task.p_video == 0.0
    with pytest.raises(ConfigError, match="unknown option optim.learning_rate"):
        load_config(path, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="train.max_steps must be int"):
        load_config(path, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="num_frames must be 4k\\+1"):
        load_config(path, ["data.video.num_frames=48"]).validate()
    with pytest.raises(ConfigError, match="divisible"):
        check_batch_sizes(load_config(path, ["train.video_batch=3"]), 2)
    with pytest.raises(ConfigError, match="task.p_token_drop was renamed: use task.p_reference_drop"):
        load_config(path, ["task.p_token_drop=0.5"])
    with pytest.raises(ConfigError, match="monitor.pcgrad needs task.task_draw=global"):
        load_config(path, ["monitor.pcgrad=true"]).validate()
    with pytest.raises(ConfigError, match="task.reference_frame must be every_9th, uniform or first"):
        load_config(path, ["task.reference_frame=random"]).validate()


def test_overlays_change_only_what_they_name(tmp_path):
    base, overlay = tmp_path / "base.yaml", tmp_path / "overlay.yaml"
    base.write_text("model: {path: m}\ntask: {p_video: 0.3, p_view_drop: 0.25}\noptim: {betas: [0.8, 0.9]}\n")
    overlay.write_text("task: {p_video: 0.0}\noptim: {betas: [0.9, 0.99]}\n")
    config = load_config([base, overlay], ["task.p_view_drop=0.5"])
    assert config.task.p_video == 0.0 and config.optim.betas == [0.9, 0.99]  # overlay wins, lists replace
    assert config.model.path == "m" and config.task.p_view_drop == 0.5  # base kept; --set applies last
    assert load_config([overlay, base]).task.p_video == 0.3  # order matters


ABLATIONS = sorted((CONFIGS / "ablations").glob("*.yaml"))


@pytest.mark.parametrize("base", ["paper_cogvideox5b.yaml", "single_gpu_24gb.yaml", "tiny_cpu.yaml"])
def test_every_ablation_overlay_validates_on_every_recipe(base):
    assert len(ABLATIONS) >= 14
    for overlay in ABLATIONS:
        config = load_config([CONFIGS / base, overlay])
        config.validate()
        assert config != load_config(CONFIGS / base) or overlay.stem in ("tab3_dual_task", "tab4_pairs_full"), overlay
    t2v = load_config([CONFIGS / base, CONFIGS / "ablations" / "tab7_t2v_only.yaml"]).task
    assert (t2v.reference_drop, t2v.p_reference_drop, t2v.p_view_drop) == ("image", 1.0, 0.0)
    two_stage = load_config([CONFIGS / base, CONFIGS / "ablations" / "tab3_two_stage.yaml"])
    assert two_stage.two_stage_switch_step == two_stage.train.max_steps // 2


def test_subjects200k_layout(tmp_path):
    parquet = write_subjects200k(tmp_path / "s.parquet", rows=4, low_quality_every=4)
    skips = SkipCounter()
    identity_config = load_config(overrides=[f"data.identity.subjects200k=[{parquet}]"]).data.identity
    records = list(subjects200k_records(identity_config, skips))
    assert len(records) == 3 and skips["below quality threshold"] == 1
    record = records[0]
    # the run's identity caption: "<cls> " + the target view's description
    assert record.captions == ("<cls> A mug on a wooden table, seen from the left.",
                               "<cls> A mug in the garden, seen from above.")
    by_word = load_config(overrides=[f"data.identity.subjects200k=[{parquet}]",
                                     "data.identity.cls_placement=subject_word"]).data.identity
    assert next(subjects200k_records(by_word, SkipCounter())).captions[0] == \
        "A <cls> mug on a wooden table, seen from the left."
    view0, view1 = record.load_views()
    assert view0.size == view1.size == (512, 512)
    # A composite with a distinct colour in each box checks the crop boxes themselves.
    canvas = Image.new("RGB", (1056, 528), (255, 255, 255))
    for color, box in zip(((255, 0, 0), (0, 0, 255)), SUBJECTS200K_BOXES):
        canvas.paste(Image.new("RGB", (512, 512), color), box[:2])
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    left, right = _open_composite(buffer.getvalue())
    assert left.getextrema() == ((255, 255), (0, 0), (0, 0)) and right.getextrema() == ((0, 0), (0, 0), (255, 255))
    # Two ranks split the file by row group (2 rows each): disjoint, together everything, skips counted once.
    shard_skips = [SkipCounter(), SkipCounter()]
    shards = [[r.key for r in subjects200k_records(identity_config, shard_skips[rank], Shard(rank, 2))]
              for rank in (0, 1)]
    assert len(shards[0]) == 2 and len(shards[1]) == 1 and not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(r.key for r in records)
    assert shard_skips[0]["below quality threshold"] + shard_skips[1]["below quality threshold"] == 1
    # The fourth row fails only on compositeStructure: a lower threshold or a key list without it keeps it.
    for override in ("data.identity.min_quality=3", "data.identity.quality_keys=[objectConsistency,imageQuality]"):
        lenient = load_config(overrides=[f"data.identity.subjects200k=[{parquet}]", override])
        assert len(list(subjects200k_records(lenient.data.identity, SkipCounter()))) == 4


def test_jsonl_pairs_and_video_captions(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"reference": "r.png", "target": "t.png", "caption": "A red mug on a desk.", "subject": "mug"})
        + "\n{not json\n" + json.dumps({"reference": "r.png", "caption": "missing target"}) + "\n"
    )
    skips = SkipCounter()
    config = load_config(overrides=[f"data.identity.pairs_jsonl=[{tmp_path / 'pairs.jsonl'}]"])
    records = list(jsonl_pair_records(config.data.identity, skips))
    assert [r.captions for r in records] == [(None, "<cls> A red mug on a desk.")]
    assert skips["bad JSONL line"] == 2
    by_word = dataclasses.replace(config.data.identity, cls_placement="subject_word")
    assert next(jsonl_pair_records(by_word, SkipCounter())).captions == (None, "A red <cls> mug on a desk.")

    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a", "b", "c"):
        (videos / f"{name}.mp4").write_bytes(b"")
    (videos / "a.txt").write_text("A dog runs.")
    (tmp_path / "captions.csv").write_text("file,caption\nb.mp4,A cat sleeps.\n")
    config = load_config(overrides=[f"data.video.folders=[{videos}]", f"data.video.captions={tmp_path / 'captions.csv'}"])
    skips = SkipCounter()
    found = {r.path.name: r.caption for r in video_records(config.data.video, skips)}
    assert found == {"a.mp4": "A dog runs.", "b.mp4": "A cat sleeps."}  # the run: no <cls> on videos
    assert skips["no caption"] == 1
    prefixed = dataclasses.replace(config.data.video, cls_placement="prefix")
    assert {r.caption for r in video_records(prefixed, SkipCounter())} == {"<cls> A dog runs.", "<cls> A cat sleeps."}
    # Tab. 6: the switch removes <cls> everywhere, whatever the placements say
    switched = load_config(overrides=["data.cls_token=false", "data.video.cls_placement=prefix",
                                      f"data.identity.pairs_jsonl=[{tmp_path / 'pairs.jsonl'}]",
                                      f"data.video.folders=[{videos}]"])
    identity_source, video_source = caption_sources(switched.data)
    assert next(jsonl_pair_records(identity_source, SkipCounter())).captions == (None, "A red mug on a desk.")
    assert "<cls>" not in "".join(r.caption for r in video_records(video_source, SkipCounter()))


def _counter_clip(path: Path, frames: int, fps: int, height: int, width: int) -> Path:
    """Frame k is a flat grey of brightness 8k, so decoded frames tell which source frame they came from."""
    values = torch.arange(frames, dtype=torch.float32) * 8 / 255
    return write_mp4(values.view(-1, 1, 1, 1).expand(frames, 3, height, width).contiguous(), path, fps=fps)


def _late_start_clip(path: Path, frames: int, fps: int, start_seconds: int) -> Path:
    """Like `_counter_clip`, but its timestamps begin at `start_seconds` (as after a stream-copy cut)."""
    import av
    import numpy as np

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 8 * k, np.uint8), format="rgb24")
            frame.pts = start_seconds * fps + k
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_decode_clip_counts_time_from_the_first_frame(tmp_path):
    clip = _late_start_clip(tmp_path / "late.mp4", frames=24, fps=16, start_seconds=2)
    import av

    with av.open(str(clip)) as container:
        assert next(container.decode(video=0)).time >= 1.9  # the file really starts late
    frames = decode_clip(clip, fps=8, num_frames=9, height=32, width=32)
    assert (frames.mean(dim=(1, 2, 3)) * 255 / 8).round().tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 16]


def test_decode_clip_resamples_and_fits(tmp_path):
    clip = _counter_clip(tmp_path / "c.mp4", frames=24, fps=16, height=96, width=160)
    frames = decode_clip(clip, fps=8, num_frames=9, height=48, width=48)
    assert frames.shape == (9, 3, 48, 48)
    source_index = (frames.mean(dim=(1, 2, 3)) * 255 / 8).round()
    assert source_index.tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    with pytest.raises(ClipTooShort):
        decode_clip(clip, fps=8, num_frames=13, height=48, width=48)
    slow = _counter_clip(tmp_path / "slow.mp4", frames=6, fps=4, height=64, width=64)
    repeated = (decode_clip(slow, fps=8, num_frames=9, height=32, width=32).mean(dim=(1, 2, 3)) * 255 / 8).round()
    assert repeated.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]


def _binomial_ok(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_task_switch_frequency_and_rank_agreement():
    config = load_config(overrides=["task.p_video=0.2"])
    sampler, other_rank = TaskSampler(config), TaskSampler(config)
    draws = [sampler.task(step) for step in range(20000)]
    assert _binomial_ok(draws.count(VIDEO), 20000, 0.2)
    assert draws == [other_rank.task(step) for step in range(20000)]
    # no long-range pattern: each half of the run has the same rate
    assert _binomial_ok(draws[10000:].count(VIDEO), 10000, 0.2)
    assert all(t == IDENTITY for t in map(TaskSampler(load_config(overrides=["task.p_video=0"])).task, range(1000)))
    two_stage = TaskSampler(load_config(overrides=["task.schedule=two_stage", "task.two_stage_switch_step=10"]))
    assert [two_stage.task(s) for s in range(12)] == [IDENTITY] * 10 + [VIDEO] * 2
    assert [two_stage.task(9, slot) for slot in range(4)] == [IDENTITY] * 4  # a stage covers every slot


def test_task_draw_global_and_per_rank_across_two_ranks():
    """Two ranks (slots 0 and 1 of a step): `global` gives both the same task; `per_rank` draws each on its own,
    so about 2p(1-p) of the steps mix both tasks in one synchronised update; each slot is video with rate p.
    A slot's task depends only on (seed, step, slot): 1 rank x 2 accumulation steps draws what 2 ranks do."""
    steps, p = 10000, 0.2
    draws = {}
    for mode in ("global", "per_rank"):
        config = load_config(overrides=[f"task.task_draw={mode}", f"task.p_video={p}"])
        rank0, rank1 = TaskSampler(config), TaskSampler(config)  # one sampler per simulated process
        draws[mode] = [(rank0.task(step, 0), rank1.task(step, 1)) for step in range(steps)]
        assert [tuple(TaskSampler(config).step_tasks(step, 2)) for step in range(100)] == draws[mode][:100]
    assert all(a == b for a, b in draws["global"])
    mixed = sum(a != b for a, b in draws["per_rank"])
    assert _binomial_ok(mixed, steps, 2 * p * (1 - p))
    for slot in (0, 1):
        assert _binomial_ok(sum(pair[slot] == VIDEO for pair in draws["per_rank"]), steps, p)
    # the two slots are independent: P(both video) = p^2
    assert _binomial_ok(sum(pair == (VIDEO, VIDEO) for pair in draws["per_rank"]), steps, p * p)


def test_slots_of_a_step_read_consecutive_items_of_their_task():
    micro = {IDENTITY: 4, VIDEO: 1}
    starts = slot_starts([IDENTITY, VIDEO, IDENTITY, VIDEO], micro, {IDENTITY: 40, VIDEO: 7})
    assert starts == [40, 7, 44, 8]
    # all slots on one task: exactly the old "global batch b, slot s" positions
    assert slot_starts([IDENTITY] * 4, micro, {IDENTITY: 16, VIDEO: 0}) == [16 + 4 * s for s in range(4)]


def test_whole_reference_drop_rate_and_never_partial():
    generator = torch.Generator().manual_seed(0)
    draws = [reference_keep_indices(1350, "image", 0.5, generator) for _ in range(4000)]
    dropped = [d for d in draws if d is not None]
    assert all(d.numel() == 0 for d in dropped)  # whole reference or nothing, never a partial set
    assert _binomial_ok(len(dropped), 4000, 0.5)
    assert all(reference_keep_indices(1350, "image", 1.0, generator).numel() == 0 for _ in range(50))
    assert all(reference_keep_indices(1350, "image", 0.0, generator) is None for _ in range(50))
    dropped_at_02 = sum(reference_keep_indices(8, "image", 0.2, generator) is not None for _ in range(4000))
    assert _binomial_ok(dropped_at_02, 4000, 0.2)


def test_token_drop_rate():
    generator = torch.Generator().manual_seed(0)
    kept = sum(len(reference_keep_indices(1350, "token", 0.5, generator)) for _ in range(200))
    assert _binomial_ok(1350 * 200 - kept, 1350 * 200, 0.5)
    indices = reference_keep_indices(100, "token", 0.3, generator)
    assert indices.unique().numel() == indices.numel() and int(indices.max()) < 100
    assert reference_keep_indices(100, "token", 0.0, generator) is None


def test_reference_frames_every_9th_uniform_and_first():
    generator = torch.Generator().manual_seed(0)
    frames = reference_frames(49, 60000, "every_9th", generator)
    counts = torch.bincount(frames, minlength=49)
    assert counts.nonzero().flatten().tolist() == [0, 9, 18, 27, 36, 45]  # only these, each of them
    chosen = counts[[0, 9, 18, 27, 36, 45]].float()
    assert ((chosen - 10000) ** 2 / 10000).sum().item() < 30  # chi-square, 5 dof: mean 5, sd ~3.2
    assert reference_frames(25, 3000, "every_9th", generator).unique().tolist() == [0, 9, 18]

    frames = reference_frames(49, 49000, "uniform", generator)
    counts = torch.bincount(frames, minlength=49).float()
    chi_square = ((counts - 1000) ** 2 / 1000).sum().item()
    assert chi_square < 100  # 48 dof: mean 48, sd ~9.8
    assert reference_frames(49, 100, "first", generator).eq(0).all()

    offsets = jitter_offsets(2, 5000, generator)
    assert offsets.min() == 0 and offsets.max() == 4
    assert _binomial_ok(int(offsets.eq(2).sum()), offsets.numel(), 0.2)


def test_subsets_are_seeded_nested_and_bounded():
    files = [Path(f"item{i:04d}") for i in range(1000)]
    small, large = (seeded_subset(files, n, 42, "data.identity.max_pairs", "pairs") for n in (200, 400))
    assert len(small) == 200 and len(large) == 400 and set(small) <= set(large)
    assert small == sorted(small)  # original order kept
    assert seeded_subset(files, 200, 42, "x", "pairs") == small  # same seed, same subset
    other = seeded_subset(files, 200, 7, "x", "pairs")
    assert other != small and 10 < len(set(other) & set(small)) < 80  # ~40 expected by chance
    assert seeded_subset(files, 0, 42, "x", "pairs") == files
    with pytest.raises(DataError, match="data.identity.max_pairs=1001 asks for more pairs than the 1000"):
        seeded_subset(files, 1001, 42, "data.identity.max_pairs", "pairs")


def test_batch_stream_partitions_global_batches():
    stream = BatchStream(list(range(10)), seed=3, salt=0)
    # 2 ranks x 2 accumulation steps x micro 2 = global batch 8
    batch0 = [stream.micro_batch(0, 8, a, r, 2, 2) for a in range(2) for r in range(2)]
    flat = [x for part in batch0 for x in part]
    assert len(set(flat)) == 8
    epoch = flat + [x for a in range(2) for r in range(2) for x in stream.micro_batch(1, 8, a, r, 2, 2)][:2]
    assert sorted(epoch) == list(range(10))  # one epoch covers every item once
    # the same partition from one rank with 4 accumulation steps
    single = [x for a in range(4) for x in stream.micro_batch(0, 8, a, 0, 1, 2)]
    assert single == flat


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "multi_node", "deepspeed_zero2", "fsdp"])
def test_shipped_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS.parent / "accelerate" / f"{name}.yaml"))
    expected = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "multi_node": "MULTI_GPU",
                "deepspeed_zero2": "DEEPSPEED", "fsdp": "FSDP"}[name]
    assert config.distributed_type.value == expected
    if name == "fsdp":
        assert config.fsdp_config["fsdp_use_orig_params"] is True
    if name == "multi_node":
        assert config.num_machines == 2


def test_cli_reports_bad_setups_without_a_traceback(tmp_path, capsys):
    from training.__main__ import main

    # mixed_precision=no: accelerate's process-wide state must match the other tests' Accelerators
    assert main(["train", "--set", "model.path=m", "--set", f"data.cache_dir={tmp_path / 'none'}",
                 "--set", f"train.output_dir={tmp_path / 'run'}", "--set", "train.mixed_precision=no"]) == 2
    assert "no prepared cache" in capsys.readouterr().err
    assert main(["prepare", "--set", "model.path=m", "--set", f"data.video.folders=[{tmp_path / 'missing'}]"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--set", "optim.lr=fast"]) == 2
    assert "optim.lr must be float" in capsys.readouterr().err


def test_readme_documents_every_option():
    import dataclasses
    import re

    from training.config import Config

    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
                yield from leaves(f.default_factory, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    readme = (CONFIGS.parent / "README.md").read_text()
    table = readme[readme.index("## All options"):]
    documented = set(re.findall(r"`([a-z_]+(?:\.[a-z0-9_]+)+)`", table))
    assert len(set(leaves(Config))) > 50 and set(leaves(Config)) <= documented, sorted(set(leaves(Config)) - documented)


def _fake_run(folder: Path, config_overrides: list[str], norm_scale: float, pcgrad: bool = False) -> Path:
    """A run folder as `train` leaves it: resolved config.yaml and grad_monitor.csv (norms spanning decades)."""
    from training.config import save_config

    folder.mkdir(parents=True)
    save_config(load_config(overrides=config_overrides), folder / "config.yaml")
    groups = ("attention", "embedding", "mlp", "norm")
    header = ["step", "cosine", "norm_identity", "norm_video"]
    header += [f"{g}/{k}" for g in groups for k in ("cosine", "norm_identity", "norm_video")]
    header += ["pcgrad_projections"] if pcgrad else []
    lines = [",".join(header)]
    for index, step in enumerate(range(0, 101, 20)):
        decay = norm_scale / (1 + index) ** 2
        values = [step, 0.6 / (1 + index), 10 * decay, decay] + [0.1, decay, decay / 2] * len(groups)
        values += [index] if pcgrad else []
        lines.append(",".join(str(v) for v in values))
    (folder / "grad_monitor.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_plot_monitor_overlays_runs_with_settings_and_log_norms(tmp_path, capsys):
    from training.__main__ import main
    from training.monitor import monitor_figure

    dual = _fake_run(tmp_path / "dual", [], 1.0)
    image_only = _fake_run(tmp_path / "image-only", ["task.p_video=0"], 50.0)
    pcgrad = _fake_run(tmp_path / "pcgrad", ["monitor.pcgrad=true", "task.task_draw=global",
                                             "monitor.pcgrad_buffer=8"], 1.0, pcgrad=True)
    figure = monitor_figure([dual, image_only, pcgrad])
    axes = figure.axes
    assert len(axes) == 2 * 5  # all parameters + 4 groups, cosine | norms
    title = figure._suptitle.get_text()
    assert "dual: p_video 0.2 (per_rank draw), ref drop image p=0.5, ref frame every_9th" in title
    assert "image-only: p_video 0.0" in title and "PCGrad buffer 8" in title
    assert "5 PCGrad projections by step 100" in title
    cosine_axis, norm_axis = axes[0], axes[1]
    assert len(cosine_axis.lines) == 3 + 1  # one curve per run + the zero line
    assert len(norm_axis.lines) == 3 * 2  # identity and video per run
    assert norm_axis.get_yscale() == "log" and cosine_axis.get_yscale() == "linear"
    assert [line.get_xdata()[-1] for line in cosine_axis.lines[:3]] == [100, 100, 100]  # final step drawn
    import matplotlib.pyplot as plt

    plt.close(figure)
    # the CLI writes the PNG; a folder without a monitor record is named, exit code 2
    out = tmp_path / "overlay.png"
    assert main(["plot-monitor", str(dual), str(image_only), "-o", str(out)]) == 0
    assert Image.open(out).size[0] >= 1000
    assert main(["plot-monitor", str(dual), str(tmp_path), "-o", str(out)]) == 2
    assert f"{str(tmp_path)!r} has no grad_monitor.csv" in capsys.readouterr().err


def test_norms_within_a_decade_stay_linear():
    from training.monitor import _use_log_scale

    assert not _use_log_scale([1.0, 2.0, 9.9]) and _use_log_scale([0.1, 1.0]) and not _use_log_scale([])


def test_training_reads_images_as_a_photo_viewer_shows_them(tmp_path):
    """A 16-bit gradient keeps its values (not clipped to white) and EXIF rotation is applied, as at inference."""
    from training.data import _open_image

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))  # 64 wide, 32 high
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # uint16 -> a 16-bit PNG
    read = np.asarray(_open_image(tmp_path / "deep.png"))
    assert read.shape == (32, 64, 3) and read.dtype == np.uint8
    np.testing.assert_array_equal(read[0, :, 0], np.round(ramp[0] / 257.0).astype(np.uint8))

    upright = Image.new("RGB", (40, 20), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 20, 20))  # red left half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    upright.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    shown = _open_image(tmp_path / "rotated.jpg")
    assert shown.size == (20, 40)
    top, bottom = np.asarray(shown)[5, 10], np.asarray(shown)[35, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200  # the red half is on top after the turn
