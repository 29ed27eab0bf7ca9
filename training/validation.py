"""Validation videos: the training transformer (with its current LoRA) sampled on fixed references and prompts.

With `validation.clip` / `validation.dino` set, each video (as written) is scored with the evaluation
harness's CLIP-T, CLIP-I and DINO-I (`sdvgen_core.evaluation`) and the means are logged as `val/*`.

Sampling goes through the family's pipeline (`SDVGenPipeline` / `SDVGenWanPipeline`) around the training
transformer, with the family's scheduler (CogVideoX DDIM, Wan UniPC) and, for Wan, `task.reference_timestep`.
The VAE and text encoder are loaded on the first run, kept on the CPU between runs and moved to the device only
while sampling, so training memory is untouched except during validation (T5-XXL needs ~9.5 GB in bf16).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sdvgen_core.errors import SDVGenError
from sdvgen_core.evaluation.evalset import prompt_without_cls
from sdvgen_core.evaluation.media import read_video
from sdvgen_core.evaluation.metrics import ClipScorer, DinoScorer, mean_or_none
from sdvgen_core.evaluation.report import METRICS, Scorers, score_video
from sdvgen_core.backbones import Backbone
from sdvgen_core.reference import load_image, prepare_reference_image, to_rgb
from sdvgen_core.video import frames_to_uint8, write_mp4

from .config import Config
from .data import DataError
from .families import resolve_backbone, validation_pipeline, validation_scheduler
from .models import load_text_encoder, load_vae

logger = logging.getLogger(__name__)


class Validator:
    def __init__(self, config: Config, backbone: Backbone | None = None):
        self.config = config
        self.backbone = backbone or resolve_backbone(config)
        self.references = []
        for path in config.validation.references:
            try:
                self.references.append(to_rgb(load_image(path)))
            except SDVGenError as error:
                raise DataError(f"validation reference (validation.references): {error}") from None
        self._parts = None
        settings = config.validation
        # encoders load (on the CPU) before training starts, so a wrong folder fails early
        self.scorers = Scorers(clip=ClipScorer(settings.clip) if settings.clip else None,
                               dino=DinoScorer(settings.dino) if settings.dino else None)
        self.last_metrics: dict[str, float] = {}

    def _load_parts(self):
        if self._parts is None:
            model = self.config.model
            tokenizer, text_encoder, _ = load_text_encoder(model.path, model.dtype, self.backbone)
            self._parts = (tokenizer, text_encoder, load_vae(model.path, model.dtype, self.backbone),
                           validation_scheduler(self.backbone, model.path))
        return self._parts

    def run(self, transformer, step: int, output_dir: Path, device: torch.device) -> list[Path]:
        """Sample one video per (reference, prompt) with a fixed seed; returns the mp4 paths."""
        tokenizer, text_encoder, vae, scheduler = self._load_parts()
        settings, data = self.config.validation, self.config.data
        was_training = transformer.training
        transformer.eval()
        text_encoder.to(device)
        vae.to(device)
        written, scores = [], []
        try:
            pipe = validation_pipeline(self.backbone, self.config.model.path, tokenizer, text_encoder, vae,
                                       transformer, scheduler)
            options = ({"reference_timestep": self.config.task.reference_timestep}
                       if "reference_timestep" in self.backbone.reference_options else {})
            for index, (reference, prompt) in enumerate(zip(self.references, settings.prompts)):
                generator = torch.Generator(device="cpu").manual_seed(settings.seed + index)
                frames = pipe(
                    prompt, reference_image=reference, height=data.height, width=data.width,
                    num_frames=settings.num_frames, num_inference_steps=settings.num_inference_steps,
                    guidance_scale=settings.guidance_scale, generator=generator, **options,
                ).frames[0]
                path = output_dir / "validation" / f"step-{step:06d}-ref{index}.mp4"
                written.append(write_mp4(frames, path, fps=int(data.video.fps), overwrite=True))
                if self.scorers.clip or self.scorers.dino:
                    fitted = frames_to_uint8(prepare_reference_image(reference, data.height, data.width))[0]
                    video, fps = read_video(path)
                    scores.append(score_video(video, fps, fitted, prompt_without_cls(prompt), self.scorers))
        finally:
            text_encoder.to("cpu")
            vae.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            transformer.train(was_training)
        logger.info("validation videos: %s", ", ".join(str(p) for p in written))
        means = {key: mean_or_none([row[key] for row in scores]) for key, _ in METRICS}
        self.last_metrics = {f"val/{key}": value for key, value in means.items() if value is not None}
        if self.last_metrics:
            logger.info("validation metrics at step %d: %s", step,
                        ", ".join(f"{key} {value:.4f}" for key, value in self.last_metrics.items()))
        return written
