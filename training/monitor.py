"""Gradient geometry of the two tasks (paper appendix B): flat LoRA gradients, cosines, norms, PCGrad.

Gradients are flattened over the trainable LoRA parameters in the model's fixed `named_parameters`
order; a parameter without a gradient contributes zeros, so both task vectors stay aligned
element for element. Layer groups slice the same vector.
"""

from __future__ import annotations

import csv
from collections import deque
from pathlib import Path

import torch
from torch import nn

LAYER_GROUPS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "mlp": ("ff.net.0.proj", "ff.net.2"),
    "norm": ("norm1.linear", "norm2.linear"),
    "embedding": ("patch_embed.proj", "patch_embed.text_proj"),
}
EPS = 1e-12


def layer_group(parameter_name: str) -> str:
    module = parameter_name.split(".lora_")[0]
    for group, suffixes in LAYER_GROUPS.items():
        if any(module == s or module.endswith("." + s) for s in suffixes):
            return group
    return "other"


class FlatGradients:
    """Read and write the gradients of `model`'s trainable parameters as one flat fp32 vector."""

    def __init__(self, model: nn.Module):
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.groups: dict[str, list[slice]] = {}
        offset = 0
        for name, param in self.params:
            self.groups.setdefault(layer_group(name), []).append(slice(offset, offset + param.numel()))
            offset += param.numel()
        self.size = offset

    def read(self) -> torch.Tensor:
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten() for _, p in self.params
        ])

    def write(self, flat: torch.Tensor) -> None:
        offset = 0
        for _, param in self.params:
            chunk = flat[offset:offset + param.numel()].view_as(param).to(param.dtype)
            if param.grad is None:
                param.grad = chunk.clone()
            else:
                param.grad.copy_(chunk)
            offset += param.numel()

    def group_vector(self, flat: torch.Tensor, group: str) -> torch.Tensor:
        return torch.cat([flat[s] for s in self.groups[group]])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.dot(a, b) / (a.norm() * b.norm() + EPS)).item()


def gradient_stats(flat: FlatGradients, g_identity: torch.Tensor, g_video: torch.Tensor) -> dict[str, float]:
    """Cosine and L2 norms of the two task gradients, overall and per layer group."""
    stats = {
        "cosine": cosine(g_identity, g_video),
        "norm_identity": g_identity.norm().item(),
        "norm_video": g_video.norm().item(),
    }
    for group in sorted(flat.groups):
        a, b = flat.group_vector(g_identity, group), flat.group_vector(g_video, group)
        stats[f"{group}/cosine"] = cosine(a, b)
        stats[f"{group}/norm_identity"] = a.norm().item()
        stats[f"{group}/norm_video"] = b.norm().item()
    return stats


class PCGradBuffer:
    """Buffered PCGrad (appendix B.3): a FIFO of recent identity-step gradients; a video gradient that
    conflicts with their mean (negative inner product) loses its component along that mean."""

    def __init__(self, size: int):
        self.gradients: deque[torch.Tensor] = deque(maxlen=size)

    def push(self, gradient: torch.Tensor) -> None:
        self.gradients.append(gradient.detach().clone())

    def mean(self) -> torch.Tensor:
        """Mean of the buffered gradients, accumulated in place: one extra gradient-sized tensor, not a stack."""
        total = self.gradients[0].clone()
        for gradient in list(self.gradients)[1:]:
            total.add_(gradient)
        return total.div_(len(self.gradients))

    def project(self, video_gradient: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if not self.gradients:
            return video_gradient, False
        reference = self.mean()
        dot = torch.dot(video_gradient, reference)
        if dot >= 0:
            return video_gradient, False
        return video_gradient - dot / (reference.dot(reference) + EPS) * reference, True

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"gradient.{i}": g.cpu() for i, g in enumerate(self.gradients)}

    def load_tensors(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        self.gradients.clear()
        for i in range(len(tensors)):
            self.gradients.append(tensors[f"gradient.{i}"].to(device))


class MonitorLog:
    """CSV history of the measurements and a PNG plot redrawn after each one."""

    def __init__(self, output_dir: Path):
        self.csv_path = output_dir / "grad_monitor.csv"
        self.png_path = output_dir / "grad_monitor.png"

    def append(self, step: int, stats: dict[str, float]) -> None:
        new = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", *stats])
            if new:
                writer.writeheader()
            writer.writerow({"step": step, **stats})
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with self.csv_path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        steps = [int(r["step"]) for r in rows]
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        top.plot(steps, [float(r["cosine"]) for r in rows], marker="o", label="all LoRA params")
        for key in (k for k in rows[0] if k.endswith("/cosine")):
            top.plot(steps, [float(r[key]) for r in rows], alpha=0.5, label=key.split("/")[0])
        top.axhline(0.0, color="gray", linewidth=0.8)
        top.set_ylabel("cos(g_identity, g_video)")
        top.legend(fontsize=7)
        bottom.plot(steps, [float(r["norm_identity"]) for r in rows], marker="o", label="||g_identity||")
        bottom.plot(steps, [float(r["norm_video"]) for r in rows], marker="o", label="||g_video||")
        bottom.set_xlabel("step")
        bottom.set_ylabel("L2 norm")
        bottom.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(self.png_path, dpi=100)
        plt.close(figure)
