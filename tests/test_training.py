"""The fine-tuner end to end on the tiny model: prepare, train, resume, DDP, gradient monitor, export."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from training.__main__ import main as training_cli
from training.batches import IDENTITY, VIDEO, StepRules, TaskSampler, TrainingCache, step_generator
from training.config import load_config
from training.data import DataError
from training.demo import make_demo_data
from training.monitor import LAYER_GROUPS, PCGradBuffer
from training.prepare import run_prepare
from training.trainer import Trainer, v_prediction_loss

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "training" / "configs" / "tiny_cpu.yaml"
# seed 44 with p_video 0.5 draws identity, video, video, identity: both tasks, and PCGrad has an image gradient
RUN_OVERRIDES = ["train.seed=44", "task.p_video=0.5", "train.max_steps=4", "train.checkpoint_every=0",
                 "monitor.every=2", "monitor.pcgrad=true", "monitor.pcgrad_buffer=2", "task.task_draw=global"]


def demo_overrides(root: Path, model_dir: Path, run: str) -> list[str]:
    return [
        f"model.path={model_dir}",
        f"data.cache_dir={root / 'cache'}",
        f"data.identity.subjects200k=[{root / 'subjects200k'}]",
        f"data.identity.pairs_jsonl=[{root / 'pairs' / 'pairs.jsonl'}]",
        f"data.video.folders=[{root / 'videos'}]",
        f"train.output_dir={root / run}",
        "data.identity.jitter_px=8",  # the tests' cache covers the crop-jitter option (the recipe has none)
    ]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_model_dir):
    """Generated media (4 parquet rows, one below the quality bar; 1 good and 1 corrupt JSONL pair;
    3 good clips, one corrupt, one uncaptioned) and the skip counts of preparing them."""
    root = make_demo_data(tmp_path_factory.mktemp("train-demo"), subjects200k_rows=4, pairs=1, videos=3,
                          build_model=False)
    skips = run_prepare(load_config(TINY_CONFIG, demo_overrides(root, tiny_model_dir, "prepare")))
    return root, skips


def config_for(demo, tiny_model_dir, run: str, *overrides: str):
    root, _ = demo
    return load_config(TINY_CONFIG, [*demo_overrides(root, tiny_model_dir, run), *overrides])


def lora_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items() if "lora_" in k}


def test_prepare_caches_and_skips_bad_inputs(demo, tiny_model_dir):
    root, skips = demo
    assert skips == {"below quality threshold": 1, "unreadable identity": 1, "unreadable video": 1, "no caption": 1}
    identity = sorted((root / "cache" / "identity").glob("*.safetensors"))
    videos = sorted((root / "cache" / "video").glob("*.safetensors"))
    assert len(identity) == 4 and len(videos) == 3
    subjects = next(p for p in identity if p.name.startswith("s200k-"))
    tensors = load_file(subjects)
    # 64x96 training size plus an 8-px jitter margin on every side, in latent pixels
    assert tensors["view0.mean"].shape == (16, 10, 14) and tensors["text.1"].shape == (226, 32)
    assert set(tensors) == {"view0.mean", "view0.std", "view1.mean", "view1.std", "text.0", "text.1"}
    assert "text.0" not in load_file(next(p for p in identity if p.name.startswith("pair-")))  # one direction
    with safe_open(str(subjects), "pt") as handle:  # the run's caption: "<cls> " + description
        assert json.loads(handle.metadata()["captions"])[0].startswith("<cls> A mug")
    clip = load_file(videos[0])
    assert clip["video.mean"].shape == (3, 16, 8, 12)  # 9 frames -> 3 latent frames
    assert clip["frames.mean"].shape == (9, 16, 8, 12)  # every frame alone, for the random reference frame
    meta = json.loads((root / "cache" / "meta.json").read_text())
    assert meta["cls"]["sdvgen.cls_token"] == "<cls>" and meta["num_frames"] == 9

    # resumable: finished items are kept, a missing one is redone
    stamps = {p: p.stat().st_mtime_ns for p in identity + videos}
    videos[0].unlink()
    run_prepare(config_for(demo, tiny_model_dir, "prepare"))
    assert videos[0].is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != videos[0])
    # a cache made with other settings is refused, not silently mixed
    with pytest.raises(DataError, match=r"prepared with other settings \(height"):
        run_prepare(config_for(demo, tiny_model_dir, "prepare", "data.height=48"))


def test_empty_video_set_fails_before_work(tmp_path, tiny_model_dir, demo):
    (tmp_path / "no-videos").mkdir()
    config = config_for(demo, tiny_model_dir, "x", f"data.video.folders=[{tmp_path / 'no-videos'}]",
                        f"data.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(DataError, match="no usable video clips.*task.p_video=0.2"):
        run_prepare(config)
    assert not (tmp_path / "cache" / "meta.json").exists()


def test_end_to_end_cli_lora_loads_and_changes_output(demo, tiny_model_dir, tmp_path):
    from diffusers import CogVideoXPipeline

    from sdvgen_core.lora import load_lora
    from sdvgen_core.pipeline import SDVGenPipeline

    root, _ = demo
    args = ["--config", str(TINY_CONFIG)] + [a for o in demo_overrides(root, tiny_model_dir, "e2e") for a in ("--set", o)]
    args += ["--set", "train.max_steps=3", "--set", "monitor.every=0"]
    assert training_cli(["train", *args]) == 0
    exported = tmp_path / "exported.safetensors"
    assert training_cli(["export", *args, "--output", str(exported), "--dtype", "fp32"]) == 0

    run = root / "e2e"
    assert len((run / "train_log.csv").read_text().splitlines()) == 4  # header + 3 steps
    assert list((run / "logs").rglob("events.out.tfevents.*"))  # TensorBoard
    assert (run / "checkpoints" / "step-000003" / "sdvgen_lora.safetensors").is_file()
    with safe_open(str(exported), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["sdvgen.cls_token"] == "<cls>" and metadata["sdvgen.train_step"] == "3"
    assert json.loads(metadata["sdvgen.recipe"])["lora"]["rank"] == 16

    torch.manual_seed(0)
    latents, text = torch.randn(1, 2, 16, 8, 12), torch.randn(1, 226, 32)
    timestep = torch.tensor([500])
    ours = SDVGenPipeline.from_model_dir(tiny_model_dir, dtype="fp32")
    with torch.no_grad():
        before = ours.transformer(latents, text, timestep, return_dict=False)[0]
        info = load_lora(ours.transformer, exported)
        after = ours.transformer(latents, text, timestep, return_dict=False)[0]
    assert info.rank == 16 and info.alpha_source == "sdvgen"
    assert (after - before).abs().max() > 1e-4

    stock = CogVideoXPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    stock.load_lora_weights(str(exported), adapter_name="trained")
    with torch.no_grad():
        rope = ours.transformer.rotary_embeddings(2, 8, 12, "cpu")  # the stock model takes RoPE from its pipeline
        diffusers_out = stock.transformer(latents, text, timestep, image_rotary_emb=rope, return_dict=False)[0]
    torch.testing.assert_close(diffusers_out, after, atol=1e-5, rtol=1e-4)


def test_overfits_one_fixed_batch(demo, tiny_model_dir):
    config = config_for(demo, tiny_model_dir, "overfit", "lora.dropout=0", "optim.scheduler=constant",
                        "optim.warmup_steps=0", "optim.lr=1e-2", "monitor.every=0", "optim.weight_decay=0")
    trainer = Trainer(config)
    rules = StepRules.from_config(config, view_drop=False)
    batch = trainer._batch(IDENTITY, 0, rules, step_generator(0, 0, "sample", 0))
    losses = []
    for _ in range(60):
        loss = v_prediction_loss(trainer.model, trainer.noise_scheduler, batch, torch.Generator().manual_seed(1))
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        losses.append(loss.item())
    # The tiny model's un-adapted proj_out maps width 32 to 64 outputs, so part of any target is out of the
    # LoRA's reach: the floor is well above zero, and halving the loss means the LoRA fitted the batch.
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert all(later < earlier for earlier, later in zip(losses[::10], losses[10::10]))


def _stop_after(trainer: Trainer, steps: int) -> None:
    """Deliver SIGINT to ourselves once `steps` steps are done, like Ctrl-C in a terminal."""
    step = trainer.train_step

    def wrapped():
        result = step()
        if trainer.state.step == steps:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    trainer.train_step = wrapped


def test_signal_checkpoint_and_exact_resume(demo, tiny_model_dir):
    tasks = TaskSampler(config_for(demo, tiny_model_dir, "x", *RUN_OVERRIDES))
    assert {tasks.task(s) for s in range(4)} == {IDENTITY, VIDEO}

    straight = Trainer(config_for(demo, tiny_model_dir, "straight", *RUN_OVERRIDES))
    projections = []
    project = straight.pcgrad.project

    def counted(gradient):
        projected, changed = project(gradient)
        projections.append(changed)
        return projected, changed

    straight.pcgrad.project = counted
    straight.train()
    expected = lora_state(straight)
    assert len(straight.pcgrad.gradients) == 2  # PCGrad state took part and must survive the resume
    assert len(projections) == 2 and straight.state.pcgrad_projections == sum(projections)
    root, _ = demo
    with (root / "straight" / "train_log.csv").open() as handle:
        logged = [int(row["pcgrad_projections"]) for row in csv.DictReader(handle)]
    assert logged[-1] == sum(projections) and logged == sorted(logged)  # cumulative

    interrupted = Trainer(config_for(demo, tiny_model_dir, "resumed", *RUN_OVERRIDES))
    _stop_after(interrupted, 2)
    stopped_lora = interrupted.train()
    assert stopped_lora == root / "resumed" / "checkpoints" / "step-000002" / "sdvgen_lora.safetensors"
    assert stopped_lora.is_file() and not (root / "resumed" / "sdvgen_lora.safetensors").exists()

    resumed = Trainer(config_for(demo, tiny_model_dir, "resumed", *RUN_OVERRIDES, "train.resume=latest"))
    resumed.train()
    assert resumed.state.step == 4 and resumed.state.consumed == straight.state.consumed
    assert resumed.state.pcgrad_projections == straight.state.pcgrad_projections
    got = lora_state(resumed)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5)
    assert any(value.abs().max() > 0 for key, value in expected.items() if "lora_B" in key)
    monitor_rows = (root / "resumed" / "grad_monitor.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in monitor_rows[1:]] == ["0", "2", "4"]  # 4: the final weights
    assert (root / "resumed" / "grad_monitor.png").stat().st_size > 1000


def test_nonfinite_loss_keeps_the_good_checkpoint(demo, tiny_model_dir):
    root, _ = demo
    trainer = Trainer(config_for(demo, tiny_model_dir, "nan", *RUN_OVERRIDES, "train.checkpoint_every=1",
                                 "train.keep_checkpoints=1"))
    step = trainer.train_step

    def poisoned():
        task, losses = step()
        return task, ({**losses, "loss": float("nan")} if trainer.state.step == 3 else losses)

    trainer.train_step = poisoned
    with pytest.raises(FloatingPointError, match=r"step-000002.*train.resume=latest"):
        trainer.train()
    assert [p.name for p in (root / "nan" / "checkpoints").iterdir()] == ["step-000002"]


def test_export_takes_the_adapter_shape_from_the_checkpoint(demo, tiny_model_dir, tmp_path):
    from training.export import run_export

    trainer = Trainer(config_for(demo, tiny_model_dir, "export", *RUN_OVERRIDES, "train.max_steps=1"))
    trainer.train()
    plain = run_export(config_for(demo, tiny_model_dir, "export"), "latest", tmp_path / "a.safetensors", "fp32")
    changed = config_for(demo, tiny_model_dir, "export", "lora.alpha=16", "lora.rank=8")
    other = run_export(changed, "latest", tmp_path / "b.safetensors", "fp32")
    a, b = load_file(plain), load_file(other)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


DDP_SCRIPT = """
import json, sys
from pathlib import Path
from safetensors.torch import save_file
from training.config import load_config
from training.prepare import run_prepare
from training.trainer import Trainer
command, config_path, overrides, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
if command == "prepare":
    run_prepare(load_config(config_path, overrides))
else:
    trainer = Trainer(load_config(config_path, overrides))
    if len(sys.argv) > 5:  # Ctrl-C after this many steps
        from test_training import _stop_after
        _stop_after(trainer, int(sys.argv[5]))
    trainer.train()
    state = {k: v.contiguous() for k, v in trainer.unwrapped.state_dict().items() if "lora_" in k}
    save_file(state, str(out / f"rank{trainer.accelerator.process_index}.safetensors"))
"""


def torchrun_two_ranks(command: str, overrides: list[str], out: Path, *extra: str) -> None:
    script = out / "ddp_script.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), command, str(TINY_CONFIG), json.dumps(overrides), str(out), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_process_prepare_splits_the_work(demo, tiny_model_dir, tmp_path):
    root, skips = demo
    cache = tmp_path / "cache"
    torchrun_two_ranks("prepare", [*demo_overrides(root, tiny_model_dir, "x"), f"data.cache_dir={cache}"], tmp_path)
    reports = [json.loads((cache / f"report-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(reports)  # both ranks did part of the work
    total = {k: reports[0].get(k, 0) + reports[1].get(k, 0) for k in {*reports[0], *reports[1]}}
    assert total == skips  # every skip counted once
    single = root / "cache"
    for kind in ("identity", "video"):
        names = sorted(p.name for p in (cache / kind).glob("*.safetensors"))
        assert names == sorted(p.name for p in (single / kind).glob("*.safetensors"))
        for name in names:
            got, expected = load_file(cache / kind / name), load_file(single / kind / name)
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4)


def test_two_process_ddp_matches_single_process_accumulation(demo, tiny_model_dir, tmp_path):
    root, _ = demo
    # 2 ranks x 1 micro-batch draw exactly what 1 rank x 2 accumulated micro-batches draw; per_rank with seed 43
    # draws [identity, video], [video, video], [video, video], [identity, identity]: in step 0 the two ranks train
    # different tasks within one synchronised update, as in the authors' run.
    per_rank = [*RUN_OVERRIDES, "train.seed=43", "task.task_draw=per_rank", "monitor.pcgrad=false"]
    overrides = [*demo_overrides(root, tiny_model_dir, "ddp"), *per_rank, "train.gradient_accumulation=1"]
    torchrun_two_ranks("train", overrides, tmp_path)
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    with (root / "ddp" / "train_log.csv").open() as handle:
        assert [row["task"] for row in csv.DictReader(handle)] == ["mixed", "video", "video", "identity"]
    single = Trainer(config_for(demo, tiny_model_dir, "single", *per_rank, "train.gradient_accumulation=2"))
    # The monitor at step 0 (same initial weights) averaged the two ranks' pre-all-reduce gradients.
    with (root / "ddp" / "grad_monitor.csv").open() as handle:
        logged = next(row for row in csv.DictReader(handle) if row["step"] == "0")
    flat = direct_task_gradients(single, ranks=2)
    cos, norm_identity, norm_video = stats_of(flat, list(flat[IDENTITY]))
    assert float(logged["cosine"]) == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert float(logged["norm_identity"]) == pytest.approx(norm_identity, rel=1e-4)
    assert float(logged["norm_video"]) == pytest.approx(norm_video, rel=1e-4)
    single.train()
    for key, value in lora_state(single).items():
        torch.testing.assert_close(rank0[key], value, atol=1e-5, rtol=1e-4)


def test_resume_on_another_number_of_processes(demo, tiny_model_dir, tmp_path):
    """Half the run on 2 ranks, the rest on 1 rank with 2 accumulation steps: same weights and learning rates
    as 1 rank all along (the schedule counts optimizer steps, not per-process steps)."""
    root, _ = demo
    overrides = [*demo_overrides(root, tiny_model_dir, "moved"), *RUN_OVERRIDES, "train.gradient_accumulation=1"]
    torchrun_two_ranks("train", overrides, tmp_path, "2")
    resumed = Trainer(config_for(demo, tiny_model_dir, "moved", *RUN_OVERRIDES, "train.gradient_accumulation=2",
                                 "train.resume=latest"))
    resumed.train()
    straight = Trainer(config_for(demo, tiny_model_dir, "one-rank", *RUN_OVERRIDES, "train.gradient_accumulation=2"))
    straight.train()
    expected = lora_state(straight)
    for key, value in lora_state(resumed).items():
        torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=1e-4)

    def learning_rates(run):
        with (root / run / "train_log.csv").open() as handle:
            return {int(row["step"]): float(row["lr"]) for row in csv.DictReader(handle)}

    moved, one_rank = learning_rates("moved"), learning_rates("one-rank")
    assert list(moved) == list(one_rank) == [1, 2, 3, 4]
    assert list(moved.values()) == pytest.approx(list(one_rank.values()))


def direct_task_gradients(trainer: Trainer, ranks: int = 1, timesteps: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's held-out gradient by plain autograd, averaged over what `ranks` ranks would each see and, with
    `timesteps` > 1, over that many passes at t in the k-th of `timesteps` equal bands (fixed per-sample offset)."""
    from training.batches import BatchStream

    model = trainer.unwrapped
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rules = StepRules.from_config(trainer.config, view_drop=False)
    seed = trainer.config.train.seed
    flat = {}
    for task, held, size in ((IDENTITY, trainer.cache.held_identity, 2), (VIDEO, trainer.cache.held_video, 1)):
        total = None
        for rank in range(ranks):
            entries = BatchStream(held, seed, 2).micro_batch(0, size * ranks, 0, rank, ranks, size)
            generator = step_generator(seed, 0, "sample", 1 << 20, rank)
            batch = trainer.cache.load(task, entries, generator, rules)
            model.eval()
            passes = [None]
            if timesteps > 1:
                offsets = torch.rand(batch.latents.shape[0], generator=generator)
                passes = [torch.floor((k + offsets) * 1000 / timesteps).long() for k in range(timesteps)]
            for fixed in passes:
                loss = v_prediction_loss(model, trainer.noise_scheduler, batch, generator, fixed)
                grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
                local = [(g if g is not None else torch.zeros_like(p)).flatten() / (ranks * len(passes))
                         for (_, p), g in zip(named, grads)]
                total = local if total is None else [a + b for a, b in zip(total, local)]
        flat[task] = dict(zip([n for n, _ in named], total))
    return flat


def stats_of(flat, names) -> tuple[float, float, float]:
    a = torch.cat([flat[IDENTITY][n] for n in names])
    b = torch.cat([flat[VIDEO][n] for n in names])
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item(), a.norm().item(), b.norm().item()


def test_gradient_monitor_equals_direct_computation(demo, tiny_model_dir):
    trainer = Trainer(config_for(demo, tiny_model_dir, "monitor", *RUN_OVERRIDES))
    before = lora_state(trainer)
    stats = trainer.measure_gradients()
    named = [n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad]
    assert all(p.grad is None for p in trainer.unwrapped.parameters())  # measuring leaves no gradient behind
    flat = direct_task_gradients(trainer)

    cos, norm_identity, norm_video = stats_of(flat, named)
    assert stats["cosine"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert stats["norm_identity"] == pytest.approx(norm_identity, rel=1e-4)
    assert stats["norm_video"] == pytest.approx(norm_video, rel=1e-4)
    attention = [n for n in named if any(f".{s}.lora_" in n for s in LAYER_GROUPS["attention"])]
    cos, norm_identity, _ = stats_of(flat, attention)
    assert stats["attention/cosine"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert stats["attention/norm_identity"] == pytest.approx(norm_identity, rel=1e-4)
    for key, value in lora_state(trainer).items():
        assert torch.equal(value, before[key])


def test_monitor_averages_stratified_timesteps(demo, tiny_model_dir):
    trainer = Trainer(config_for(demo, tiny_model_dir, "monitor-t", *RUN_OVERRIDES, "monitor.timesteps=3"))
    stats = trainer.measure_gradients()
    flat = direct_task_gradients(trainer, timesteps=3)
    named = list(flat[IDENTITY])
    cos, norm_identity, norm_video = stats_of(flat, named)
    assert stats["cosine"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert stats["norm_identity"] == pytest.approx(norm_identity, rel=1e-4)
    assert stats["norm_video"] == pytest.approx(norm_video, rel=1e-4)
    single = direct_task_gradients(trainer)  # one timestep measures something else
    assert stats_of(single, named)[1] != pytest.approx(norm_identity, rel=1e-3)


def test_pcgrad_buffer_projects_only_conflicts():
    buffer = PCGradBuffer(size=2)
    video = torch.tensor([1.0, -1.0, 0.0])
    assert buffer.project(video) == (video, False)  # nothing buffered yet
    buffer.push(torch.tensor([0.0, 2.0, 0.0]))
    buffer.push(torch.tensor([0.0, 4.0, 2.0]))
    buffer.push(torch.tensor([2.0, 2.0, 0.0]))  # FIFO of 2: the first one is gone
    reference = torch.tensor([1.0, 3.0, 1.0])  # mean of the two kept gradients
    projected, changed = buffer.project(torch.tensor([1.0, -2.0, 0.0]))
    assert changed and abs(torch.dot(projected, reference).item()) < 1e-6
    torch.testing.assert_close(projected, torch.tensor([1.0, -2.0, 0.0]) + 5.0 / 11.0 * reference)
    agreeing = torch.tensor([1.0, 1.0, 1.0])
    assert buffer.project(agreeing) == (agreeing, False)


def test_ablation_switches_shape_batches(demo, tiny_model_dir):
    from training.batches import TrainingCache

    cache = TrainingCache(config_for(demo, tiny_model_dir, "x"))
    generator = torch.Generator().manual_seed(0)
    video = cache.load(VIDEO, cache.video[:2], generator, StepRules(0.5, "token", 0.5, "uniform", "i2v"))
    assert video.reference.shape == (2, 1, 16, 8, 12) and video.latents.shape == (2, 3, 16, 8, 12)
    assert 0 < len(video.keep_indices) < 24
    whole = [cache.load(VIDEO, cache.video[:1], generator, StepRules(0.0, "image", 0.5, "uniform", "i2v")).keep_indices
             for _ in range(20)]
    assert {None if k is None else len(k) for k in whole} == {None, 0}  # kept whole or dropped whole
    no_drop = StepRules(0.5, "token", 0.0, "uniform", "i2v")
    assert cache.load(VIDEO, cache.video[:1], generator, no_drop).keep_indices is None
    t2v = StepRules(0.5, "image", 0.5, "uniform", "t2v")
    assert cache.load(VIDEO, cache.video[:1], generator, t2v).reference is None
    identity = cache.load(IDENTITY, cache.identity[:3], generator, StepRules(0.0, "image", 0.5, "uniform", "i2v"))
    assert identity.latents.shape == identity.reference.shape == (3, 1, 16, 8, 12)
    assert cache.load(IDENTITY, cache.identity[:1], generator,
                      StepRules(1.0, "image", 0.5, "uniform", "i2v")).reference is None


def test_validation_videos_from_the_training_transformer(demo, tiny_model_dir, tmp_path):
    import av
    import numpy as np
    from PIL import Image

    from sdvgen_core.evaluation.metrics import ClipScorer, DinoScorer
    from sdvgen_core.evaluation.tiny_encoders import build_tiny_clip, build_tiny_dino
    from training.demo import draw_view

    reference = tmp_path / "ref.png"
    draw_view((220, 60, 40), (250, 250, 250), (0.5, 0.5), 0.25, 128).save(reference)
    trainer = Trainer(config_for(demo, tiny_model_dir, "validation", "train.max_steps=2", "monitor.every=0",
                                 "validation.every=2", f"validation.references=[{reference}]",
                                 "validation.prompts=[A <cls> mug on a table]", "validation.num_frames=5",
                                 "validation.num_inference_steps=2", f"validation.clip={build_tiny_clip(tmp_path / 'clip')}",
                                 f"validation.dino={build_tiny_dino(tmp_path / 'dino')}"))
    trainer.train()
    video = Path(trainer.output_dir) / "validation" / "step-000002-ref0.mp4"
    with av.open(str(video)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert len(frames) == 5 and frames[0].shape == (64, 96, 3)
    assert trainer.model.training  # sampling left the model in training mode
    # the logged metrics are the evaluation harness's scores of the written video
    fitted = np.asarray(Image.open(reference).convert("RGB").resize((96, 96)).crop((0, 16, 96, 80)))
    clip, dino = ClipScorer(tmp_path / "clip"), DinoScorer(tmp_path / "dino")
    metrics = trainer.validator.last_metrics
    assert set(metrics) == {"val/clip_t", "val/clip_i", "val/dino_i"}
    assert metrics["val/clip_t"] == pytest.approx(clip.clip_t(frames, "A mug on a table"), abs=1e-5)
    assert metrics["val/clip_i"] == pytest.approx(clip.clip_i(frames, fitted), abs=2e-2)
    assert metrics["val/dino_i"] == pytest.approx(dino.dino_i(frames, fitted), abs=2e-2)


def test_gradient_checkpointing_keeps_lora_gradients(demo, tiny_model_dir):
    trainer = Trainer(config_for(demo, tiny_model_dir, "checkpointing", "train.gradient_checkpointing=true",
                                 "lora.dropout=0", "monitor.every=0"))
    model = trainer.unwrapped
    assert model.is_gradient_checkpointing
    batch = trainer._batch(VIDEO, 0, trainer.rules, step_generator(0, 0, "sample", 0))
    gradients = []
    for checkpointing in (True, False):
        model.enable_gradient_checkpointing() if checkpointing else model.disable_gradient_checkpointing()
        model.train()
        loss = v_prediction_loss(model, trainer.noise_scheduler, batch, torch.Generator().manual_seed(3))
        params = [p for p in model.parameters() if p.requires_grad]
        gradients.append(torch.autograd.grad(loss, params))
    assert sum(int(g.abs().sum() > 0) for g in gradients[0]) >= len(gradients[0]) // 2  # every lora_B (A: B = 0)
    for with_checkpointing, without in zip(*gradients):
        torch.testing.assert_close(with_checkpointing, without, atol=1e-6, rtol=1e-5)


def test_whole_reference_drop_trains_text_to_video_after_the_reference_frame(demo, tiny_model_dir):
    """The run's image drop: no reference token is left and the video keeps RoPE frames 1..T (not 0..T-1)."""
    trainer = Trainer(config_for(demo, tiny_model_dir, "drop", "monitor.every=0"))
    model = trainer.unwrapped
    generator = torch.Generator().manual_seed(0)
    batch = next(b for b in (trainer.cache.load(VIDEO, trainer.cache.video[:1], generator, trainer.rules)
                             for _ in range(50)) if b.keep_indices is not None)
    assert batch.keep_indices.numel() == 0 and batch.reference is not None
    frames, height, width = batch.latents.shape[1], batch.latents.shape[-2], batch.latents.shape[-1]
    timestep = torch.tensor([500])
    cos, sin = model.rotary_embeddings(frames + 1, height, width, "cpu")
    tokens = (height // 2) * (width // 2)
    with torch.no_grad():
        dropped = model(batch.latents, batch.text, timestep, reference_latents=batch.reference,
                        reference_keep_indices=batch.keep_indices, return_dict=False)[0]
        shifted_t2v = model(batch.latents, batch.text, timestep, image_rotary_emb=(cos[tokens:], sin[tokens:]),
                            return_dict=False)[0]
        plain_t2v = model(batch.latents, batch.text, timestep, return_dict=False)[0]
    torch.testing.assert_close(dropped, shifted_t2v)
    assert (dropped - plain_t2v).abs().max() > 1e-4


def test_identity_direction_is_fixed_by_item_index(demo, tiny_model_dir):
    cache = TrainingCache(config_for(demo, tiny_model_dir, "x"))
    rows = [(path, target) for path, target in cache.identity if path.name.startswith("s200k-")]
    assert rows and len(rows) % 2 == 0
    for even, odd in zip(rows[::2], rows[1::2]):
        # item 2k: reference = left view 0 (target view 1); item 2k+1: the same row the other way round
        assert even[0] == odd[0] and (even[1], odd[1]) == (1, 0)
    assert TrainingCache(config_for(demo, tiny_model_dir, "x")).identity == cache.identity  # not redrawn


ABLATIONS = sorted((REPO / "training" / "configs" / "ablations").glob("*.yaml"))
# The tiny cache has 3 training pairs and 2 training clips: subset sizes shrink to fit, the rest stays as shipped.
TINY_SUBSETS = {"data.identity.max_pairs": 2, "data.video.max_clips": 1}


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# Options that `prepare` bakes into the cache: an overlay naming one gets its own tiny cache.
CACHE_OPTIONS = {"data.cls_token", "data.identity.cls_placement", "data.video.cls_placement", "data.identity.jitter_px"}


@pytest.mark.parametrize("overlay", ABLATIONS, ids=lambda path: path.stem)
def test_ablation_overlay_runs_two_steps(overlay, demo, tiny_model_dir, tmp_path):
    import yaml

    root, _ = demo
    settings = dict(_leaves(yaml.safe_load(overlay.read_text())))
    extra = [f"{key}={TINY_SUBSETS[key]}" for key, value in settings.items() if key in TINY_SUBSETS and value]
    run = f"ablation-{overlay.stem}"
    overrides = [o for o in demo_overrides(root, tiny_model_dir, run)
                 if "data.identity.jitter_px" not in settings or not o.startswith("data.identity.jitter_px")]
    if CACHE_OPTIONS & set(settings):
        extra.append(f"data.cache_dir={tmp_path / 'cache'}")
        run_prepare(load_config([TINY_CONFIG, overlay], [*overrides, *extra]))
    config = load_config([TINY_CONFIG, overlay], [*overrides, "train.max_steps=2", "train.checkpoint_every=0",
                                                  "monitor.every=0", *extra])
    resolved = config.to_dict()
    for key, value in settings.items():
        section, *rest = key.split(".")
        got = resolved[section]
        for part in rest:
            got = got[part]
        assert got == (TINY_SUBSETS[key] if f"{key}={TINY_SUBSETS.get(key)}" in extra else value), key
    trainer = Trainer(config)
    trainer.train()
    with (root / run / "train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["step"] for row in rows] == ["1", "2"] and all(math.isfinite(float(r["loss"])) for r in rows)
    if settings.get("data.identity.max_pairs"):
        assert len({path for path, _ in trainer.cache.identity}) == 2
    if settings.get("data.video.max_clips"):
        assert len(trainer.cache.video) == 1
    if settings.get("task.schedule") == "two_stage":
        assert [row["task"] for row in rows] == ["identity", "video"]  # switch at max_steps // 2
    if settings.get("task.p_video") == 0.0:
        assert {row["task"] for row in rows} == {"identity"}
    assert (root / run / "sdvgen_lora.safetensors").is_file()
