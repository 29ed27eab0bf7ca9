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
import yaml
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


class MonitorError(ValueError):
    """A run folder that holds no gradient-monitor record."""


class MonitorLog:
    """CSV history of the measurements and a PNG report redrawn after each one."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.csv_path = output_dir / MONITOR_CSV
        self.png_path = output_dir / "grad_monitor.png"

    def append(self, step: int, stats: dict[str, float]) -> None:
        new = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", *stats])
            if new:
                writer.writeheader()
            writer.writerow({"step": step, **stats})
        plot_monitor([self.output_dir], self.png_path)


MONITOR_CSV = "grad_monitor.csv"
LOG_SCALE_SPAN = 10.0  # norms whose max/min ratio reaches this are drawn on a log axis


def read_monitor(run_dir: Path) -> tuple[list[dict[str, float]], dict]:
    """The monitor rows of a run folder (numbers) and its resolved `config.yaml` (empty if missing)."""
    path = Path(run_dir) / MONITOR_CSV
    if not path.is_file():
        raise MonitorError(f"{str(run_dir)!r} has no {MONITOR_CSV}: train with monitor.every > 0 (and "
                           f"data.holdout_identity/holdout_video > 0) to record the gradient monitor")
    with path.open(newline="") as handle:
        rows = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]
    if not rows:
        raise MonitorError(f"{str(path)!r} holds no measurement yet")
    config_path = Path(run_dir) / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    return rows, config or {}


def run_settings(config: dict) -> str:
    """One line naming the settings that shape the gradient geometry (paper Fig. 5 / 9 / 10 differ in these)."""
    if not config:
        return "settings unknown (no config.yaml)"
    task, train, monitor = config.get("task", {}), config.get("train", {}), config.get("monitor", {})
    data, lora, optim = config.get("data", {}), config.get("lora", {}), config.get("optim", {})
    if task.get("schedule") == "two_stage":
        schedule = f"two-stage (video from step {task.get('two_stage_switch_step') or train.get('max_steps', 0) // 2})"
    else:
        schedule = f"p_video {task.get('p_video')} ({task.get('task_draw')} draw)"
    parts = [
        schedule,
        f"ref drop {task.get('reference_drop')} p={task.get('p_reference_drop')}",
        f"ref frame {task.get('reference_frame')}",
        f"view drop {task.get('p_view_drop')}",
        f"pairs {data.get('identity', {}).get('max_pairs') or 'all'}",
        f"LoRA r{lora.get('rank')}",
        f"lr {optim.get('lr')}",
        f"PCGrad buffer {monitor.get('pcgrad_buffer')}" if monitor.get("pcgrad") else "no PCGrad",
        f"{monitor.get('timesteps', 1)} t/sample",
    ]
    return ", ".join(parts)


def _use_log_scale(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) >= LOG_SCALE_SPAN


def plot_monitor(run_dirs: list[Path], output: Path) -> Path:
    """Draw the gradient monitor of one or several runs (overlaid, one colour per run) into the PNG `output`."""
    import matplotlib.pyplot as plt

    figure = monitor_figure(run_dirs)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def monitor_figure(run_dirs: list[Path]):
    """The report as a matplotlib figure. Row 1: all LoRA parameters; one row per layer group below. Left:
    cos(g_identity, g_video); right: the L2 norms (identity solid, video dashed), on a log axis when they span
    an order of magnitude or more. The title names each run's settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [(Path(run_dir), *read_monitor(Path(run_dir))) for run_dir in run_dirs]
    groups = sorted({key.split("/")[0] for _, rows, _ in runs for key in rows[0] if "/" in key})
    scopes = [("", "all LoRA parameters")] + [(f"{g}/", f"{g} LoRA parameters") for g in groups]
    figure, axes = plt.subplots(len(scopes), 2, figsize=(13, 2.6 * len(scopes) + 1.2), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row_axes, (prefix, scope) in zip(axes, scopes):
        cos_axis, norm_axis = row_axes
        norms = []
        for index, (run_dir, rows, config) in enumerate(runs):
            color = colors[index % len(colors)]
            # earlier runs are drawn wider, so that a later run on top of the same curve leaves them visible
            width = 1.0 + 2.0 * (len(runs) - 1 - index) / max(len(runs) - 1, 1)
            name = run_dir.name if len(runs) > 1 else None
            steps = [int(r["step"]) for r in rows if f"{prefix}cosine" in r]
            if not steps:
                continue
            cosines = [r[f"{prefix}cosine"] for r in rows if f"{prefix}cosine" in r]
            cos_axis.plot(steps, cosines, marker="o", markersize=3, color=color, linewidth=width, label=name)
            for kind, style, single_run_color in (("identity", "-", colors[0]), ("video", "--", colors[1])):
                values = [r[f"{prefix}norm_{kind}"] for r in rows if f"{prefix}norm_{kind}" in r]
                norms.extend(values)
                label = f"{name}: ||g_{kind}||" if name else f"||g_{kind}||"
                norm_axis.plot(steps, values, linestyle=style, marker="o", markersize=3, linewidth=width,
                               color=color if name else single_run_color, label=label)
        cos_axis.axhline(0.0, color="gray", linewidth=0.8)
        cos_axis.set_ylabel("cosine")
        cos_axis.set_title(f"cos(g_identity, g_video), {scope}", fontsize=9)
        norm_axis.set_ylabel("L2 norm of dLoss/dLoRA")
        norm_axis.set_title(f"gradient L2 norms, {scope}" + (" (log scale)" if _use_log_scale(norms) else ""),
                            fontsize=9)
        if _use_log_scale(norms):
            norm_axis.set_yscale("log")
        else:
            norm_axis.set_ylim(bottom=0)  # a linear axis from zero shows the norms' ratio truthfully
    axes[0][1].legend(fontsize=7)
    if len(runs) > 1:
        axes[0][0].legend(fontsize=7)
    for axis in axes.flat:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in axes[-1]:
        axis.set_xlabel("optimizer step (measured before that step's update; last point: final weights)")
    lines = []
    for run_dir, rows, config in runs:
        projections = rows[-1].get("pcgrad_projections")
        extra = ""
        if projections is not None:
            extra = f"; {int(projections)} PCGrad projections by step {int(rows[-1]['step'])}"
        lines.append(f"{run_dir.name}: {run_settings(config)}{extra}")
    figure.suptitle("Gradient monitor: identity vs video task gradients on fixed held-out batches\n" + "\n".join(lines),
                    fontsize=9)
    title_inches = 0.17 * (len(lines) + 1)  # keep the settings lines clear of the first row's panel titles
    figure.tight_layout(rect=(0, 0, 1, 1 - title_inches / figure.get_figheight()))
    return figure
