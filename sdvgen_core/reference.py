"""Subject reference image -> reference latents `[B, 1, C, h, w]` (spec: "The reference image").

Any RGB, RGBA or grayscale image of any size is fitted to the generation size (`crop`, `pad` or
`stretch`, with kornia), optionally has its background blanked by a subject mask, is scaled to
[-1, 1], encoded by the VAE as a one-frame video, *sampled* from the latent distribution and
multiplied by the VAE scaling factor.
"""

from __future__ import annotations

import io
import logging
import os
from enum import Enum
from typing import Union

import kornia.geometry.transform as KT
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLCogVideoX
from einops import rearrange
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .errors import NonFiniteError, SDVGenError

logger = logging.getLogger(__name__)

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor]


class FitMode(str, Enum):
    CROP = "crop"  # cover the target, centre-crop the overflow
    PAD = "pad"  # fit inside the target, pad the rest with the fill colour
    STRETCH = "stretch"  # resize to the target, ignoring aspect ratio


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully (pixels read now); `SDVGenError` naming the file if it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as error:
        reason = "it does not exist" if isinstance(error, FileNotFoundError) else f"{type(error).__name__}: {error}"
        raise SDVGenError(f"cannot read the image {str(path)!r}: {reason}") from None


def _to_srgb(image: Image.Image) -> Image.Image:
    """Apply an embedded ICC profile (Display P3, Adobe RGB, CMYK press profiles...) as a photo viewer does."""
    icc = image.info.get("icc_profile")
    if not icc:
        return image
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(profile).lower():
            return image
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA", "PA") else None
        source = image.convert("RGB") if alpha is not None else image
        converted = ImageCms.profileToProfile(source, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
        if alpha is not None:
            converted.putalpha(alpha)
        return converted
    except (ImageCms.PyCMSError, OSError, ValueError) as error:
        logger.warning("ignoring the image's unusable ICC colour profile (%s); colours may be off", error)
        return image


def pil_to_array(image: Image.Image) -> np.ndarray:
    """PIL image -> `H x W x C` array as a photo viewer shows it: EXIF rotation, ICC colours, deep modes by range.

    8-bit modes give uint8; 16-bit (`I;16*`) gives uint16; 32-bit int (`I`) and float (`F`) give float32
    scaled to 0..1 by their value range (see `unit_range`). Transparency (alpha, `LA`, palette) is kept
    as a fourth channel.
    """
    image = _to_srgb(ImageOps.exif_transpose(image))
    if image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)[:, :, None]
    if image.mode in ("I", "F"):
        return unit_range(torch.from_numpy(np.asarray(image, dtype=np.float32).copy()), "image").numpy()[:, :, None]
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    try:
        return np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    except ValueError as error:
        raise SDVGenError(f"image mode {image.mode!r} cannot be converted to RGB: {error}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB the way a photo viewer shows it (see `pil_to_array`); transparency is dropped."""
    array = pil_to_array(image)
    if array.dtype == np.uint16:
        array = np.round(array / 257.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(array[:, :, :3]))


# Values a little outside 0..1 (resampling overshoot from other nodes) are clipped, not rescaled.
_OVERSHOOT = 0.05


def unit_range(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Float pixels -> 0..1, judged by their range: 0..1 as is, else 0..255 or 0..65535 data is rescaled.

    NaN/inf, negative values or values beyond 65535 are refused naming `what`.
    """
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise SDVGenError(f"{what} has NaN or infinite values")
    low, high = (tensor.min().item(), tensor.max().item()) if tensor.numel() else (0.0, 0.0)
    if low < -_OVERSHOOT:
        raise SDVGenError(f"{what} has values from {low:g} to {high:g}; expected 0..1 (or 0..255 / 0..65535 data)")
    if high <= 1.0 + _OVERSHOOT:
        return tensor.clamp(0.0, 1.0)
    for scale in (255.0, 65535.0):
        if high <= scale:
            logger.warning("%s has values up to %g; reading it as 0..%d data", what, high, scale)
            return (tensor / scale).clamp(0.0, 1.0)
    raise SDVGenError(f"{what} has values up to {high:g}; expected 0..1 (or 0..255 / 0..65535 data)")


def image_to_tensor(image: ImageInput, what: str = "reference image") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image -> (`[1, 3, H, W]` float RGB in 0..1, `[1, 1, H, W]` alpha or None).

    PIL images are read as a photo viewer shows them (`pil_to_array`). Arrays are `H x W [x C]`: uint8
    0..255, uint16 0..65535, bool, or floats judged by range (`unit_range`). Tensors are `[C, H, W]` or
    `[1, C, H, W]` floats in 0..1 (judged by range the same way). C may be 1 (gray), 2 (gray + alpha),
    3 (RGB) or 4 (RGBA). `what` names the input in errors.
    """
    if isinstance(image, Image.Image):
        image = pil_to_array(image)
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3:
            raise SDVGenError(f"{what} array must be H x W or H x W x C; got shape {array.shape}")
        scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(bool): 1.0}.get(array.dtype.newbyteorder("="))
        if scale is None and not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise SDVGenError(f"{what} array has dtype {array.dtype}; expected uint8, uint16, bool or float")
        tensor = torch.from_numpy(np.array(array, dtype=np.float32)).permute(2, 0, 1)
        tensor = tensor / scale if scale is not None else unit_range(tensor, what)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 4:
            if tensor.shape[0] != 1:
                raise SDVGenError(
                    f"{what} batch has {tensor.shape[0]} images; pass one image ([1, C, H, W] or [C, H, W])"
                )
            tensor = tensor[0]
        if tensor.ndim != 3:
            raise SDVGenError(f"{what} tensor must be [C, H, W] or [1, C, H, W]; got {tuple(image.shape)}")
        tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else unit_range(tensor, what)
    else:
        raise SDVGenError(f"{what} must be a PIL image, numpy array or torch tensor; got {type(image).__name__}")

    channels, height, width = tensor.shape
    if channels not in (1, 2, 3, 4):
        raise SDVGenError(f"{what} has {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")
    if height < 8 or width < 8:
        raise SDVGenError(f"{what} is {width}x{height}; it must be at least 8x8 pixels")
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
        if isinstance(subject_mask, torch.Tensor):
            mask_tensor = unit_range(subject_mask.detach().cpu(), "subject mask")
        else:
            mask_tensor = image_to_tensor(subject_mask, "subject mask")[0][:, :1]
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
    if not torch.isfinite(latent).all():
        hint = "the VAE overflows in fp16: use precision bf16 or fp32" if param.dtype == torch.float16 else "the VAE weights may be damaged"
        raise NonFiniteError(f"the reference latents from the VAE contain NaN or infinite values; {hint}")
    return rearrange(latent, "b c t h w -> b t c h w")
