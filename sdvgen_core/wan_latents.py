"""Wan 2.2 VAE latents: the pipeline's normalisation and the subject reference encoding.

`WanPipeline` decodes `latents * latents_std + latents_mean` (per channel, from the VAE config), so a
normalised latent is `(z - latents_mean) / latents_std`. The reference image is encoded as a one-frame
video (the Wan VAE keeps the first frame on its own latent frame), sampled from the posterior.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan

from .reference import ImageInput, FitMode, prepare_reference_image


def latent_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel `(mean, std)`, each `[1, z_dim, 1, 1, 1]`, on `like`'s device and dtype."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


def normalize_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents `[B, z_dim, T, h, w]` -> the model's latent space."""
    mean, std = latent_stats(vae, latents)
    return (latents - mean) / std


def denormalize_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """The model's latents `[B, z_dim, T, h, w]` -> raw VAE latents (exactly as `WanPipeline` does before decoding)."""
    mean, std = latent_stats(vae, latents)
    return latents / (1.0 / std) + mean


@torch.no_grad()
def encode_reference(
    vae: AutoencoderKLWan,
    image: torch.Tensor,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """`[B, 3, H, W]` RGB in 0..1 -> normalised reference latents `[B, z_dim, 1, H/16, W/16]` (sampled).

    `device` is where the VAE runs (the pipeline's execution device under offloading); default: its weights'.
    """
    param = next(vae.parameters())
    video = (image * 2.0 - 1.0).unsqueeze(2).to(device=device or param.device, dtype=param.dtype)
    latents = vae.encode(video).latent_dist.sample(generator=generator)
    return normalize_latents(vae, latents)


def encode_reference_image(
    vae: AutoencoderKLWan,
    image: ImageInput,
    height: int,
    width: int,
    fit: FitMode | str = FitMode.CROP,
    subject_mask: ImageInput | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Any subject image -> `[1, z_dim, 1, height/16, width/16]`: fitted like the CogVideoX path, then encoded."""
    pixels = prepare_reference_image(image, height, width, fit=fit, subject_mask=subject_mask)
    return encode_reference(vae, pixels, generator=generator, device=device)
