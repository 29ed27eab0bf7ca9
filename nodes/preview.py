"""Cheap latent -> RGB previews for the sampler's progress bar.

ComfyUI has no latent format for CogVideoX (comfy/latent_formats.py), and a VAE decode per step would
cost more than the step. So, like ComfyUI's Latent2RGB previewer, a preview is a per-pixel linear map of
the 16 latent channels to RGB; its factors are fitted to the loaded VAE itself, once, by encoding a grid
of solid colours and solving least squares. That keeps previews right for any checkpoint (including the
tiny test model) without a hand-copied factor table.
"""

from __future__ import annotations

import itertools

PATCH_SIZE = 32  # pixels per colour patch: a few latent pixels wide, past the encoder's border effects
LEVELS = (0.0, 0.5, 1.0)  # 27 colours, more than the 17 unknowns per output channel


def fit_latent_to_rgb(vae, device=None):
    """Least-squares `[C + 1, 3]` map (last row: bias) from `vae` latents (times scaling factor) to RGB in -1..1.

    `device`: where the VAE runs (the pipeline's execution device; offloaded weights are not there yet).
    """
    import torch

    colours = torch.tensor(list(itertools.product(LEVELS, repeat=3)))  # [N, 3] in 0..1
    rgb = colours * 2.0 - 1.0
    param = next(vae.parameters())
    video = rgb[:, :, None, None, None].expand(-1, -1, 1, PATCH_SIZE, PATCH_SIZE)
    with torch.no_grad():
        latent = vae.encode(video.to(device=device or param.device, dtype=param.dtype)).latent_dist.mean
    latent = latent.float().cpu().mean(dim=(2, 3, 4)) * vae.config.scaling_factor  # [N, C]
    design = torch.cat([latent, torch.ones(len(latent), 1)], dim=1)
    return torch.linalg.lstsq(design, rgb).solution


def latent_preview(denoised, factors, max_size: int):
    """The middle frame of the first video of `denoised` `[B, T, C, h, w]` as a PIL image at most `max_size` wide/high."""
    import torch
    from PIL import Image

    frame = denoised[0, denoised.shape[1] // 2].float().cpu()  # [C, h, w]
    rgb = torch.einsum("chw,cr->hwr", frame, factors[:-1]) + factors[-1]
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    image.thumbnail((max_size, max_size))
    return image
