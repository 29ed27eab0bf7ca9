"""Speed and memory options on top of diffusers' hooks: fp8 weights, compiled blocks, attention backends, step caching.

One entry point: `apply_acceleration(pipe, AccelerationConfig(...))` (what `SDVGenPipeline.configure_acceleration`
calls); `check_acceleration` refuses an unusable combination before anything loads. Every option is a
diffusers/PyTorch mechanism; what is ours is the glue the CogVideoX + LoRA + reference-token case needs:

- weights "fp8": diffusers layerwise casting (float8_e4m3fn storage, compute in the pipeline precision) on the
  transformer (its `_skip_layerwise_casting_patterns` keep patch embedding and norms/modulation out) and on the
  T5's linear layers. LoRA weights stay in the compute precision. Unfused, the LoRA adds its exact delta to
  the fp8 base layer's output. Fused ("merged into fp8 storage") means W8 = fp8(W8_base + delta): the delta is
  quantised together with the weight, so a fused LoRA in fp8 is as precise as the fp8 grid around each weight,
  and the unfused fp8 weights wait on the CPU so that unfusing (a strength change) is exact.
  Weight edits (LoRA load/strength/fuse) happen in the compute precision (`editable_weights`) and are cast back.
- compile "blocks": regional `torch.compile` of the repeated `CogVideoXBlock`s (diffusers' `compile_repeated_blocks`).
  PEFT keeps LoRA scaling as a Python float, which dynamo bakes into the graph; `hold_lora_scalings_in_tensors`
  keeps one 0-d tensor per layer instead, so a strength change is a data change, not a recompile.
- attention: `sdvgen_core.attention`.
- cache "first_block": diffusers' First Block Cache; the pipeline gives each transformer call of a step its own
  `cache_context` (CFG batch, reference-free branch), so one branch's cache never serves the other.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .attention import check_attention_backend, set_attention
from .acceleration_options import CACHES, COMPILE_MODES, DEFAULT_BLOCKS_PER_GROUP, DEFAULT_CACHE_THRESHOLD, WEIGHTS
from .errors import SDVGenError

FP8_STORAGE = torch.float8_e4m3fn
_SCALING_TENSORS = "_sdvgen_scaling_tensors"
_UNFUSED_WEIGHT = "_sdvgen_unfused_fp8_weight"


@dataclass(frozen=True)
class AccelerationConfig:
    """Speed/memory options; defaults change nothing.

    weights: "precision" or "fp8" (layerwise-cast storage). compile: "off" or "blocks". attention: see
    `sdvgen_core.attention.ATTENTION_BACKENDS`. cache: "off" or "first_block" with `cache_threshold` (relative
    change of the first block's residual under which the other blocks are skipped; higher = faster, rougher).
    blocks_per_group: transformer blocks moved per transfer in the group_offload memory mode.
    compile_backend: torch.compile backend ("inductor"; tests use "eager"/"aot_eager" or a counting callable).
    """

    weights: str = "precision"
    compile: str = "off"
    attention: str = "sdpa"
    cache: str = "off"
    cache_threshold: float = DEFAULT_CACHE_THRESHOLD
    blocks_per_group: int = DEFAULT_BLOCKS_PER_GROUP
    compile_backend: str | Callable = "inductor"


def check_acceleration(config: AccelerationConfig, device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise `SDVGenError` naming the option and the fix unless `config` can run on `device` in `dtype`."""
    device = torch.device(device)
    for option, value, choices in (("weights", config.weights, WEIGHTS), ("compile", config.compile, COMPILE_MODES),
                                   ("cache", config.cache, CACHES)):
        if value not in choices:
            raise SDVGenError(f"{option} {value!r} is not one of {list(choices)}")
    if not (isinstance(config.cache_threshold, (int, float)) and math.isfinite(config.cache_threshold)
            and config.cache_threshold > 0):
        raise SDVGenError(f"cache threshold {config.cache_threshold!r} must be a positive number (e.g. 0.05)")
    if not isinstance(config.blocks_per_group, int) or config.blocks_per_group < 1:
        raise SDVGenError(f"blocks per group {config.blocks_per_group!r} must be a whole number >= 1")
    check_attention_backend(config.attention, device, dtype)
    if config.weights == "fp8":
        try:
            torch.ones(2, device=device, dtype=dtype).to(FP8_STORAGE).to(dtype)
        except (RuntimeError, TypeError) as error:
            raise SDVGenError(
                f"weights 'fp8' cannot be stored on {device} ({error}); choose weights 'precision'"
            ) from None
    if config.compile == "blocks" and config.compile_backend == "inductor":
        _check_inductor(device)


def _check_inductor(device: torch.device) -> None:
    """torch.compile's default backend needs Triton on a GPU and a C++ compiler on the CPU."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise SDVGenError("compile 'blocks' needs Triton on the GPU (pip install triton); choose compile 'off'")
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except (RuntimeError, OSError, ImportError) as error:
        raise SDVGenError(
            f"compile 'blocks' on {device} needs a C++ compiler ({error}); install g++ or choose compile 'off'"
        ) from None


def apply_acceleration(pipe: Any, config: AccelerationConfig) -> None:
    """Make `pipe` (an `SDVGenPipeline`) use `config`, changing only what differs from `pipe.acceleration`."""
    previous: AccelerationConfig = pipe.acceleration
    transformer = pipe.transformer
    if previous.weights == "fp8" and config.weights != "fp8":
        raise SDVGenError("weights were stored in fp8 when the model was configured; reload the model to go back "
                          "to weights 'precision' (the original precision is gone)")
    if config.attention != previous.attention:
        set_attention(transformer, config.attention)
    if config.weights == "fp8" and previous.weights != "fp8":
        compute = transformer.dtype
        transformer.enable_layerwise_casting(storage_dtype=FP8_STORAGE, compute_dtype=compute)
        _cast_text_encoder(pipe.text_encoder, compute)
    cache_settings = (config.cache, config.cache_threshold)
    if cache_settings != (previous.cache, previous.cache_threshold):
        if transformer.is_cache_enabled:
            transformer.disable_cache()
        if config.cache == "first_block":
            from diffusers.hooks import FirstBlockCacheConfig

            transformer.enable_cache(FirstBlockCacheConfig(threshold=float(config.cache_threshold)))
    if (config.compile, config.compile_backend) != (previous.compile, previous.compile_backend):
        _uncompile(transformer)
        if config.compile == "blocks":
            hold_lora_scalings_in_tensors(transformer)
            transformer.compile_repeated_blocks(backend=config.compile_backend, dynamic=False)
    pipe.acceleration = config


def _cast_text_encoder(text_encoder: nn.Module, compute: torch.dtype) -> None:
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    # T5's feed-forward casts its activations to `wo`'s dtype (transformers keeps `wo` in fp32 for fp16 runs):
    # those layers must keep the compute dtype or the activations would become fp8.
    keep = tuple(rf"(^|\.){re.escape(name)}$" for name in getattr(text_encoder, "_keep_in_fp32_modules", None) or ())
    apply_layerwise_casting(text_encoder, FP8_STORAGE, compute, skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN + keep)


def _uncompile(transformer: nn.Module) -> None:
    for module in transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


def _layerwise_hooks(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    found = []
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(_LAYERWISE_CASTING_HOOK) if registry is not None else None
        if hook is not None:
            found.append((module, hook))
    return found


@contextmanager
def editable_weights(transformer: nn.Module, keep_unfused: bool = False) -> Iterator[None]:
    """Inside: fp8-stored layers hold their weights in the compute precision, so PEFT can load, merge and
    unmerge LoRA deltas (fp8 has no arithmetic); on exit they are stored in fp8 again. Without fp8: nothing.

    Unmerging fp8(W8 + delta) - delta does not give W8 back (W8 + delta may round on a coarser part of the
    grid), so a fused fp8 layer keeps its unfused fp8 weights on the CPU (1 byte per weight) and a LoRA
    edit starts from them: entering unfuses (exactly for the fp8 layers). `keep_unfused`: the edit may fuse.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    cast = _layerwise_hooks(transformer)
    owners = {id(m.get_base_layer()): m for m in transformer.modules() if isinstance(m, BaseTunerLayer)}
    unfused: dict[int, torch.Tensor] = {}
    restored = False
    for module, hook in cast:
        saved = module.__dict__.pop(_UNFUSED_WEIGHT, None)
        owner = owners.get(id(module))
        if saved is not None and owner is not None and owner.merged:
            module.weight.data = saved.to(module.weight.device)
            owner.merged_adapters.clear()
            restored = True
        if keep_unfused:
            unfused[id(module)] = module.weight.detach().to("cpu", copy=True)
        module.to(dtype=hook.compute_dtype)
    if restored:  # the rest (layers kept in the compute precision) unmerge by subtraction, as PEFT does
        for owner in owners.values():
            if owner.merged:
                owner.unmerge()
    try:
        yield
    finally:
        owners = {id(m.get_base_layer()): m for m in transformer.modules() if isinstance(m, BaseTunerLayer)}
        for module, hook in cast:
            module.to(dtype=hook.storage_dtype)
            owner = owners.get(id(module))
            if id(module) in unfused and owner is not None and owner.merged:
                module.__dict__[_UNFUSED_WEIGHT] = unfused[id(module)]
        if cast:
            _guard_new_lora_layers(transformer)


def _guard_new_lora_layers(transformer: nn.Module) -> None:
    from diffusers.hooks.hooks import HookRegistry
    from diffusers.hooks.layerwise_casting import (
        _PEFT_AUTOCAST_DISABLE_HOOK,
        PeftInputAutocastDisableHook,
        _is_layerwise_casting_active,
    )
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer) and _is_layerwise_casting_active(module):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            if registry.get_hook(_PEFT_AUTOCAST_DISABLE_HOOK) is None:
                registry.register_hook(PeftInputAutocastDisableHook(), _PEFT_AUTOCAST_DISABLE_HOOK)


def hold_lora_scalings_in_tensors(transformer: nn.Module) -> None:
    """Replace each LoRA layer's float scaling by a 0-d tensor kept per layer and adapter (updated in place).

    Under torch.compile a float attribute is a constant of the graph: every strength change would recompile
    all blocks. A tensor is an input, so only its value changes. Call after every `set_adapters`.
    """
    from peft.tuners.lora import LoraLayer

    for module in transformer.modules():
        if not isinstance(module, LoraLayer):
            continue
        held: dict[str, torch.Tensor] = module.__dict__.setdefault(_SCALING_TENSORS, {})
        for adapter, scaling in module.scaling.items():
            if isinstance(scaling, torch.Tensor):
                continue
            device = next(iter(module.lora_A[adapter].parameters())).device if adapter in module.lora_A else "cpu"
            tensor = held.get(adapter)
            if tensor is None or tensor.device != device:
                tensor = held[adapter] = torch.tensor(0.0, device=device)
            tensor.fill_(scaling)
            module.scaling[adapter] = tensor


def after_lora_change(pipe: Any) -> None:
    """Re-establish what a LoRA load/strength/fuse change undoes (compiled graphs must see tensor scalings)."""
    if pipe.acceleration.compile == "blocks":
        hold_lora_scalings_in_tensors(pipe.transformer)


# `auto` on a GPU, by total device memory (CogVideoX-5B in bf16: transformer 11.1 GB, T5-XXL 9.5 GB, VAE 0.4 GB,
# plus activations). Thresholds are estimates from these sizes until a GPU bench fills bench/README.md.
AUTO_MEMORY_MODES = ((40, "on_device"), (20, "model_offload"), (0, "group_offload"))


def resolve_memory_mode(mode: str, device: torch.device) -> str:
    """The concrete memory mode for `mode` on `device`: `auto` is on_device on a CPU, else by device memory."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "on_device"
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return next(name for minimum, name in AUTO_MEMORY_MODES if total_gib >= minimum)


def apply_group_offload(pipe: Any, device: torch.device, blocks_per_group: int) -> None:
    """diffusers' block-level group offloading of every model: weights on the CPU, `blocks_per_group` blocks at a
    time on `device`; on CUDA the next group is prefetched on a side stream while the current one computes."""
    streams = device.type == "cuda"
    pipe.enable_group_offload(
        onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
        num_blocks_per_group=blocks_per_group, non_blocking=streams, use_stream=streams,
    )


def remove_group_offload(pipe: Any) -> None:
    """Take diffusers' group offloading hooks off every model (weights stay where they are: on the CPU)."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING

    for component in pipe.components.values():
        registry = getattr(component, "_diffusers_hook", None)
        if isinstance(component, nn.Module) and registry is not None:
            for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING):
                registry.remove_hook(name, recurse=True)


def with_options(config: AccelerationConfig, **options: Any) -> AccelerationConfig:
    """`config` with `options` changed; unknown names raise `SDVGenError`."""
    unknown = sorted(set(options) - set(AccelerationConfig.__dataclass_fields__))
    if unknown:
        raise SDVGenError(f"unknown acceleration option(s) {unknown}; known: {sorted(AccelerationConfig.__dataclass_fields__)}")
    return replace(config, **options)


