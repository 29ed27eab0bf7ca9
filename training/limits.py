"""Value ranges of the numeric options, checked by `Config.validate` before anything loads.

Every float option, including ones added later, must be finite; the table below bounds the options whose
range is known. Each failure names the option, the expectation and the value.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

Rule = tuple[Callable[[Any], bool], str]

POSITIVE: Rule = (lambda v: v > 0, "> 0")
AT_LEAST_ONE: Rule = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE: Rule = (lambda v: v >= 0, ">= 0")
PROBABILITY_BELOW_ONE: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
FOUR_K_PLUS_ONE: Rule = (lambda v: v >= 1 and (v - 1) % 4 == 0, "4k+1 frames (e.g. 49, 25, 9)")

RULES: dict[str, Rule] = {
    "data.height": (lambda v: v >= 16, ">= 16"),
    "data.width": (lambda v: v >= 16, ">= 16"),
    "data.holdout_identity": NON_NEGATIVE,
    "data.holdout_video": NON_NEGATIVE,
    "data.video.num_frames": FOUR_K_PLUS_ONE,
    "lora.rank": AT_LEAST_ONE,
    "lora.alpha": POSITIVE,
    "lora.dropout": PROBABILITY_BELOW_ONE,
    "lora.target_modules": (bool, "a non-empty list of module names"),
    "task.two_stage_switch_step": NON_NEGATIVE,
    "optim.lr": POSITIVE,
    "optim.betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "optim.eps": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.num_cycles": AT_LEAST_ONE,
    "optim.max_grad_norm": POSITIVE,
    "train.identity_batch": AT_LEAST_ONE,
    "train.video_batch": AT_LEAST_ONE,
    "train.keep_checkpoints": NON_NEGATIVE,
    "train.log_every": AT_LEAST_ONE,
    "train.seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "data.subset_seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "monitor.every": NON_NEGATIVE,
    "monitor.identity_batch": AT_LEAST_ONE,
    "monitor.video_batch": AT_LEAST_ONE,
    "validation.every": NON_NEGATIVE,
    "validation.num_frames": FOUR_K_PLUS_ONE,
    "validation.num_inference_steps": AT_LEAST_ONE,
    "validation.guidance_scale": NON_NEGATIVE,
}


def _leaves(node, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", value


def check_limits(config) -> None:
    """Raise `ConfigError` for the first option outside its range (non-finite floats first)."""
    from diffusers.optimization import SchedulerType

    from .config import ConfigError

    values = dict(_leaves(config))
    for option, value in values.items():
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ConfigError(f"{option} must be a finite number; got {value!r}")
    for option, (ok, expectation) in RULES.items():
        if not ok(values[option]):
            raise ConfigError(f"{option} must be {expectation}; got {values[option]!r}")
    schedulers = [s.value for s in SchedulerType]
    if config.optim.scheduler not in schedulers:
        raise ConfigError(f"optim.scheduler must be one of {', '.join(schedulers)}; got {config.optim.scheduler!r}")
    accumulation = config.train.gradient_accumulation
    for option in ("train.identity_batch", "train.video_batch"):
        if accumulation > 0 and values[option] % accumulation:
            raise ConfigError(f"{option}={values[option]} must be divisible by train.gradient_accumulation "
                              f"({accumulation}) times the number of processes")
