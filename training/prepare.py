"""`prepare`: encode every training item once (VAE latent statistics, T5 embeddings) into a safetensors cache.

Layout of `data.cache_dir`:
    meta.json                   family, sizes, VAE normalisation values, `<cls>` wiring, expected item shapes; `train` checks
                                it against its config (written first with "complete": false, then true)
    identity/<key>.safetensors  view{0,1}.mean/.std `[C, h+2j, w+2j]` (j = jitter margin in latent pixels),
                                text.{0,1} `[L, D]` (caption of view i as the target; absent if never a target;
                                L = 226 T5 tokens for CogVideoX, 512 UMT5 tokens for Wan)
    video/<key>.safetensors     video.mean/.std `[T, C, h, w]`; frames.mean/.std `[F, C, h, w]` (every frame
                                encoded alone as a 1-frame video, so `train` can pick a random reference frame);
                                text `[L, D]`
    report-rank<r>.json         skipped inputs by reason (and broken cache files redone)
    items-rank<r>.json          the items each rank's share of the sources produces
    stale/<kind>/               items the configured sources no longer produce, set aside (not used by `train`)

The latent *distribution* (mean, std) of the raw VAE posterior is stored, not a sample: `train` draws a fresh
sample every step, as encoding on the fly would, and normalises it as the family's pipeline does
(`Backbone.normalize_latents`: CogVideoX's scaling factor, Wan's per-channel latents_mean/latents_std). Items are split round-robin across ranks; finished files are skipped, so an
interrupted run resumes where it stopped; existing files are verified against `meta.json`'s shapes (see
`cachefiles.py`) and broken ones redone. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import av
import torch
from accelerate import Accelerator
from einops import rearrange
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sdvgen_core.backbones import COGVIDEOX, Backbone
from sdvgen_core.files import atomic_output, atomic_write_text
from sdvgen_core.pipeline import resolve_dtype
from sdvgen_core.reference import FitMode, fit_to_size, image_to_tensor

from .cachefiles import item_problem, item_shapes, read_meta, write_meta
from .config import Config
from .data import (
    ClipTooShort,
    DataError,
    caption_sources,
    Shard,
    SkipCounter,
    decode_clip,
    identity_records,
    load_identity_views,
    video_files,
    video_records,
)
from .families import resolve_backbone, vae_normalization
from .models import flush_subnormals_on_cpu, load_text_encoder, load_vae
from .rundir import check_writable

logger = logging.getLogger(__name__)

FRAME_ENCODE_CHUNK = 8
BROKEN_REDONE = "broken cache file redone"
STALE_SET_ASIDE = "stale cache item set aside"


def cache_meta(config: Config) -> dict:
    """The settings a cache was built with; `train` refuses a cache built differently."""
    data = config.data
    return {
        "model": str(Path(config.model.path).resolve()),
        "height": data.height,
        "width": data.width,
        "jitter_px": data.identity.jitter_px,
        "fps": data.video.fps,
        "num_frames": data.video.num_frames,
        "cls_placement": [source.cls_placement for source in caption_sources(data)],  # identity, video
    }


def check_cache_meta(root: Path, config: Config, backbone: Backbone) -> dict | None:
    """The cache's recorded settings (None for a new cache); `DataError` when they differ from `config`'s."""
    meta = read_meta(root)
    if meta is None:
        return None
    cached_family = meta.get("family", COGVIDEOX)  # caches from before Wan support are CogVideoX caches
    if cached_family != backbone.family:
        raise DataError(
            f"the cache in {str(root)!r} was prepared for the {cached_family} backbone, but model.path "
            f"{config.model.path!r} is {backbone.label} ({backbone.family}): latents and text embeddings of "
            f"another family cannot be used; point data.cache_dir to a new folder and run prepare"
        )
    expected = cache_meta(config)
    changed = sorted(k for k in expected if meta.get(k) != expected[k])
    if changed:
        raise DataError(
            f"the cache in {str(root)!r} was prepared with other settings ({', '.join(changed)}: "
            f"{[meta.get(k) for k in changed]} vs {[expected[k] for k in changed]}); use a new data.cache_dir"
        )
    return meta


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


class Encoder:
    """VAE and T5 on the accelerator, producing cache tensors."""

    def __init__(self, config: Config, backbone: Backbone, device: torch.device):
        self.device = device
        self.backbone = backbone
        self.store_dtype = resolve_dtype(config.data.cache_dtype)
        self.vae = load_vae(config.model.path, config.model.dtype, backbone).to(device)
        if config.model.vae_tiling:
            self.vae.enable_slicing()
            self.vae.enable_tiling()
        self.tokenizer, text_encoder, self.cls_info = load_text_encoder(config.model.path, config.model.dtype, backbone)
        self.text_encoder = text_encoder.to(device)

    @torch.no_grad()
    def latent_stats(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, T, 3, H, W]` in 0..1 -> raw posterior mean and std, each `[B, t, C, h, w]`."""
        pixels = rearrange(video * 2.0 - 1.0, "b t c h w -> b c t h w").to(self.device, self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        return tuple(rearrange(x, "b c t h w -> b t c h w").to("cpu", self.store_dtype) for x in (dist.mean, dist.std))

    @torch.no_grad()
    def text(self, prompts: list[str]) -> torch.Tensor:
        embeds = self.backbone.encode_prompts(self.tokenizer, self.text_encoder, prompts, self.device,
                                              self.text_encoder.dtype)
        return embeds.to("cpu", self.store_dtype)


def encode_identity(encoder: Encoder, record, config: Config) -> dict[str, torch.Tensor]:
    margin = config.data.identity.jitter_px
    height, width = config.data.height + 2 * margin, config.data.width + 2 * margin
    views = load_identity_views(record)
    pixels = torch.cat([fit_to_size(image_to_tensor(v)[0], height, width, FitMode.CROP) for v in views])
    mean, std = encoder.latent_stats(pixels.clamp(0, 1)[:, None])
    tensors = {}
    for view in (0, 1):
        tensors[f"view{view}.mean"], tensors[f"view{view}.std"] = mean[view, 0], std[view, 0]
    targets = [i for i, caption in enumerate(record.captions) if caption is not None]
    embeds = encoder.text([record.captions[i] for i in targets])
    for i, embed in zip(targets, embeds):
        tensors[f"text.{i}"] = embed
    return tensors


def encode_video(encoder: Encoder, record, config: Config) -> dict[str, torch.Tensor]:
    video_config = config.data.video
    frames = decode_clip(record.path, video_config.fps, video_config.num_frames, config.data.height, config.data.width)
    video_mean, video_std = encoder.latent_stats(frames[None])
    frame_means, frame_stds = [], []
    for chunk in frames.split(FRAME_ENCODE_CHUNK):
        mean, std = encoder.latent_stats(chunk[:, None])
        frame_means.append(mean[:, 0])
        frame_stds.append(std[:, 0])
    return {
        "video.mean": video_mean[0], "video.std": video_std[0],
        "frames.mean": torch.cat(frame_means), "frames.std": torch.cat(frame_stds),
        "text": encoder.text([record.caption])[0],
    }


def set_aside_stale_items(cache: Path, wanted: set[str]) -> int:
    """Move cached items that the configured sources no longer produce (sources changed, stricter filters) into
    `stale/`, so `train` uses exactly this config's data; returns how many."""
    stale = [path for kind in ("identity", "video") for path in sorted((cache / kind).glob("*.safetensors"))
             if f"{kind}/{path.name}" not in wanted]
    for path in stale:
        target = cache / "stale" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
    if stale:
        logger.warning("moved %d cached items that the configured sources do not produce to %s (delete it when no "
                       "longer needed)", len(stale), cache / "stale")
    return len(stale)


def check_video_set_nonempty(config: Config, count: int, where: str) -> None:
    if config.video_steps_possible and count == 0:
        raise DataError(
            f"no usable video clips {where}, but video steps are on (task.p_video={config.task.p_video}, "
            f"task.schedule={config.task.schedule}); add clips under data.video.folders (with captions) or set "
            f"task.p_video=0 for image-only training"
        )


def run_prepare(config: Config) -> dict[str, int]:
    """Fill the cache; returns the summed skip counts (main process)."""
    accelerator = Accelerator()  # only for ranks and barriers: the encoders run in model.dtype
    backbone = resolve_backbone(config)
    cache = Path(config.data.cache_dir)
    check_cache_meta(cache, config, backbone)  # cached items are reused by name: they must have been made the same way
    check_video_set_nonempty(config, len(video_files(config.data.video)), f"in {config.data.video.folders}")
    check_writable(cache, "data.cache_dir")
    for sub in ("identity", "video"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    flush_subnormals_on_cpu(accelerator.device)
    encoder = Encoder(config, backbone, accelerator.device)
    meta = cache_meta(config) | vae_normalization(backbone, encoder.vae.config) | {
        "family": backbone.family,
        "cls": encoder.cls_info.as_metadata(),
        "cache_dtype": config.data.cache_dtype,
        "item_shapes": item_shapes(config, backbone, encoder.vae.config, encoder.text_encoder.config.d_model),
    }
    if accelerator.is_main_process:  # written first, so an interrupted run's items are checked against it
        write_meta(cache, meta | {"complete": False})

    skips = SkipCounter()
    shard = Shard(accelerator.process_index, accelerator.num_processes)
    # Streamed, never listed: a Subjects200K record holds its composite image in memory.
    identity_source, video_source = caption_sources(config.data)
    jobs = itertools.chain(
        (("identity", r, encode_identity) for r in identity_records(identity_source, skips, shard)),
        (("video", r, encode_video) for r in video_records(video_source, skips, shard)),
    )
    done = 0
    sources = []  # every item of the configured sources on this rank, cached or not
    for kind, record, encode in tqdm(jobs, desc="prepare", unit="item", disable=not accelerator.is_local_main_process):
        path = cache / kind / f"{record.key}.safetensors"
        sources.append(f"{kind}/{path.name}")
        if path.exists():
            problem = item_problem(path, kind, meta)
            if problem is None:
                done += 1
                continue
            skips.skip(BROKEN_REDONE, str(path), problem)
            path.unlink()  # never left behind for `train`, even if the item cannot be encoded again
        try:
            tensors = encode(encoder, record, config)
        except ClipTooShort as error:
            skips.skip("clip too short", record.key, error)
            continue
        except (OSError, ValueError, av.FFmpegError) as error:
            skips.skip(f"unreadable {kind}", record.key, error)
            continue
        captions = getattr(record, "captions", None) or [record.caption]
        write_safetensors(tensors, path, {"key": record.key, "captions": json.dumps(list(captions))})
    atomic_write_text(cache / f"report-rank{accelerator.process_index}.json", json.dumps(dict(skips), indent=2))
    atomic_write_text(cache / f"items-rank{accelerator.process_index}.json", json.dumps(sources))
    accelerator.wait_for_everyone()

    total = SkipCounter()
    if accelerator.is_main_process:
        for rank in range(accelerator.num_processes):  # not a glob: an earlier run may have had more ranks
            total.update(json.loads((cache / f"report-rank{rank}.json").read_text()))
        wanted = {item for rank in range(accelerator.num_processes)
                  for item in json.loads((cache / f"items-rank{rank}.json").read_text())}
        stale = set_aside_stale_items(cache, wanted)
        if stale:
            total[STALE_SET_ASIDE] = stale
        write_meta(cache, meta | {"complete": True})
        counts = {kind: len(list((cache / kind).glob("*.safetensors"))) for kind in ("identity", "video")}
        logger.info("cache %s: %d identity items, %d videos (%d verified and reused, %d broken ones redone, %d not "
                    "from these sources moved to stale/); skipped %s", cache, counts["identity"], counts["video"],
                    done, total[BROKEN_REDONE], total[STALE_SET_ASIDE],
                    dict(total) or "nothing")
        check_video_set_nonempty(config, counts["video"], f"in the cache {str(cache)!r} after decoding")
    accelerator.wait_for_everyone()
    return dict(total)

