"""The paper's metrics (spec: "Evaluation protocol of the run").

- CLIP-T / CLIP-I: CLIP ViT-B/32 (transformers `CLIPModel` + `CLIPProcessor` from a local folder),
  per-frame cosine to the prompt (without `<cls>`) / to the reference, averaged over the frames.
- DINO-I: DINO ViT-S/16 (transformers `ViTModel`), CLS token of the last layer, images resized to the
  model's input size on the short side and centre-cropped, cosine to the reference, averaged.
- Dynamic degree: VBench's RAFT protocol over any optical-flow callable (`dynamic_degree`).
- Motion smoothness: VBench's AMT protocol over any frame-interpolation callable (`motion_smoothness`).

Frames are `[T, H, W, 3]` uint8 arrays, as decoded from the mp4. Every model loads from local files only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SDVGenError

# (image1, image2) -> flow `[1, 2, H, W]` in pixels; images `[1, 3, H, W]` float in 0..255 (VBench's RAFT input).
FlowEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (frame0, frame1) -> middle frame; all `[1, 3, H, W]` float in 0..1 (VBench's AMT input).
FrameInterpolator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class EncoderLoadError(SDVGenError):
    """An evaluation encoder (CLIP, DINO, RAFT, AMT) cannot be loaded from the given path."""


def central_frames(frames: np.ndarray, count: int = 16) -> np.ndarray:
    """The `count` central frames of `[T, ...]` (all of them when T <= count)."""
    start = max(0, (len(frames) - count) // 2)
    return frames[start:start + count]


def check_encoder_folder(folder: str | os.PathLike, what: str) -> Path:
    """An existing folder with safetensors weights, else EncoderLoadError naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EncoderLoadError(f"{what} folder {str(folder)!r} does not exist")
    if not any(folder.glob("*.safetensors")):
        raise EncoderLoadError(f"{what} folder {str(folder)!r} has no .safetensors weights (only safetensors are loaded)")
    return folder


def _cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def _projected(output) -> torch.Tensor:
    """transformers 4 returns the projected features; 5 returns an output whose pooler_output holds them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """CLIP-T and CLIP-I with a transformers CLIP model (`openai/clip-vit-base-patch32` for the paper)."""

    def __init__(self, folder: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        folder = check_encoder_folder(folder, "CLIP")
        try:
            self.model = CLIPModel.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise EncoderLoadError(f"cannot load the CLIP model and processor in {str(folder)!r}: {error}") from error
        self.device = torch.device(device)

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> torch.Tensor:
        """`[N, H, W, 3]` uint8 -> projected image features `[N, D]`."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return _projected(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _projected(self.model.get_text_features(**tokens))

    def clip_t(self, frames: np.ndarray, text: str) -> float:
        """Mean over frames of cos(frame, text)."""
        return _cosine_rows(self.image_features(frames), self.text_features([text])).mean().item()

    def clip_i(self, frames: np.ndarray, reference: np.ndarray) -> float:
        """Mean over frames of cos(frame, reference)."""
        return _cosine_rows(self.image_features(frames), self.image_features(reference[None])).mean().item()


class DinoScorer:
    """DINO-I with a transformers ViT (`facebook/dino-vits16` for the paper): CLS-token cosine to the reference."""

    def __init__(self, folder: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        from transformers import AutoImageProcessor, ViTModel

        folder = check_encoder_folder(folder, "DINO")
        try:
            self.model = ViTModel.from_pretrained(
                folder, add_pooling_layer=False, use_safetensors=True, local_files_only=True
            ).eval().to(device)
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise EncoderLoadError(f"cannot load the DINO ViT and its processor in {str(folder)!r}: {error}") from error
        self.size = self.model.config.image_size
        self.mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
        self.device = torch.device(device)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """`[N, H, W, 3]` uint8 -> `[N, 3, size, size]`: short side to `size` (antialiased bicubic, as torchvision's
        Resize), centre crop, ImageNet-normalised."""
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        height, width = pixels.shape[-2:]
        scale = self.size / min(height, width)
        new_size = (max(self.size, round(height * scale)), max(self.size, round(width * scale)))
        if new_size != (height, width):
            pixels = F.interpolate(pixels, size=new_size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (new_size[0] - self.size) // 2, (new_size[1] - self.size) // 2
        pixels = pixels[..., top:top + self.size, left:left + self.size].clamp(0, 1)
        return (pixels - self.mean) / self.std

    @torch.no_grad()
    def features(self, images: np.ndarray) -> torch.Tensor:
        """`[N, H, W, 3]` uint8 -> CLS tokens `[N, D]`."""
        return self.model(pixel_values=self.preprocess(images).to(self.device)).last_hidden_state[:, 0]

    def dino_i(self, frames: np.ndarray, reference: np.ndarray) -> float:
        return _cosine_rows(self.features(frames), self.features(reference[None])).mean().item()


# ----- dynamic degree (VBench `dynamic_degree.py`) -----

def _pad_to_multiple(images: list[torch.Tensor], divisor: int) -> tuple[list[torch.Tensor], list[int]]:
    """Replicate-pad `[1, C, H, W]` images symmetrically to multiples of `divisor` (VBench's InputPadder)."""
    height, width = images[0].shape[-2:]
    pad_h, pad_w = (-height) % divisor, (-width) % divisor
    pad = [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]
    return [F.pad(image, pad, mode="replicate") for image in images], pad


def top_flow_magnitude(flow: torch.Tensor) -> float:
    """Mean magnitude of the largest 5% of flow vectors in `[1, 2, H, W]` (VBench's per-pair score)."""
    magnitude = flow[0].float().pow(2).sum(dim=0).sqrt().flatten()
    keep = int(magnitude.numel() * 0.05)
    return magnitude.sort(descending=True).values[:keep].mean().item()


def dynamic_thresholds(height: int, width: int, frame_count: int) -> tuple[float, int]:
    """(flow threshold 6 * min(H, W) / 256, pairs above it needed: round(4 * frames / 16))."""
    return 6.0 * min(height, width) / 256.0, round(4 * frame_count / 16.0)


def is_dynamic(pair_scores: list[float], threshold: float, pairs_needed: int) -> bool:
    """VBench's check_move: dynamic once `pairs_needed` pair scores exceed `threshold`."""
    return sum(score > threshold for score in pair_scores) >= pairs_needed


def dynamic_degree(frames: np.ndarray, flow: FlowEstimator, fps: float = 8.0) -> tuple[bool, list[float]]:
    """VBench dynamic degree of one video: (dynamic?, per-pair top-5% flow magnitudes).

    Frames are subsampled to about 8 fps (every round(fps / 8)-th), each consecutive pair is padded to a
    multiple of 8 and passed to `flow` as floats in 0..255.
    """
    interval = max(1, round(fps / 8))
    frames = frames[::interval]
    if len(frames) < 2:
        raise SDVGenError(f"dynamic degree needs at least 2 frames; the video has {len(frames)}")
    threshold, pairs_needed = dynamic_thresholds(frames.shape[1], frames.shape[2], len(frames))
    tensors = [torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)[None].float() for f in frames]
    scores = []
    with torch.no_grad():
        for first, second in zip(tensors[:-1], tensors[1:]):
            (first, second), _ = _pad_to_multiple([first, second], 8)
            scores.append(top_flow_magnitude(flow(first, second)))
    return is_dynamic(scores, threshold, pairs_needed), scores


def load_raft(path: str | os.PathLike, device: torch.device | str = "cpu") -> FlowEstimator:
    """torchvision RAFT (large or small, told apart by the weights) from a `.safetensors` state dict.

    VBench runs RAFT trained on FlyingChairs + FlyingThings (`raft-things`), 20 refinement iterations;
    torchvision's `Raft_Large_Weights.C_T_V1` is that checkpoint ported. The README shows the one-time
    conversion of torchvision's weights to safetensors.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        raise EncoderLoadError(f"RAFT weights {str(path)!r} must be an existing .safetensors file")
    try:
        from torchvision.models.optical_flow import raft_large, raft_small
    except ImportError as error:
        raise EncoderLoadError(
            f"dynamic degree needs torchvision's RAFT, and torchvision cannot be imported ({error}); install the "
            "torchvision build that matches your torch, or leave --raft out to skip dynamic degree"
        ) from None
    state = load_file(path)
    model = None
    for build in (raft_large, raft_small):
        candidate = build(weights=None, progress=False)
        if set(candidate.state_dict()) == set(state):
            candidate.load_state_dict(state)
            model = candidate
            break
    if model is None:
        raise EncoderLoadError(f"{path} is not a torchvision raft_large or raft_small state dict")
    model = model.eval().to(device)

    def to_unit_range(image: torch.Tensor) -> torch.Tensor:
        return image.to(device) / 255.0 * 2.0 - 1.0  # VBench's RAFT normalises 0..255 itself; torchvision's wants -1..1

    @torch.no_grad()
    def estimate(image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        return model(to_unit_range(image1), to_unit_range(image2), num_flow_updates=20)[-1]

    return estimate


# ----- motion smoothness (VBench `motion_smoothness.py`) -----

def motion_smoothness(frames: np.ndarray, interpolate: FrameInterpolator) -> float:
    """VBench motion smoothness of one video, in 0..1 (1 = the odd frames are exactly predicted).

    The even frames are interpolated pairwise (padded to a multiple of 16); each prediction, converted to
    uint8 as VBench does (clip, truncate), is compared with the odd frame it stands for: score =
    (255 - mean absolute error) / 255.
    """
    if len(frames) < 3:
        raise SDVGenError(f"motion smoothness needs at least 3 frames; the video has {len(frames)}")
    even = [torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)[None].float() / 255.0 for f in frames[::2]]
    padded, pad = _pad_to_multiple(even, 16)
    height, width = padded[0].shape[-2:]
    errors = []
    with torch.no_grad():
        for index, (first, second) in enumerate(zip(padded[:-1], padded[1:])):
            middle = interpolate(first, second).cpu()[..., pad[2]:height - pad[3], pad[0]:width - pad[1]]
            predicted = (middle[0] * 255.0).permute(1, 2, 0).numpy().clip(0, 255).astype(np.uint8)
            errors.append(np.abs(predicted.astype(np.int16) - frames[2 * index + 1].astype(np.int16)).mean())
    return float((255.0 - np.mean(errors)) / 255.0)


def load_amt(path: str | os.PathLike, device: torch.device | str = "cpu") -> FrameInterpolator:
    """AMT-S (the network VBench ships in the `vbench` package) with weights from a `.safetensors` file."""
    import importlib

    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        raise EncoderLoadError(f"AMT-S weights {str(path)!r} must be an existing .safetensors file")
    try:
        network = importlib.import_module("vbench.third_party.amt.networks.AMT-S")
    except ImportError as error:
        raise EncoderLoadError(
            f"motion smoothness needs the AMT-S network from the `vbench` package, which cannot be imported "
            f"({error}); see README > Evaluation for installing it, or leave --amt out to skip motion smoothness"
        ) from None
    model = network.Model(corr_radius=3, corr_lvls=4, num_flows=3)
    try:
        model.load_state_dict(load_file(path))
    except RuntimeError as error:
        raise EncoderLoadError(f"{path} is not an AMT-S state dict: {str(error).splitlines()[0]}") from None
    model = model.eval().to(device)
    time_step = torch.full((1, 1, 1, 1), 0.5, device=device)

    @torch.no_grad()
    def interpolate(frame0: torch.Tensor, frame1: torch.Tensor) -> torch.Tensor:
        return model(frame0.to(device), frame1.to(device), time_step, scale_factor=1.0, eval=True)["imgt_pred"]

    return interpolate


def mean_or_none(values: list[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none (a skipped metric stays skipped)."""
    present = [value for value in values if value is not None and not math.isnan(value)]
    return float(np.mean(present)) if present else None
