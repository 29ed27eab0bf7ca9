"""Typed trainer configuration: dataclasses loaded from YAML, with dotted `key=value` overrides.

Every field is documented in `training/README.md`; the shipped recipes live in `training/configs/`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sdvgen_core.files import atomic_write_text
from sdvgen_core.lora import LORA_TARGET_MODULES


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    path: str = ""  # CogVideoX-5B or Wan 2.2 TI2V-5B diffusers folder (transformer/, vae/, text_encoder/, ...)
    family: str = "auto"  # auto (from transformer/config.json) | cogvideox | wan22 (must match the folder)
    dtype: str = "bf16"  # weight dtype of the frozen models: bf16 | fp16 | fp32
    vae_tiling: bool = True  # VAE tiling + slicing while caching (needed at 720x480 on one GPU)


@dataclass
class IdentityDataConfig:
    subjects200k: list[str] = field(default_factory=list)  # parquet files or folders of them
    min_quality: float = 5.0  # every `quality_assessment` score must reach this
    quality_keys: list[str] = field(default_factory=list)  # scores that must pass; empty = all present
    pairs_jsonl: list[str] = field(default_factory=list)  # JSONL: reference, target, caption[, subject]
    jitter_px: int = 0  # crop jitter margin in pixels on each side (multiple of 8); the run had none
    cls_placement: str = "prefix"  # `<cls>` in identity captions: prefix (the run) | subject_word (paper example)
    max_pairs: int = 0  # train on a seeded subset of this many prepared pairs (0 = all; paper Tab. 4: 2000, 4000)


@dataclass
class VideoDataConfig:
    folders: list[str] = field(default_factory=list)  # clips with sidecar .txt captions
    captions: str = ""  # optional JSONL ({"file","caption"}) or CSV (file,caption) instead of sidecars
    fps: float = 8.0  # frames are resampled to this rate
    num_frames: int = 49  # frames per clip (4k+1); shorter clips are skipped
    cls_placement: str = "none"  # `<cls>` in video captions: none (the run) | prefix
    max_clips: int = 0  # train on a seeded subset of this many prepared clips (0 = all; paper Tab. 8)


@dataclass
class DataConfig:
    cache_dir: str = "cache"  # where `prepare` writes latents and text embeddings
    height: int = 480
    width: int = 720
    cache_dtype: str = "bf16"  # dtype of cached latent statistics and embeddings
    identity: IdentityDataConfig = field(default_factory=IdentityDataConfig)
    video: VideoDataConfig = field(default_factory=VideoDataConfig)
    holdout_identity: int = 0  # items kept out of training for the gradient monitor
    holdout_video: int = 0
    cls_token: bool = True  # false: no `<cls>` in any caption (paper Tab. 6 "w/o ref. token")
    subset_seed: int = 42  # which items max_pairs / max_clips keep (smaller subsets are nested in larger ones)


@dataclass
class LoraSettings:
    rank: int = 128
    alpha: float = 64.0
    dropout: float = 0.0  # the run's; the paper text says 0.1
    # The CogVideoX list doubles as "the family's default": left unchanged, a Wan model trains WAN_LORA_TARGET_MODULES.
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))


@dataclass
class TaskConfig:
    p_video: float = 0.2  # probability that a micro-batch (per_rank) or step (global) is a video step
    task_draw: str = "per_rank"  # per_rank: each micro-batch slot draws its task (the run) | global: one per step
    reference_drop: str = "image"  # video steps: image = whole reference dropped (the run) | token = per token
    p_reference_drop: float = 0.5  # drop probability of that unit; 1 = T2V-only ablation (paper Tab. 7)
    p_view_drop: float = 0.0  # identity micro-batch trained without its reference view (paper text: 0.5)
    reference_frame: str = "every_9th"  # video reference frame: every_9th (the run) | uniform | first
    video_conditioning: str = "i2v"  # i2v | t2v (video steps without reference: T2V ablation)
    schedule: str = "dual"  # dual (stochastic switch) | two_stage (identity, then video)
    two_stage_switch_step: int = 0  # two_stage: first step of the video stage (0: train.max_steps // 2)
    reference_timestep: str = "clean"  # Wan only: clean (timestep 0 for reference tokens, as inference) | video


@dataclass
class FlowConfig:
    """Flow-matching objective (Wan 2.2); CogVideoX trains v-prediction and ignores this section."""

    shift: float = 0.0  # sigma = s*u / (1 + (s-1)*u); 0 = the folder's scheduler flow_shift (5 for TI2V-5B)
    weighting_scheme: str = "none"  # how u is drawn (compute_density_for_timestep_sampling): none | logit_normal | mode


@dataclass
class OptimConfig:
    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-4
    eps: float = 1e-8
    scheduler: str = "cosine_with_restarts"  # any diffusers.optimization.get_scheduler name
    warmup_steps: int = 200
    num_cycles: int = 1  # restarts of cosine_with_restarts
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/sdvgen"
    max_steps: int = 4000
    identity_batch: int = 256  # global batch of an identity step (images)
    video_batch: int = 32  # global batch of a video step (clips)
    gradient_accumulation: int = 1  # micro-batches per step; per-rank micro-batch = batch / (accum * ranks)
    mixed_precision: str = "bf16"  # no | fp16 | bf16
    allow_tf32: bool = True
    gradient_checkpointing: bool = True
    seed: int = 42
    checkpoint_every: int = 50
    keep_checkpoints: int = 0  # 0 keeps all
    log_every: int = 1
    resume: str = ""  # "", "latest" or a checkpoint folder


@dataclass
class MonitorConfig:
    every: int = 0  # gradient monitor cadence K in steps; 0 = off
    identity_batch: int = 4  # held-out micro-batch sizes (per rank)
    video_batch: int = 1
    pcgrad: bool = False  # buffered PCGrad on video steps
    pcgrad_buffer: int = 4  # FIFO of recent identity gradients (4 or 8 in the paper)
    timesteps: int = 1  # timesteps per held-out sample; > 1 averages the gradient over stratified timesteps


@dataclass
class ValidationConfig:
    every: int = 0  # 0 = off
    references: list[str] = field(default_factory=list)  # images
    prompts: list[str] = field(default_factory=list)  # one per reference, with <cls>
    num_frames: int = 49
    num_inference_steps: int = 50
    guidance_scale: float = 6.0
    seed: int = 0
    clip: str = ""  # CLIP folder (as `sdvgen evaluate --clip`): log CLIP-T / CLIP-I of the validation videos
    dino: str = ""  # DINO ViT folder (as `sdvgen evaluate --dino`): log DINO-I


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    task: TaskConfig = field(default_factory=TaskConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def validate(self) -> None:
        """Raise `ConfigError` on values that cannot work, naming the option."""
        from .limits import check_limits

        check_limits(self)
        checks = [
            (self.model.path, "model.path must name a CogVideoX-5B or Wan 2.2 TI2V-5B diffusers folder"),
            (self.model.family in ("auto", "cogvideox", "wan22"), "model.family must be auto, cogvideox or wan22"),
            (self.task.reference_timestep in ("clean", "video"), "task.reference_timestep must be clean or video"),
            (self.flow.shift >= 0, "flow.shift must be >= 0 (0: the model folder's scheduler flow_shift)"),
            (self.flow.weighting_scheme in ("none", "logit_normal", "mode"),
             "flow.weighting_scheme must be none, logit_normal or mode"),
            (self.model.dtype in ("bf16", "fp16", "fp32"), "model.dtype must be bf16, fp16 or fp32"),
            (self.data.cache_dtype in ("bf16", "fp16", "fp32"), "data.cache_dtype must be bf16, fp16 or fp32"),
            (self.data.height % 16 == 0 and self.data.width % 16 == 0, "data.height/width must be multiples of 16"),
            (self.data.identity.jitter_px % 8 == 0 and self.data.identity.jitter_px >= 0,
             "data.identity.jitter_px must be a non-negative multiple of 8"),
            ((self.data.video.num_frames - 1) % 4 == 0, "data.video.num_frames must be 4k+1 (e.g. 49, 25, 9)"),
            (self.data.video.fps > 0, "data.video.fps must be positive"),
            (0.0 <= self.task.p_video <= 1.0, "task.p_video must be in [0, 1]"),
            (0.0 <= self.task.p_reference_drop <= 1.0, "task.p_reference_drop must be in [0, 1]"),
            (self.task.reference_drop in ("image", "token"), "task.reference_drop must be image or token"),
            (self.task.task_draw in ("per_rank", "global"), "task.task_draw must be per_rank or global"),
            (0.0 <= self.task.p_view_drop <= 1.0, "task.p_view_drop must be in [0, 1]"),
            (self.task.reference_frame in ("every_9th", "uniform", "first"),
             "task.reference_frame must be every_9th, uniform or first"),
            (self.data.identity.cls_placement in ("prefix", "subject_word"),
             "data.identity.cls_placement must be prefix or subject_word"),
            (self.data.video.cls_placement in ("none", "prefix"), "data.video.cls_placement must be none or prefix"),
            (self.data.identity.max_pairs >= 0 and self.data.video.max_clips >= 0,
             "data.identity.max_pairs and data.video.max_clips must be >= 0 (0 = all)"),
            (self.task.video_conditioning in ("i2v", "t2v"), "task.video_conditioning must be i2v or t2v"),
            (self.task.schedule in ("dual", "two_stage"), "task.schedule must be dual or two_stage"),
            (self.task.schedule != "two_stage" or 0 < self.two_stage_switch_step < self.train.max_steps,
             "task.two_stage_switch_step must be inside (0, train.max_steps) for schedule two_stage "
             "(0 switches at train.max_steps // 2, which needs train.max_steps >= 2)"),
            (len(self.optim.betas) == 2, "optim.betas must be two numbers"),
            (self.train.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision must be no, fp16 or bf16"),
            (self.train.max_steps > 0, "train.max_steps must be positive"),
            (self.train.gradient_accumulation > 0, "train.gradient_accumulation must be positive"),
            (self.train.checkpoint_every >= 0, "train.checkpoint_every must be >= 0"),
            (self.monitor.pcgrad_buffer > 0, "monitor.pcgrad_buffer must be positive"),
            (self.monitor.timesteps > 0, "monitor.timesteps must be positive"),
            (not self.monitor.pcgrad or self.task.task_draw == "global",
             "monitor.pcgrad needs task.task_draw=global: PCGrad projects a whole step's video gradient, and a "
             "per_rank draw mixes both tasks into one synchronised gradient"),
            (not self.validation.every or self.validation.references,
             "validation.every > 0 needs validation.references (images) and one prompt each"),
            (len(self.validation.references) == len(self.validation.prompts),
             "validation.references and validation.prompts need one prompt per reference"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def two_stage_switch_step(self) -> int:
        """The first video step of the two-stage schedule (the option, or the middle of the run when 0)."""
        return self.task.two_stage_switch_step or self.train.max_steps // 2

    @property
    def video_steps_possible(self) -> bool:
        return self.task.p_video > 0 or self.task.schedule == "two_stage"


def _coerce(value, annotation, key: str):
    """Convert a YAML/CLI value to the field's annotated type."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        return [_coerce(v, item_type, key) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in the schema")
    if annotation is bool:
        if isinstance(value, str):
            lowered = value.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if annotation is str and isinstance(value, bool):
        return "yes" if value else "no"  # YAML 1.1 reads an unquoted `no` (train.mixed_precision) as false
    if annotation in (int, float, str):
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be {annotation.__name__}; got {value!r}") from None
    raise ConfigError(f"{key}: unsupported type {annotation}")


RENAMED = {
    "task.p_token_drop": "task.p_reference_drop (with task.reference_drop=token for the per-token drop)",
}


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        old = f"{prefix}{unknown[0]}"
        if old in RENAMED:
            raise ConfigError(f"option {old} was renamed: use {RENAMED[old]}")
        raise ConfigError(f"unknown option {old} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.option=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw) if raw.strip() else ""


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return data


def _merge(base: dict, overlay: dict) -> dict:
    """`overlay` on top of `base`: sections merge key by key, any other value (lists too) replaces."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(paths: str | Path | list | tuple | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config from YAML files (or the defaults) with `section.option=value` overrides applied in order.

    Several files are overlays: each later file changes only the options it names (e.g. a base recipe and
    then `training/configs/ablations/tab3_image_only.yaml`). Relative paths inside the files stay relative
    to the working directory, like every CLI path.
    """
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    data: dict = {}
    for path in paths:
        data = _merge(data, _read_yaml(Path(path)))
    for override in overrides:
        _apply_override(data, override)
    return _build(Config, data, "")


def save_config(config: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
