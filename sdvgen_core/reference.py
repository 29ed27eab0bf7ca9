"""Subject reference image -> reference latents `[B, 1, C, h, w]` (spec: "The reference image").

Any RGB, RGBA or grayscale image of any size is fitted to the generation size (`crop`, `pad` or
`stretch`, with kornia), optionally has its background blanked by a subject mask, is scaled to
[-1, 1], encoded by the VAE as a one-frame video, *sampled* from the latent distribution and
multiplied by the VAE scaling factor.
"""

from __future__ import annotations

from enum import Enum
from typing import Union

import kornia.geometry.transform as KT
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLCogVideoX
from einops import rearrange
from PIL import Image

from .errors import SDVGenError

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor]


class FitMode(str, Enum):
    CROP = "crop"  # cover the target, centre-crop the overflow
    PAD = "pad"  # fit inside the target, pad the rest with the fill colour
    STRETCH = "stretch"  # resize to the target, ignoring aspect ratio


def image_to_tensor(image: ImageInput) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image -> (`[1, 3, H, W]` float RGB in 0..1, `[1, 1, H, W]` alpha or None).

    PIL images and arrays are `H x W [x C]` (uint8 0..255 or float 0..1); tensors are `[C, H, W]` or
    `[1, C, H, W]` floats in 0..1. C may be 1 (gray), 3 (RGB) or 4 (RGBA).
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGBA") if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
                           else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3:
            raise SDVGenError(f"reference image array must be H x W or H x W x C; got shape {array.shape}")
        tensor = torch.from_numpy(np.array(array)).permute(2, 0, 1)
        tensor = tensor.float() / 255.0 if array.dtype == np.uint8 else tensor.float()
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        if tensor.ndim == 4:
            if tensor.shape[0] != 1:
                raise SDVGenError(
                    f"reference image batch has {tensor.shape[0]} images; pass one image ([1, C, H, W] or [C, H, W])"
                )
            tensor = tensor[0]
        if tensor.ndim != 3:
            raise SDVGenError(f"reference image tensor must be [C, H, W] or [1, C, H, W]; got {tuple(image.shape)}")
    else:
        raise SDVGenError(f"reference image must be a PIL image, numpy array or torch tensor; got {type(image).__name__}")

    channels, height, width = tensor.shape
    if channels not in (1, 2, 3, 4):
        raise SDVGenError(f"reference image has {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")
    if height < 8 or width < 8:
        raise SDVGenError(f"reference image is {width}x{height}; it must be at least 8x8 pixels")
    if not torch.isfinite(tensor).all():
        raise SDVGenError("reference image has NaN or infinite values")
    tensor = tensor.clamp(0.0, 1.0)
    alpha = None
    if channels in (2, 4):
        alpha, tensor = tensor[-1:][None], tensor[:-1]
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor[None].contiguous(), alpha


def fit_to_size(image: torch.Tensor, height: int, width: int, mode: FitMode | str, fill: float = 1.0) -> torch.Tensor:
    """Fit `[B, C, H, W]` to `[B, C, height, width]` by `mode`; `pad` fills with `fill`."""
    mode = FitMode(mode)
    src_height, src_width = image.shape[-2:]
    if mode is FitMode.STRETCH:
        return KT.resize(image, (height, width), antialias=True)
    if mode is FitMode.CROP:
        scale = max(height / src_height, width / src_width)
        resized = KT.resize(
            image, (max(height, round(src_height * scale)), max(width, round(src_width * scale))), antialias=True
        )
        return KT.center_crop(resized, (height, width))
    scale = min(height / src_height, width / src_width)
    new_height, new_width = min(height, round(src_height * scale)), min(width, round(src_width * scale))
    resized = KT.resize(image, (new_height, new_width), antialias=True)
    top, left = (height - new_height) // 2, (width - new_width) // 2
    return F.pad(resized, (left, width - new_width - left, top, height - new_height - top), value=fill)


def prepare_reference_image(
    image: ImageInput,
    height: int,
    width: int,
    fit: FitMode | str = FitMode.CROP,
    subject_mask: ImageInput | None = None,
    background: float = 1.0,
) -> torch.Tensor:
    """Reference image -> `[1, 3, height, width]` RGB in 0..1, background blanked to `background` where masked.

    `subject_mask` is 1 on the subject and 0 on the background (`H x W`, same size as the image); an RGBA
    image's alpha serves as the mask when none is given.
    """
    try:
        fit = FitMode(fit)
    except ValueError:
        raise SDVGenError(f"fit mode {fit!r} is not one of {[m.value for m in FitMode]}") from None
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise SDVGenError(f"generation size {width}x{height} must be positive multiples of 16")
    rgb, mask = image_to_tensor(image)
    if subject_mask is not None:
        mask_tensor = subject_mask if isinstance(subject_mask, torch.Tensor) else image_to_tensor(subject_mask)[0][:, :1]
        mask_tensor = mask_tensor.detach().float().cpu()
        mask_tensor = mask_tensor.reshape(1, 1, *mask_tensor.shape[-2:])
        if mask_tensor.shape[-2:] != rgb.shape[-2:]:
            raise SDVGenError(
                f"subject mask is {mask_tensor.shape[-1]}x{mask_tensor.shape[-2]} but the image is "
                f"{rgb.shape[-1]}x{rgb.shape[-2]}; they must be the same size"
            )
        mask = mask_tensor.clamp(0.0, 1.0)
    if mask is None:
        return fit_to_size(rgb, height, width, fit, fill=background).clamp(0.0, 1.0)
    fitted = fit_to_size(torch.cat([rgb, mask], dim=1), height, width, fit, fill=0.0)
    rgb, mask = fitted[:, :3], fitted[:, 3:]  # padding got mask 0, so it takes the background colour
    return (rgb * mask + background * (1.0 - mask)).clamp(0.0, 1.0)


@torch.no_grad()
def encode_reference(
    vae: AutoencoderKLCogVideoX,
    image: torch.Tensor,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """`[B, 3, H, W]` RGB in 0..1 -> reference latents `[B, 1, C, H/8, W/8]` (sampled, times `scaling_factor`).

    `device` is where the VAE runs: give the pipeline's execution device when models are offloaded (their
    weights then sit on the CPU or the meta device until the offload hook moves them); default: where the
    weights are.
    """
    param = next(vae.parameters())
    video = rearrange(image * 2.0 - 1.0, "b c h w -> b c 1 h w").to(device=device or param.device, dtype=param.dtype)
    latent = vae.encode(video).latent_dist.sample(generator=generator) * vae.config.scaling_factor
    return rearrange(latent, "b c t h w -> b t c h w")
