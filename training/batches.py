"""Train-time view of the cache: stateless per-step randomness, task switching and batch assembly.

Every random choice is drawn from a generator seeded by (seed, step, purpose[, micro-batch slot]), so
a resumed run draws exactly what an uninterrupted one would, every rank knows every slot's task without
communication, and N ranks x A accumulation steps draw what 1 rank x N*A steps would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .cachefiles import check_items, header, read_item, read_meta
from sdvgen_core.backbones import Backbone

from .config import Config, ConfigError
from .data import DataError
from .families import CachedLatents, resolve_backbone
from .prepare import check_cache_meta, check_video_set_nonempty

IDENTITY, VIDEO = "identity", "video"
_PURPOSES = {"task": 1, "order": 2, "sample": 3}
EVERY_9TH_STRIDE = 9  # the authors' run: reference from pixel frames {0, 9, 18, 27, 36, 45} of 49


def step_generator(seed: int, step: int, purpose: str, *more: int) -> torch.Generator:
    """A CPU generator determined by its arguments (never by history)."""
    value = seed
    for part in (_PURPOSES[purpose], step, *more):
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


class TaskSampler:
    """Which task each micro-batch slot of a step trains.

    A step has `slots` = accumulation x ranks micro-batches; slot `a * ranks + r` is accumulation step `a` of
    rank `r`. `task_draw: global` draws one task per step for all slots (the paper's wording: each optimizer
    step is one task). `per_rank` draws each slot's task on its own (the authors' run: each of 32 GPUs chose per
    step, so one synchronised update mixes both tasks; with accumulation, each accumulated micro-batch chooses).
    Either way the draw depends on (seed, step, slot) only. The two-stage schedule switches all slots at once.
    """

    def __init__(self, config: Config):
        self.seed = config.train.seed
        self.p_video = config.task.p_video
        self.per_slot = config.task.task_draw == "per_rank"
        self.two_stage_switch = config.two_stage_switch_step if config.task.schedule == "two_stage" else None

    def task(self, step: int, slot: int = 0) -> str:
        if self.two_stage_switch is not None:
            return VIDEO if step >= self.two_stage_switch else IDENTITY
        extra = (slot,) if self.per_slot else ()
        u = torch.rand((), generator=step_generator(self.seed, step, "task", *extra)).item()
        return VIDEO if u < self.p_video else IDENTITY

    def step_tasks(self, step: int, slots: int) -> list[str]:
        return [self.task(step, slot) for slot in range(slots)]


def reference_keep_indices(num_tokens: int, mode: str, p_drop: float, generator: torch.Generator
                           ) -> torch.Tensor | None:
    """Which reference tokens a video micro-batch keeps (None: all).

    `image` (the authors' run): with probability `p_drop` the whole reference goes (an empty index set: the step
    trains text-to-video with the video still at RoPE frames 1..T), else it stays whole; one draw per
    micro-batch (per forward). `token` (the paper's wording): each token is dropped independently.
    """
    if p_drop <= 0:
        return None
    if mode == "image":
        dropped = torch.rand((), generator=generator).item() < p_drop
        return torch.empty(0, dtype=torch.long) if dropped else None
    return torch.nonzero(torch.rand(num_tokens, generator=generator) >= p_drop).flatten()


def reference_frame_choices(num_frames: int, mode: str) -> list[int]:
    """The pixel frames a video step may take its reference from."""
    if mode == "first":
        return [0]
    if mode == "every_9th":
        return list(range(0, num_frames, EVERY_9TH_STRIDE))
    return list(range(num_frames))


def reference_frames(num_frames: int, batch: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Reference frame index per sample, uniform over `reference_frame_choices`."""
    choices = torch.tensor(reference_frame_choices(num_frames, mode))
    return choices[torch.randint(0, len(choices), (batch,), generator=generator)]


def jitter_offsets(margin: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Per sample and view, a (top, left) latent crop offset in [0, 2 * margin]: `[batch, 2, 2]`."""
    return torch.randint(0, 2 * margin + 1, (batch, 2, 2), generator=generator)


@dataclass
class Batch:
    task: str
    latents: torch.Tensor  # [B, T, C, h, w] clean target latents (the objective rearranges to the model's layout)
    text: torch.Tensor  # [B, L, D] (L: 226 T5 tokens for CogVideoX, 512 UMT5 tokens for Wan)
    reference: torch.Tensor | None  # [B, 1, C, h, w]
    keep_indices: torch.Tensor | None  # [K] reference tokens kept


def require_prepared_cache(root: Path) -> None:
    """`DataError` unless `prepare` finished a cache in `root` (checked before anything else is read)."""
    meta = read_meta(root)
    if meta is None:
        raise DataError(f"no prepared cache in {str(root)!r}: run `python -m training prepare` first")
    if meta.get("complete") is False:
        raise DataError(f"`prepare` did not finish the cache in {str(root)!r}: re-run it with the same config")


class TrainingCache:
    """The prepared items, split into training and held-out (gradient monitor) sets."""

    def __init__(self, config: Config, backbone: Backbone | None = None):
        self.config = config
        root = Path(config.data.cache_dir)
        require_prepared_cache(root)  # the first thing to fix, before the model folder is read
        backbone = backbone or resolve_backbone(config)
        self.meta = meta = check_cache_meta(root, config, backbone)
        self.latent_scale = backbone.vae_scale_spatial
        self.latents = CachedLatents(backbone, meta)
        self.margin = config.data.identity.jitter_px // self.latent_scale
        identity_files = sorted((root / IDENTITY).glob("*.safetensors"))
        video_files = sorted((root / VIDEO).glob("*.safetensors"))
        check_items(identity_files, IDENTITY, meta)  # headers only: a broken file is named before models load
        check_items(video_files, VIDEO, meta)
        held_identity, train_identity = _holdout(identity_files, config.data.holdout_identity, config.train.seed)
        self.held_video, self.video = _holdout(video_files, config.data.holdout_video, config.train.seed)
        # Subsets come after the holdout, so runs on different subset sizes are monitored on the same items.
        train_identity = seeded_subset(train_identity, config.data.identity.max_pairs, config.data.subset_seed,
                                       "data.identity.max_pairs", "identity pairs")
        self.video = seeded_subset(self.video, config.data.video.max_clips, config.data.subset_seed,
                                   "data.video.max_clips", "clips")
        self.identity = _directed_pairs(train_identity)
        self.held_identity = _directed_pairs(held_identity)
        if not self.identity and config.task.p_video < 1:
            raise DataError(f"no identity pairs in the cache {str(root)!r}; add data.identity sources and run prepare")
        check_video_set_nonempty(config, len(self.video), f"in the cache {str(root)!r}")
        if config.monitor.every and not (self.held_identity and self.held_video):
            raise DataError("the gradient monitor needs data.holdout_identity > 0 and data.holdout_video > 0")

    def load(self, task: str, entries: list, generator: torch.Generator, step_rules: "StepRules") -> Batch:
        if task == IDENTITY:
            return self._identity_batch(entries, generator, step_rules)
        return self._video_batch(entries, generator, step_rules)

    def _identity_batch(self, pairs: list[tuple[Path, int]], generator, rules: "StepRules") -> Batch:
        height, width = self.config.data.height // self.latent_scale, self.config.data.width // self.latent_scale
        offsets = jitter_offsets(self.margin, len(pairs), generator)
        targets, references, texts = [], [], []
        for (path, target_view), offset in zip(pairs, offsets):
            stats = read_item(path)
            views = []
            for slot, view in enumerate((1 - target_view, target_view)):
                latent = self.latents.sample(stats, f"view{view}", generator)
                top, left = offset[slot].tolist()
                views.append(latent[:, top:top + height, left:left + width])
            references.append(views[0])
            targets.append(views[1])
            texts.append(stats[f"text.{target_view}"].float())
        # "Drop one view" (paper A.2): the micro-batch keeps only its target view and trains as text-to-image
        # with the <cls> caption, so identity must also come through the text path, not only by copying.
        drop_view = rules.view_drop and torch.rand((), generator=generator).item() < rules.p_view_drop
        return Batch(
            task=IDENTITY,
            latents=torch.stack(targets)[:, None],
            text=torch.stack(texts),
            reference=None if drop_view else torch.stack(references)[:, None],
            keep_indices=None,
        )

    def _video_batch(self, paths: list[Path], generator, rules: "StepRules") -> Batch:
        latents, references, texts = [], [], []
        for path in paths:
            stats = read_item(path)
            latents.append(self.latents.sample(stats, "video", generator))
            frame = reference_frames(stats["frames.mean"].shape[0], 1, rules.reference_frame, generator).item()
            frame_stats = {f"frame.{k}": stats[f"frames.{k}"][frame] for k in ("mean", "std")}
            references.append(self.latents.sample(frame_stats, "frame", generator))
            texts.append(stats["text"].float())
        reference = torch.stack(references)[:, None] if rules.video_conditioning == "i2v" else None
        keep = None
        if reference is not None:
            num_tokens = (reference.shape[-2] // 2) * (reference.shape[-1] // 2)
            keep = reference_keep_indices(num_tokens, rules.reference_drop, rules.p_reference_drop, generator)
        return Batch(task=VIDEO, latents=torch.stack(latents), text=torch.stack(texts), reference=reference,
                     keep_indices=keep)


@dataclass(frozen=True)
class StepRules:
    """The per-task augmentation switches; the gradient monitor uses the training rules without view drop."""

    p_view_drop: float
    reference_drop: str
    p_reference_drop: float
    reference_frame: str
    video_conditioning: str
    view_drop: bool = True

    @classmethod
    def from_config(cls, config: Config, view_drop: bool = True) -> "StepRules":
        task = config.task
        return cls(task.p_view_drop, task.reference_drop, task.p_reference_drop, task.reference_frame,
                   task.video_conditioning, view_drop)


def _holdout(files: list[Path], count: int, seed: int) -> tuple[list[Path], list[Path]]:
    if count and count >= len(files):
        raise DataError(f"holdout of {count} items leaves nothing to train on ({len(files)} prepared)")
    shuffled = files[:]
    random.Random(seed).shuffle(shuffled)
    held = set(shuffled[:count])
    return [f for f in files if f in held], [f for f in files if f not in held]


def seeded_subset(files: list[Path], count: int, seed: int, option: str, what: str) -> list[Path]:
    """`count` of `files` (0: all) chosen by `seed`, in their original order. The choice is a prefix of one
    seeded permutation, so a smaller subset is contained in a larger one (2K pairs within the 4K pairs)."""
    if not count:
        return files
    if count > len(files):
        raise DataError(f"{option}={count} asks for more {what} than the {len(files)} prepared for training")
    shuffled = files[:]
    random.Random(seed).shuffle(shuffled)
    kept = set(shuffled[:count])
    return [f for f in files if f in kept]


def _directed_pairs(files: list[Path]) -> list[tuple[Path, int]]:
    """(file, target view) for every direction a file supports, in a fixed order: a two-way pair (a
    Subjects200K row) gives the even item with the left view (0) as reference, then the odd item with the right
    view as reference, as in the authors' run (fixed per item, never redrawn per visit)."""
    pairs = []
    for path in files:
        keys = header(path)
        pairs.extend((path, target) for target in (1, 0) if f"text.{target}" in keys)
    return pairs


class BatchStream:
    """Global batches of one task, drawn from seeded epoch permutations; rank r takes its micro-batch slice."""

    def __init__(self, items: list, seed: int, salt: int):
        self.items = items
        self.seed = seed
        self.salt = salt
        self._cached_epoch: int | None = None
        self._cached: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if self._cached_epoch != epoch:
            generator = step_generator(self.seed, epoch, "order", self.salt)
            self._cached = torch.randperm(len(self.items), generator=generator).tolist()
            self._cached_epoch = epoch
        return self._cached

    def entries(self, start: int, count: int) -> list:
        """Items at positions `start .. start + count - 1` of the endless sequence of epoch permutations."""
        entries = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, len(self.items))
            entries.append(self.items[self._permutation(epoch)[offset]])
        return entries

    def micro_batch(self, batch_index: int, global_batch: int, accum_index: int, rank: int, num_processes: int,
                    micro_size: int) -> list:
        """Entries of micro-batch `accum_index` of rank `rank` within the task's `batch_index`-th global batch."""
        return self.entries(batch_index * global_batch + (accum_index * num_processes + rank) * micro_size, micro_size)


def slot_starts(tasks: list[str], micro_sizes: dict[str, int], consumed: dict[str, int]) -> list[int]:
    """Where each slot's micro-batch starts in its task's stream: a task's slots of a step read consecutive
    micro-batches after the `consumed` items, so every item is used once per epoch whatever the task mix."""
    position = dict(consumed)
    starts = []
    for task in tasks:
        starts.append(position[task])
        position[task] += micro_sizes[task]
    return starts


def check_batch_sizes(config: Config, num_processes: int) -> dict[str, int]:
    """Per-rank micro-batch size of each task; global batches must split evenly over accumulation and ranks."""
    sizes = {}
    accum = config.train.gradient_accumulation
    for task, global_batch in ((IDENTITY, config.train.identity_batch), (VIDEO, config.train.video_batch)):
        if global_batch % (accum * num_processes):
            raise ConfigError(
                f"train.{task}_batch={global_batch} must be divisible by train.gradient_accumulation ({accum}) "
                f"x processes ({num_processes})"
            )
        sizes[task] = global_batch // (accum * num_processes)
    return sizes
