"""LoRA files: validation, loading (release format and ours), strength, fusing, and the writer.

File format (spec: "LoRA"): safetensors, diffusers/PEFT keys with a `transformer.` prefix
(`transformer.transformer_blocks.0.attn1.to_q.lora_A.weight`), only LoRA tensors. Files we write fold
alpha/rank into `lora_B`, so diffusers' CogVideoX loader (which assumes alpha = rank without metadata)
computes the same thing as we do; the header carries diffusers' `lora_adapter_metadata` and our
`sdvgen.*` keys. The authors' release file has no metadata and no alpha: its rank 128 / alpha 64
convention (scale 0.5) is applied at load.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import LoraLoadError
from .files import atomic_output
from .validation import LORA_STRENGTH_RANGE, check_float

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj", "text_proj", "norm1.linear", "norm2.linear", "ff.net.2",
)
# Wan: self- (attn1) and cross-attention (attn2) q/k/v/o, both FFN layers, the patch embedding and the
# text projection; the analogues of the CogVideoX targets above (Wan has no per-block modulation Linear).
WAN_LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "patch_embedding",
    "condition_embedder.text_embedder.linear_1", "condition_embedder.text_embedder.linear_2",
)
# The family is recorded in the header; older files are recognised by their block names.
FAMILY_BLOCK_PREFIXES = {"cogvideox": "transformer_blocks.", "wan22": "blocks."}
RELEASE_RANK = 128
RELEASE_ALPHA = 64
DEFAULT_ADAPTER = "sdvgen"
FORMAT_VERSION = "1"
_KEY_PREFIXES = ("transformer.", "base_model.model.")


def make_lora_config(
    rank: int = RELEASE_RANK,
    alpha: float = RELEASE_ALPHA,
    dropout: float = 0.0,
    target_modules: tuple[str, ...] | list[str] = LORA_TARGET_MODULES,
) -> LoraConfig:
    """PEFT config of the paper's adapter (rank 128, alpha 64, suffix-matched targets)."""
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), init_lora_weights=True
    )


@dataclass
class LoraFileInfo:
    """What a loaded LoRA file turned out to be."""

    path: str
    num_modules: int
    rank: int
    alpha: float
    alpha_source: str  # "sdvgen", "diffusers-metadata" or "release-default"
    metadata: dict[str, str] = field(default_factory=dict)
    file_id: tuple[int, int, int] = (0, 0, 0)  # (size, mtime in ns, inode) when read: a replaced file differs

    def is_file(self, path: str | os.PathLike) -> bool:
        """Whether `path` is the file this was read from, unchanged since (same place, size, time and inode)."""
        return Path(path).resolve() == Path(self.path).resolve() and file_identity(path) == self.file_id


def file_identity(path: str | os.PathLike) -> tuple[int, int, int]:
    """(size, mtime_ns, inode) of `path`, or zeros if it cannot be stat'ed (never equal to a real file's)."""
    try:
        stat = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


@dataclass
class PreparedLora:
    """A LoRA file read and checked against a model, not yet applied to it (`apply_lora` does that)."""

    tensors: dict[str, torch.Tensor]  # normalized keys `<module>.lora_A.weight`
    config: dict  # PEFT LoraConfig fields for `load_lora_adapter`
    info: LoraFileInfo


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise LoraLoadError(f"LoRA path {str(path)!r} is a folder; give the .safetensors file inside it")
    if not path.is_file():
        raise LoraLoadError(f"LoRA file {str(path)!r} does not exist")
    return path


def _unreadable(path: Path, error: Exception) -> LoraLoadError:
    hint = " (a pickle .pt/.ckpt/.bin file? those are never loaded: convert it to safetensors)"
    return LoraLoadError(f"LoRA file {str(path)!r} is not a readable safetensors file{hint}: {error}")


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; never unpickles anything."""
    path = _existing_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error) from None
    return tensors, metadata


def check_lora_header(path: str | os.PathLike) -> int:
    """Check a LoRA file from its header alone (no tensors read): readable safetensors, only LoRA keys, and as
    many modules as its header states. Returns the module count. The full check against a model is `prepare_lora`.
    """
    path = _existing_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys, metadata = list(handle.keys()), dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error) from None
    normalized = _normalize_keys(dict.fromkeys(keys), str(path))
    modules = {key.split(".lora_A.")[0]: 0 for key in normalized if ".lora_A." in key}
    _check_module_count(metadata, modules, str(path))
    return len(modules)


def _normalize_keys(tensors: dict[str, torch.Tensor | None], path: str) -> dict[str, torch.Tensor | None]:
    """Strip `transformer.` / `base_model.model.` prefixes and PEFT adapter names; reject non-LoRA tensors."""
    if not any(".lora_A." in key or ".lora_B." in key for key in tensors):
        raise LoraLoadError(
            f"{path!r} holds no LoRA tensors (no `lora_A`/`lora_B` keys; first key: {next(iter(tensors), 'none')!r}); "
            f"it is not a diffusers/PEFT LoRA"
        )
    normalized = {}
    for key, value in tensors.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            raise LoraLoadError(
                f"{path!r} has a non-LoRA tensor {key!r}; expected only diffusers/PEFT `lora_A`/`lora_B` weights "
                f"(kohya/LyCORIS files with alpha or hada keys are not supported)"
            )
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        module, _, rest = key.partition(".lora_")
        kind = rest.split(".")[0]  # "A" or "B"
        normalized[f"{module}.lora_{kind}.weight"] = value
    return normalized


def model_family(transformer: nn.Module) -> str:
    """`cogvideox` or `wan22` for a transformer, from its class."""
    from diffusers import WanTransformer3DModel

    return "wan22" if isinstance(transformer, WanTransformer3DModel) else "cogvideox"


def lora_file_family(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str | None:
    """The backbone family a LoRA file was made for: its `sdvgen.family` header, else its block names."""
    if "sdvgen.family" in metadata:
        return metadata["sdvgen.family"]
    for family, prefix in FAMILY_BLOCK_PREFIXES.items():
        if any(key.startswith(prefix) for key in tensors):
            return family
    return None


def _check_family(tensors: dict[str, torch.Tensor], metadata: dict[str, str], transformer: nn.Module, path: str) -> None:
    file_family, family = lora_file_family(tensors, metadata), model_family(transformer)
    if file_family is not None and file_family != family:
        raise LoraLoadError(
            f"{path!r} is a LoRA for the {file_family} backbone, but the loaded model is {family}; use an SDV-Gen "
            f"LoRA trained for {family}"
        )


def _module_ranks(tensors: dict[str, torch.Tensor], transformer: nn.Module, path: str) -> dict[str, int]:
    """Check every LoRA pair against the model; return each module's rank. Errors name the first bad key."""
    modules = dict(transformer.named_modules())
    ranks = {}
    for key in sorted(tensors):
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        module = modules.get(name)
        base = getattr(module, "base_layer", module)
        if module is None or not isinstance(base, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            raise LoraLoadError(
                f"{path!r} is a LoRA for another model: key 'transformer.{key}' names module {name!r}, which this "
                f"{model_family(transformer)} transformer does not have as a Linear/Conv layer"
            )
        b_key = f"{name}.lora_B.weight"
        if b_key not in tensors:
            raise LoraLoadError(f"{path!r}: key 'transformer.{key}' has no matching 'transformer.{b_key}'")
        lora_a, lora_b = tensors[key], tensors[b_key]
        rank = lora_a.shape[0]
        if isinstance(base, nn.Linear):
            expected_a, expected_b = (rank, base.in_features), (base.out_features, rank)
        else:
            expected_a = (rank, base.in_channels, *base.kernel_size)
            expected_b = (base.out_channels, rank, *(1,) * len(base.kernel_size))
        if tuple(lora_a.shape) != expected_a:
            raise LoraLoadError(
                f"{path!r}: shape mismatch at 'transformer.{key}': {tuple(lora_a.shape)}, but module {name!r} needs "
                f"{expected_a} (a LoRA for another model size?)"
            )
        if tuple(lora_b.shape) != expected_b:
            raise LoraLoadError(
                f"{path!r}: rank/shape mismatch at 'transformer.{b_key}': {tuple(lora_b.shape)}, but lora_A has rank "
                f"{rank} and module {name!r} needs {expected_b}"
            )
        ranks[name] = rank
    orphans = [k for k in tensors if ".lora_B." in k and k.split(".lora_B.")[0] not in ranks]
    if orphans:
        raise LoraLoadError(f"{path!r}: key 'transformer.{orphans[0]}' has no matching lora_A")
    return ranks


def _alphas(metadata: dict[str, str], ranks: dict[str, int], path: str) -> tuple[dict[str, float], str]:
    """Per-module alpha: from diffusers' adapter metadata if present, else the release's alpha = rank / 2."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if raw:
        try:
            config = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
            if "lora_alpha" in config:
                default = float(config["lora_alpha"])
                pattern = config.get("alpha_pattern") or {}
                alphas = {
                    name: float(next((a for p, a in pattern.items() if name == p or name.endswith("." + p)), default))
                    for name in ranks
                }
                bad = next((name for name, a in alphas.items() if not (math.isfinite(a) and a > 0)), None)
                if bad is not None:
                    raise ValueError(f"alpha {alphas[bad]} for module {bad!r} is not a positive finite number")
                return alphas, "sdvgen" if "sdvgen.format_version" in metadata else "diffusers-metadata"
        except (ValueError, TypeError, AttributeError) as error:
            raise LoraLoadError(f"{path!r}: header entry {LORA_ADAPTER_METADATA_KEY!r} is unusable: {error}") from None
    return {name: rank * RELEASE_ALPHA / RELEASE_RANK for name, rank in ranks.items()}, "release-default"


def _check_values(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Refuse NaN/inf weights (they would make every video black), naming the first bad key."""
    for key in sorted(tensors):
        if not torch.isfinite(tensors[key]).all():
            raise LoraLoadError(
                f"{path!r} has NaN or infinite values at 'transformer.{key}'; the file is damaged (or was saved "
                f"from a diverged training run): use another checkpoint"
            )


def _check_module_count(metadata: dict[str, str], ranks: dict[str, int], path: str) -> None:
    """A file whose header states how many modules it holds must hold that many (else it was cut or merged badly)."""
    stated = metadata.get("sdvgen.num_modules")
    if stated is None:
        return
    if not stated.isdigit() or int(stated) != len(ranks):
        raise LoraLoadError(
            f"{path!r}: the header says it holds {stated} LoRA modules but the file has {len(ranks)}; the file is "
            f"incomplete or damaged: re-export or re-download it"
        )


def prepare_lora(transformer: nn.Module, path: str | os.PathLike) -> PreparedLora:
    """Read `path` and check it completely against `transformer` without changing the model.

    Raises `LoraLoadError` naming the file and the first bad key (wrong model, shapes, NaN/inf values,
    a header that disagrees with the contents).
    """
    path = str(path)
    file_id = file_identity(path)
    tensors, metadata = read_lora_file(path)
    tensors = _normalize_keys(tensors, path)
    _check_family(tensors, metadata, transformer, path)
    ranks = _module_ranks(tensors, transformer, path)
    _check_module_count(metadata, ranks, path)
    _check_values(tensors, path)
    alphas, alpha_source = _alphas(metadata, ranks, path)

    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {name: r for name, r in ranks.items() if r != rank},
        "alpha_pattern": {name: a for name, a in alphas.items() if a != alpha},
    }
    sdvgen_metadata = {k: v for k, v in metadata.items() if k.startswith("sdvgen.")}
    info = LoraFileInfo(path, len(ranks), rank, alpha, alpha_source, sdvgen_metadata, file_id)
    return PreparedLora(tensors, config, info)


def apply_lora(
    transformer: nn.Module, prepared: PreparedLora, strength: float = 1.0, adapter_name: str = DEFAULT_ADAPTER
) -> LoraFileInfo:
    """Load a prepared LoRA as adapter `adapter_name` at `strength`, replacing one of that name (unfused first)."""
    unfuse_lora(transformer)  # deleting a merged adapter would leave its delta in the base weights
    if adapter_name in getattr(transformer, "peft_config", {}):
        transformer.delete_adapters(adapter_name)
    model_dtype = next(transformer.parameters()).dtype
    transformer.load_lora_adapter(
        {k: v.to(model_dtype) for k, v in prepared.tensors.items()}, prefix=None, adapter_name=adapter_name,
        metadata=prepared.config,
    )
    info = prepared.info
    loaded = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    if set(loaded) != set(prepared.tensors):
        transformer.delete_adapters(adapter_name)
        missing = sorted(set(prepared.tensors) - set(loaded))
        raise LoraLoadError(f"{info.path!r}: {len(missing)} LoRA tensors did not load, first {missing[:1]}")
    transformer.set_adapters([adapter_name], weights=[strength])
    logger.info(
        "loaded LoRA %s: %d modules, rank %d, alpha %s (%s), strength %s",
        info.path, info.num_modules, info.rank, info.alpha, info.alpha_source, strength,
    )
    return info


def load_lora(
    transformer: nn.Module,
    path: str | os.PathLike,
    strength: float = 1.0,
    adapter_name: str = DEFAULT_ADAPTER,
) -> LoraFileInfo:
    """Validate `path` against `transformer`, then load it as PEFT adapter `adapter_name` at `strength`.

    Replaces an adapter of the same name (unfusing first). Raises `LoraLoadError` naming the file and the
    first bad key; a refused file leaves the model as it was.
    """
    strength = check_float("LoRA strength", strength, *LORA_STRENGTH_RANGE)
    return apply_lora(transformer, prepare_lora(transformer, path), strength, adapter_name)


def is_fused(transformer: nn.Module) -> bool:
    """Whether any LoRA layer of `transformer` is merged into its base weights."""
    return any(m.merged for _, m in _tuner_layers(transformer))


def _tuner_layers(transformer: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)]


def fuse_lora(transformer: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Merge the adapter into the base weights, keeping a CPU copy of every weight it changes.

    `unfuse_lora` puts those copies back, so fusing and unfusing (any number of times, at any strength)
    leaves the base model bit-identical; subtracting the delta again, as PEFT does, would not in bf16.
    The copy costs as much CPU memory as the LoRA-targeted weights (ComfyUI keeps the same backup).
    """
    if is_fused(transformer):
        return
    backup = {
        name: module.get_base_layer().weight.detach().to("cpu", copy=True) for name, module in _tuner_layers(transformer)
    }
    transformer._sdvgen_base_weights = backup
    try:
        transformer.fuse_lora(adapter_names=[adapter_name], safe_fusing=True)
    except ValueError as error:  # safe_fusing: the merge overflowed to NaN/inf (e.g. fp16 at a high strength)
        unfuse_lora(transformer)
        raise LoraLoadError(f"fusing the LoRA gives NaN/inf weights ({error}); lower its strength or use bf16/fp32") from None


def unfuse_lora(transformer: nn.Module) -> None:
    """Undo `fuse_lora`, restoring the base weights exactly from the copy taken when fusing."""
    backup = getattr(transformer, "_sdvgen_base_weights", None)
    if is_fused(transformer):
        transformer.unfuse_lora()
    if backup is None:
        return
    with torch.no_grad():
        for name, module in _tuner_layers(transformer):
            if name in backup:
                weight = module.get_base_layer().weight
                weight.copy_(backup[name].to(device=weight.device, dtype=weight.dtype))
    del transformer._sdvgen_base_weights


def set_lora_strength(transformer: nn.Module, strength: float, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Change the strength of a loaded adapter; a fused model is unfused, rescaled and fused again."""
    strength = check_float("LoRA strength", strength, *LORA_STRENGTH_RANGE)
    fused = is_fused(transformer)
    unfuse_lora(transformer)
    transformer.set_adapters([adapter_name], weights=[strength])
    if fused:
        fuse_lora(transformer, adapter_name)


def lora_state_dict_for_file(
    transformer: nn.Module, adapter_name: str = DEFAULT_ADAPTER
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The adapter's tensors with alpha/rank folded into `lora_B` and the `transformer.` prefix added."""
    config = transformer.peft_config[adapter_name]
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    folded = {}
    for key, value in state.items():
        value = value.detach().to("cpu", torch.float32)
        if ".lora_B." in key:
            name = key.split(".lora_B.")[0]
            rank = _pattern_value(config.rank_pattern, name, config.r)
            alpha = _pattern_value(config.alpha_pattern, name, config.lora_alpha)
            value = value * (alpha / rank)
        folded[f"transformer.{key}"] = value.contiguous()
    return folded, config


def _pattern_value(pattern: dict, name: str, default: float) -> float:
    return next((v for p, v in (pattern or {}).items() if name == p or name.endswith("." + p)), default)


def save_lora(
    transformer: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    dtype: torch.dtype = torch.bfloat16,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write the adapter as a LoRA file loadable here and by diffusers' `load_lora_weights`.

    Written to a temporary file in the same folder and renamed, so an interrupted save never leaves a
    half-written LoRA behind. `extra_metadata` (e.g. base model, `<cls>` handling, training recipe) goes
    into the header under its own keys.
    """
    path = Path(path)
    tensors, config = lora_state_dict_for_file(transformer, adapter_name)
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    ranks = {k.removeprefix("transformer.").split(".lora_A.")[0]: v.shape[0] for k, v in tensors.items() if ".lora_A." in k}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    targets = config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    diffusers_config = {
        "r": rank,
        "lora_alpha": rank,  # alpha folded into lora_B
        "target_modules": sorted(ranks),
        "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {n: r for n, r in ranks.items() if r != rank},
    }
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in diffusers_config.items()}, sort_keys=True),
        "sdvgen.format_version": FORMAT_VERSION,
        "sdvgen.family": model_family(transformer),
        "sdvgen.rank": str(config.r),
        "sdvgen.alpha": str(config.lora_alpha),
        "sdvgen.alpha_folded": "true",
        "sdvgen.target_modules": json.dumps(targets),
        "sdvgen.num_modules": str(len(ranks)),
    }
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    with atomic_output(path) as tmp_name:
        save_file(tensors, tmp_name, metadata=metadata)
    return path
