"""`train`: the dual-task LoRA fine-tuning loop (paper, appendix A) on a prepared cache.

Each micro-batch slot of a step (accumulation step x rank) trains a video (I2V) micro-batch with probability
`task.p_video`, else an identity one; `task.task_draw` says whether the slots of a step share one draw
(`global`) or draw on their own (`per_rank`, the authors' run). A task's micro-batch has the per-slot size
of its global batch (256 images / 32 clips over the slots in the paper).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm.auto import tqdm

from sdvgen_core.files import atomic_write_text
from sdvgen_core.lora import DEFAULT_ADAPTER, make_lora_config, save_lora
from sdvgen_core.pipeline import resolve_dtype

from .batches import (
    IDENTITY,
    VIDEO,
    Batch,
    BatchStream,
    StepRules,
    TaskSampler,
    TrainingCache,
    check_batch_sizes,
    require_prepared_cache,
    slot_starts,
    step_generator,
)
from .config import Config, ConfigError, save_config
from .families import make_objective, resolve_backbone, v_prediction_loss, write_extra_lora_copies  # noqa: F401 (re-export)
from .models import flush_subnormals_on_cpu, load_transformer
from .monitor import FlatGradients, MonitorLog, PCGradBuffer, gradient_stats
from .prepare import write_safetensors
from .rundir import (
    CHECKPOINT_PREFIX,
    LORA_FILE,
    STATE_FILE,
    abandon_newer,
    check_writable,
    checkpoint_write_error,
    complete_checkpoints,
    find_checkpoint,
    plan_run,
    replace_earlier_run,
)
from .validation import Validator

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"  # unfolded fp32 PEFT weights, for exact resume
PCGRAD_FILE = "pcgrad_buffer.safetensors"


@dataclass
class TrainerState:
    """What a checkpoint needs beyond accelerate's state: the step, how many items each task's stream has
    consumed, and how many video gradients PCGrad projected so far."""

    step: int = 0
    consumed: dict[str, int] = field(default_factory=lambda: {IDENTITY: 0, VIDEO: 0})
    pcgrad_projections: int = 0

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps({"step": self.step, "consumed": self.consumed,
                                            "pcgrad_projections": self.pcgrad_projections}))

    @classmethod
    def load(cls, path: Path) -> "TrainerState":
        data = json.loads(path.read_text())
        return cls(step=int(data["step"]), consumed={k: int(v) for k, v in data["consumed"].items()},
                   pcgrad_projections=int(data.get("pcgrad_projections", 0)))


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: give up waiting
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("signal %d: saving a checkpoint after this step, then stopping", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def lora_metadata(config: Config, cls_metadata: dict[str, str], step: int) -> dict[str, str]:
    recipe = {k: config.to_dict()[k] for k in ("lora", "task", "optim", "train")}
    return {
        "sdvgen.base_model": Path(config.model.path).name,
        "sdvgen.train_step": str(step),
        "sdvgen.recipe": json.dumps(recipe, sort_keys=True),
        **cls_metadata,
    }


class Trainer:
    def __init__(self, config: Config, overwrite: bool = False):
        """`overwrite`: start afresh in an output folder that holds an earlier run (moved aside, not deleted)."""
        config.validate()
        require_prepared_cache(Path(config.data.cache_dir))
        self.backbone = resolve_backbone(config)  # before plan_run: it fills in the family's LoRA targets
        self.config = config
        train = config.train
        self.output_dir = Path(train.output_dir)
        self.plan = plan_run(config, overwrite)  # before anything loads: refuse to mix runs in one folder
        check_writable(self.output_dir, "train.output_dir")
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            gradient_accumulation_steps=train.gradient_accumulation,
            step_scheduler_with_optimizer=False,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        self.distributed = self.accelerator.distributed_type
        self._check_launch()
        flush_subnormals_on_cpu(self.accelerator.device)
        if train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.micro_sizes = check_batch_sizes(config, self.accelerator.num_processes)
        self.cache = TrainingCache(config, self.backbone)
        self.tasks = TaskSampler(config)
        self.rules = StepRules.from_config(config)
        self.streams = {IDENTITY: BatchStream(self.cache.identity, train.seed, 0),
                        VIDEO: BatchStream(self.cache.video, train.seed, 1)}
        self.state = TrainerState()
        self.validator = Validator(config, self.backbone) if config.validation.every else None  # reads its images: before models

        set_seed(train.seed)  # the LoRA's initial weights depend only on the seed
        self.weight_dtype = resolve_dtype(config.model.dtype)
        transformer = load_transformer(config.model.path, config.model.dtype, self.backbone)
        lora = config.lora
        transformer.add_adapter(make_lora_config(lora.rank, lora.alpha, lora.dropout, lora.target_modules),
                                adapter_name=DEFAULT_ADAPTER)
        for param in transformer.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # trainable LoRA weights stay fp32 under bf16 autocast
        if train.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.objective = make_objective(config, self.backbone, transformer)
        self.noise_scheduler = getattr(self.objective, "scheduler", None)  # CogVideoX's DDIM scheduler
        params = [p for p in transformer.parameters() if p.requires_grad]
        optim = config.optim
        optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                                      eps=optim.eps)
        # Counted in optimizer steps (the Accelerator does not step it per process), so a checkpoint resumes
        # with the right learning rate on any number of processes.
        lr_scheduler = get_scheduler(
            optim.scheduler, optimizer, num_warmup_steps=optim.warmup_steps,
            num_training_steps=train.max_steps, num_cycles=optim.num_cycles,
        )
        if self.distributed == DistributedType.DEEPSPEED:
            # No dataloader to infer it from; the real per-task micro-batches vary, DeepSpeed only checks this.
            ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = 1
            ds_config["gradient_clipping"] = optim.max_grad_norm
        self.accelerator.register_save_state_pre_hook(self._save_adapter_hook)
        self.accelerator.register_load_state_pre_hook(self._load_adapter_hook)
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(transformer, optimizer, lr_scheduler)
        self.flat = FlatGradients(self.unwrapped)
        self.pcgrad = PCGradBuffer(config.monitor.pcgrad_buffer) if config.monitor.pcgrad else None
        self.monitor_log = MonitorLog(self.output_dir)

    def _check_launch(self) -> None:
        """Refuse settings the chosen distributed backend cannot honour, before anything is loaded."""
        config = self.config
        if self.distributed == DistributedType.FSDP and config.model.dtype != "fp32":
            raise ConfigError(
                "FSDP flattens frozen and LoRA weights together, which needs one dtype: set model.dtype=fp32 "
                "(FSDP's bf16 mixed precision still computes in bf16; the fp32 weights are sharded across GPUs)"
            )
        local = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
        if (config.monitor.every or config.monitor.pcgrad) and self.distributed not in local:
            raise ConfigError("the gradient monitor and PCGrad need each rank's full gradients: launch single-process "
                              "or DDP (training/accelerate/multi_gpu.yaml), not DeepSpeed/FSDP")
        if config.validation.every and self.distributed == DistributedType.FSDP:
            raise ConfigError("validation videos need the whole transformer on one GPU: not available under FSDP")

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    # --- checkpoints -------------------------------------------------------------------------------------

    def _full_params(self):
        """Under FSDP, gather the full weights on rank 0 (collective: every rank must enter)."""
        if self.distributed == DistributedType.FSDP:
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel.summon_full_params(
                self.model, writeback=False, rank0_only=True, offload_to_cpu=True
            )
        return contextlib.nullcontext()

    def _save_adapter_hook(self, models, weights, output_dir):
        with self._full_params():
            if self.accelerator.is_main_process:
                state = get_peft_model_state_dict(self.unwrapped, adapter_name=DEFAULT_ADAPTER)
                write_safetensors({k: v.float() for k, v in state.items()}, Path(output_dir) / ADAPTER_FILE, {})
        weights.clear()  # single/DDP: the frozen base model is never written into checkpoints

    def _load_adapter_hook(self, models, input_dir):
        # DeepSpeed and FSDP restore the module from their own checkpoint files; `models` holds the rest.
        if models:
            models.clear()
            load_adapter(self.unwrapped, Path(input_dir) / ADAPTER_FILE)

    def save_checkpoint(self) -> Path:
        """accelerate state (optimizer, scheduler, RNG) + adapter + trainer state + exported LoRA, atomically."""
        final = self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.state.step:06d}"
        staging = final.with_name(final.name + ".partial")
        if self.accelerator.is_main_process and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        # DeepSpeed would otherwise write the frozen 5B weights into every checkpoint
        frozen = {"exclude_frozen_parameters": True} if self.distributed == DistributedType.DEEPSPEED else {}
        try:
            self.accelerator.save_state(str(staging), **frozen)
            self.export_lora(staging / LORA_FILE)
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
            raise checkpoint_write_error(error, staging) from error
        if self.accelerator.is_main_process:
            if self.pcgrad is not None:
                write_safetensors(self.pcgrad.state_tensors(), staging / PCGRAD_FILE, {})
            self.state.save(staging / STATE_FILE)
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            self._prune_checkpoints()
            logger.info("checkpoint %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        keep = self.config.train.keep_checkpoints
        if keep:
            for old in complete_checkpoints(self.output_dir)[:-keep]:
                shutil.rmtree(old)

    def resume(self, checkpoint: Path) -> None:
        partial = {"load_module_strict": False} if self.distributed == DistributedType.DEEPSPEED else {}
        self.accelerator.load_state(str(checkpoint), **partial)
        self.state = TrainerState.load(checkpoint / STATE_FILE)
        if self.pcgrad is not None and (checkpoint / PCGRAD_FILE).is_file():
            self.pcgrad.load_tensors(load_file(checkpoint / PCGRAD_FILE), self.accelerator.device)
        logger.info("resumed from %s at step %d", checkpoint, self.state.step)
        if self.accelerator.is_main_process:  # `latest` and `export` must follow the resumed run
            abandon_newer(self.output_dir, self.state.step)
        self.accelerator.wait_for_everyone()

    def export_lora(self, path: Path) -> None:
        """Write the LoRA file (main process; every rank must call this, FSDP gathers collectively)."""
        metadata = lora_metadata(self.config, self.cache.meta["cls"], self.state.step)
        with self._full_params():
            if self.accelerator.is_main_process:
                save_lora(self.unwrapped, path, adapter_name=DEFAULT_ADAPTER, extra_metadata=metadata)

    # --- steps ---------------------------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        """Micro-batches per optimizer step over all ranks."""
        return self.config.train.gradient_accumulation * self.accelerator.num_processes

    def _batch(self, task: str, start: int, rules: StepRules, generator) -> Batch:
        entries = self.streams[task].entries(start, self.micro_sizes[task])
        return self._to_device(self.cache.load(task, entries, generator, rules))

    def _to_device(self, batch: Batch) -> Batch:
        device, dtype = self.accelerator.device, self.weight_dtype
        reference = None if batch.reference is None else batch.reference.to(device, dtype)
        keep = None if batch.keep_indices is None else batch.keep_indices.to(device)
        return Batch(batch.task, batch.latents.to(device, dtype), batch.text.to(device, dtype), reference, keep)

    def train_step(self) -> tuple[str, dict[str, float]]:
        """One optimizer step; returns its task (`identity`, `video`, or `mixed` when the slots drew both) and
        the losses: `loss` (mean over every slot) and `loss/<task>` (mean over that task's slots)."""
        step = self.state.step
        accelerator = self.accelerator
        tasks = self.tasks.step_tasks(step, self.slots)
        starts = slot_starts(tasks, self.micro_sizes, self.state.consumed)
        loss_sums = {task: torch.zeros((), device=accelerator.device) for task in (IDENTITY, VIDEO)}
        self.model.train()
        for accum_index in range(self.config.train.gradient_accumulation):
            # Seeded by the micro-batch's slot in the global batch: N ranks x A accumulation steps draw exactly
            # what 1 rank x N*A steps would, and a resumed run draws what an uninterrupted one did.
            slot = accum_index * accelerator.num_processes + accelerator.process_index
            task = tasks[slot]
            generator = step_generator(self.config.train.seed, step, "sample", slot)
            torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))  # LoRA dropout masks
            batch = self._batch(task, starts[slot], self.rules, generator)
            with accelerator.accumulate(self.model):
                loss = self.objective.loss(self.model, batch, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    self._before_update(tasks)
                    accelerator.clip_grad_norm_(self.model.parameters(), self.config.optim.max_grad_norm)
                self.optimizer.step()
                if accelerator.sync_gradients:
                    self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss_sums[task] += loss.detach().float()
        for task in (IDENTITY, VIDEO):
            self.state.consumed[task] += tasks.count(task) * self.micro_sizes[task]
        self.state.step += 1
        summed = accelerator.reduce(torch.stack([loss_sums[IDENTITY], loss_sums[VIDEO]]), reduction="sum").tolist()
        counts = {task: tasks.count(task) for task in (IDENTITY, VIDEO)}
        losses = {"loss": sum(summed) / len(tasks)}
        losses.update({f"loss/{task}": total / counts[task] for task, total in zip((IDENTITY, VIDEO), summed)
                       if counts[task]})
        label = tasks[0] if len(set(tasks)) == 1 else "mixed"
        return label, losses

    def _before_update(self, tasks: list[str]) -> None:
        """Buffered PCGrad on the synchronised (rank-averaged) gradient, identical on every rank (the config
        requires task_draw=global, so every slot of the step has the same task)."""
        if self.pcgrad is None:
            return
        gradient = self.flat.read()
        if tasks[0] == IDENTITY:
            self.pcgrad.push(gradient)
            return
        projected, changed = self.pcgrad.project(gradient)
        if changed:
            self.flat.write(projected)
            self.state.pcgrad_projections += 1

    # --- gradient monitor ----------------------------------------------------------------------------------

    def task_gradient(self, task: str) -> torch.Tensor:
        """Gradient of one task's loss on its fixed held-out batch, captured before any all-reduce (each
        rank's local gradient, via `no_sync`) and then averaged across ranks. Leaves no gradient behind."""
        rules = StepRules.from_config(self.config, view_drop=False)
        held = self.cache.held_identity if task == IDENTITY else self.cache.held_video
        size = self.config.monitor.identity_batch if task == IDENTITY else self.config.monitor.video_batch
        rank = self.accelerator.process_index
        entries = BatchStream(held, self.config.train.seed, 2).micro_batch(0, size * self.accelerator.num_processes,
                                                                           0, rank, self.accelerator.num_processes, size)
        generator = step_generator(self.config.train.seed, 0, "sample", 1 << 20, rank)  # fixed over training
        batch = self._to_device(self.cache.load(task, entries, generator, rules))
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()  # no LoRA dropout: the measurement depends only on the weights
        schedule = monitor_timesteps(self.config.monitor.timesteps, batch.latents.shape[0],
                                     self.objective.num_train_timesteps, generator)
        with self.accelerator.no_sync(self.model):
            for timesteps in schedule:  # one backward per timestep keeps the activation memory of one pass
                loss = self.objective.loss(self.model, batch, generator, timesteps)
                (loss / len(schedule)).backward()
        local = self.flat.read()
        self.optimizer.zero_grad(set_to_none=True)
        return self.accelerator.reduce(local, reduction="mean")

    def measure_gradients(self) -> dict[str, float]:
        g_identity = self.task_gradient(IDENTITY)
        g_video = self.task_gradient(VIDEO)
        return gradient_stats(self.flat, g_identity.cpu(), g_video.cpu())

    # --- loop ---------------------------------------------------------------------------------------------

    def train(self) -> Path:
        config, accelerator = self.config, self.accelerator
        if self.plan.replace_earlier and accelerator.is_main_process:
            replace_earlier_run(self.output_dir)
        accelerator.wait_for_everyone()
        if self.plan.checkpoint is not None:
            self.resume(self.plan.checkpoint)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")
        accelerator.init_trackers("sdvgen")
        csv_log = TrainLog(self.output_dir / "train_log.csv") if accelerator.is_main_process else None
        progress = tqdm(total=config.train.max_steps, initial=self.state.step, desc="train",
                        disable=not accelerator.is_local_main_process)
        stopped, first_step = False, self.state.step
        with StopRequest() as stop:
            while self.state.step < config.train.max_steps:
                if config.monitor.every and self.state.step % config.monitor.every == 0:
                    self._log_monitor()
                started = time.perf_counter()
                task, losses = self.train_step()
                loss = losses["loss"]
                if not math.isfinite(loss):
                    # The update already went in: these weights are not saved, so no good checkpoint is pruned.
                    good = find_checkpoint(self.output_dir, "latest")
                    where = f"the last good checkpoint is {str(good)!r}" if good else "no checkpoint was saved yet"
                    raise FloatingPointError(
                        f"loss became {loss} at step {self.state.step}; the weights are no longer finite and were "
                        f"not saved. {where}: resume it with train.resume=latest and a lower optim.lr"
                    )
                record = {**losses, "video_fraction": self.video_fraction(self.state.step - 1),
                          "lr": self.lr_scheduler.get_last_lr()[0], "step_seconds": time.perf_counter() - started}
                if self.pcgrad is not None:
                    record["pcgrad_projections"] = self.state.pcgrad_projections
                if self.state.step % config.train.log_every == 0:
                    accelerator.log(record, step=self.state.step)
                    if csv_log is not None:
                        csv_log.append(self.state.step, task, record)
                progress.update(1)
                progress.set_postfix(task=task, loss=f"{loss:.4f}")
                every = config.train.checkpoint_every
                stopped = self._stop_agreed(stop.requested)
                last = self.state.step == config.train.max_steps
                if (every and self.state.step % every == 0) or stopped or last:
                    checkpoint = self.save_checkpoint()
                if self.validator is not None and self.state.step % config.validation.every == 0:
                    self._validate()
                if stopped:
                    logger.warning("stopped at step %d; resume with train.resume=latest", self.state.step)
                    break
        progress.close()
        if not stopped and config.monitor.every and self.state.step > first_step:
            self._log_monitor()  # the final weights are measured too
        accelerator.end_training()
        if stopped:
            return checkpoint / LORA_FILE
        final = self.output_dir / LORA_FILE
        self.export_lora(final)
        if accelerator.is_main_process:
            write_extra_lora_copies(self.backbone, final)
        logger.info("LoRA written to %s", final)
        return final

    def _validate(self) -> None:
        if self.accelerator.is_main_process:
            self.validator.run(self.unwrapped, self.state.step, self.output_dir, self.accelerator.device)
            if self.validator.last_metrics:
                self.accelerator.log(self.validator.last_metrics, step=self.state.step)
        self.accelerator.wait_for_everyone()

    def _stop_agreed(self, requested: bool) -> bool:
        """All ranks stop at the same step if any of them got a signal (checkpointing is collective)."""
        flag = torch.tensor(float(requested), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def video_fraction(self, step: int) -> float:
        """Share of a step's micro-batch slots that trained the video task."""
        return self.tasks.step_tasks(step, self.slots).count(VIDEO) / self.slots

    def _log_monitor(self) -> None:
        stats = self.measure_gradients()
        if self.pcgrad is not None:
            stats["pcgrad_projections"] = float(self.state.pcgrad_projections)
        self.accelerator.log({f"grad/{k}": v for k, v in stats.items()}, step=self.state.step)
        if self.accelerator.is_main_process:
            self.monitor_log.append(self.state.step, stats)


class TrainLog:
    """train_log.csv: one row per logged step (per-task losses empty when the step had no slot of that task)."""

    FIELDS = ("step", "task", "video_fraction", "loss", "loss_identity", "loss_video", "lr", "step_seconds",
              "pcgrad_projections")

    def __init__(self, path: Path):
        self.path = path

    def append(self, step: int, task: str, record: dict) -> None:
        new = not self.path.exists()
        values = {**{k.replace("/", "_"): v for k, v in record.items()}, "step": step, "task": task}
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(values)


def monitor_timesteps(count: int, batch_size: int, num_train_timesteps: int, generator: torch.Generator
                      ) -> list[torch.Tensor | None]:
    """Timesteps of the gradient monitor's passes: one uniform draw per sample (`count` 1, as in training), or
    `count` stratified ones: pass k takes t in the k-th of `count` equal bands, at a per-sample offset."""
    if count == 1:
        return [None]
    offsets = torch.rand(batch_size, generator=generator)
    return [((k + offsets) * num_train_timesteps / count).long().clamp_(max=num_train_timesteps - 1)
            for k in range(count)]


def load_adapter(transformer, path: Path) -> None:
    """Load unfolded PEFT adapter weights written by a checkpoint."""
    result = set_peft_model_state_dict(transformer, load_file(path), adapter_name=DEFAULT_ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{str(path)!r} does not match this LoRA setup (unexpected {unexpected[:1]})")


def run_train(config: Config, overwrite: bool = False) -> Path:
    return Trainer(config, overwrite).train()
