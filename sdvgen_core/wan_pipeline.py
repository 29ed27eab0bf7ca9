"""Subject-driven Wan 2.2 sampling: `SDVGenWanPipeline` (a `WanPipeline` with a reference frame).

Sampling follows `WanPipeline` (flow matching, UniPC with the folder's shift by default or Euler with the same
shift, per-token timesteps for TI2V, separate conditional and unconditional passes). Guidance is the same as
the CogVideoX `SDVGenPipeline`: the reference is in both CFG branches, and `reference_guidance_scale` adds

    v = v(∅, ref) + cfg * (v(text, ref) - v(∅, ref)) + reference_guidance_scale * (v(text, ref) - v(text, ∅))
"""

from __future__ import annotations

import json
import os

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline
from transformers import AutoTokenizer, UMT5EncoderModel

from .errors import ModelLoadError, SDVGenError
from .pipeline import (
    SDVGenOutput,
    SDVGenPipelineMixin,
    StepCallback,
    StepInfo,
    check_finite,
    check_model_dir,
    non_finite_hint,
    resolve_dtype,
)
from .prompts import ClsTokenInfo, add_cls_token, tokenize_prompts
from .reference import FitMode, ImageInput
from .wan_latents import denormalize_latents, encode_reference_image
from .wan_transformer import (
    DEFAULT_REFERENCE_TIMESTEP,
    ReferenceTimestep,
    SDVGenWanTransformer3DModel,
    parse_reference_timestep,
)

WAN_SCHEDULERS = ("unipc", "euler")
WAN_MAX_TEXT_TOKENS = 512


def flow_scheduler(name: str, config) -> UniPCMultistepScheduler | FlowMatchEulerDiscreteScheduler:
    """`unipc` (the folder's flow-matching UniPC) or `euler` (flow-matching Euler with the same shift)."""
    if name not in WAN_SCHEDULERS:
        raise SDVGenError(f"scheduler {name!r} is not one of {list(WAN_SCHEDULERS)} (Wan 2.2 samplers)")
    shift = config.get("flow_shift", 1.0)
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000), shift=shift)


@torch.no_grad()
def encode_wan_prompts(
    tokenizer,
    text_encoder: UMT5EncoderModel,
    prompts: list[str],
    device: torch.device | str,
    dtype: torch.dtype,
    max_length: int = WAN_MAX_TEXT_TOKENS,
) -> torch.Tensor:
    """UMT5 embeddings `[N, max_length, D]` exactly as `WanPipeline` makes them (cleaned text, padding rows zero).

    Shared by sampling and the trainer's text cache; warns with the text cut off beyond `max_length`.
    """
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    ids = tokenize_prompts(tokenizer, [prompt_clean(p) for p in prompts], max_length)
    mask = ids.ne(tokenizer.pad_token_id).long().to(device)  # right padding with the pad id, never produced by text
    embeds = text_encoder(ids.to(device), mask).last_hidden_state
    return torch.where(mask.bool()[..., None], embeds, torch.zeros((), dtype=embeds.dtype, device=device)).to(dtype)


class SDVGenWanPipeline(SDVGenPipelineMixin, WanPipeline):
    """Wan 2.2 TI2V-5B text-to-video with a subject reference image (SDV-Gen on Wan).

    Latents are in Wan's layout `[B, C, T, h, w]`. Construction registers `<cls>` with the UMT5 tokenizer
    (and, only if its table is full, the text encoder).
    """

    transformer: SDVGenWanTransformer3DModel

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae,
        scheduler,
        transformer=None,
        transformer_2=None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = True,
    ) -> None:
        if transformer is None or transformer_2 is not None or boundary_ratio is not None:
            raise ModelLoadError(
                "SDV-Gen supports the single-transformer Wan 2.2 TI2V-5B; this folder is a two-expert model "
                "(transformer_2 / boundary_ratio, Wan 2.2 A14B)"
            )
        super().__init__(tokenizer, text_encoder, vae, scheduler, transformer, None, None, expand_timesteps)
        self.cls_info: ClsTokenInfo = add_cls_token(self.tokenizer, self.text_encoder)
        self._init_controls()
        self.scheduler_config = dict(scheduler.config)  # kept so `set_scheduler` can switch back and forth

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | os.PathLike,
        dtype: str | torch.dtype = "bf16",
        lora_path: str | os.PathLike | None = None,
        lora_strength: float = 1.0,
        fuse_lora: bool = False,
        scheduler: str = "unipc",
    ) -> "SDVGenWanPipeline":
        """Load a Wan 2.2 TI2V diffusers folder (safetensors only) on the CPU, optionally with a LoRA.

        The VAE stays in fp32 as the Wan pipelines recommend. Call `set_memory_mode` afterwards to place it.
        """
        root = check_model_dir(model_dir)
        torch_dtype = resolve_dtype(dtype)
        index_path = root / "model_index.json"
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        try:
            transformer = SDVGenWanTransformer3DModel.from_pretrained(
                root, subfolder="transformer", torch_dtype=torch_dtype, use_safetensors=True
            )
            vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32, use_safetensors=True)
            text_encoder = UMT5EncoderModel.from_pretrained(
                root / "text_encoder", torch_dtype=torch_dtype, use_safetensors=True
            )
            tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
            scheduler_config = UniPCMultistepScheduler.load_config(root, subfolder="scheduler")
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot load the model in {str(root)!r}: {error}") from error
        transformer.check_supported()
        pipe = cls(
            tokenizer, text_encoder, vae, flow_scheduler(scheduler, scheduler_config), transformer,
            transformer_2=None, boundary_ratio=index.get("boundary_ratio"),
            expand_timesteps=index.get("expand_timesteps", True),
        )
        pipe.scheduler_config = dict(scheduler_config)
        if lora_path is not None:
            pipe.set_lora(lora_path, lora_strength, fuse=fuse_lora)
        return pipe

    def _get_t5_prompt_embeds(self, prompt=None, num_videos_per_prompt=1, max_sequence_length=226, device=None, dtype=None):
        prompt = [prompt] if isinstance(prompt, str) else prompt
        embeds = encode_wan_prompts(
            self.tokenizer, self.text_encoder, prompt, device or self._execution_device,
            dtype or self.text_encoder.dtype, max_sequence_length,
        )
        return embeds.repeat_interleave(num_videos_per_prompt, dim=0)

    def set_scheduler(self, name: str) -> None:
        """Switch between `unipc` and `euler`, keeping the folder's shift."""
        self.scheduler = flow_scheduler(name, self.scheduler_config)

    def encode_reference_image(
        self,
        image: ImageInput,
        height: int,
        width: int,
        fit: FitMode | str = FitMode.CROP,
        subject_mask: ImageInput | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Subject image -> normalised reference latents `[1, C, 1, height/16, width/16]`."""
        return encode_reference_image(
            self.vae, image, height, width, fit=fit, subject_mask=subject_mask, generator=generator,
            device=self._execution_device,
        )

    def _timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """`[B]`, or `[B, T * h/2 * w/2]` per token when the model takes expanded timesteps (TI2V)."""
        if not self.config.expand_timesteps:
            return t.expand(latents.shape[0])
        tokens = latents.shape[2] * self.transformer.tokens_per_frame(*latents.shape[-2:])
        return t.to(torch.float32).expand(latents.shape[0], tokens)  # float like WanPipeline's mask * t

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        reference_image: ImageInput | None = None,
        reference_latents: torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 704,
        width: int = 1280,
        num_frames: int = 121,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        reference_guidance_scale: float = 0.0,
        reference_timestep: ReferenceTimestep | str = DEFAULT_REFERENCE_TIMESTEP,
        fit: FitMode | str = FitMode.CROP,
        subject_mask: ImageInput | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
        callback: StepCallback | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = WAN_MAX_TEXT_TOKENS,
    ) -> SDVGenOutput:
        """Generate `[B, num_frames, 3, height, width]` frames (or `[B, C, T, h, w]` latents with `output_type="latent"`).

        Give the subject as `reference_image` (fitted and VAE-encoded here) or as ready normalised
        `reference_latents` `[B, C, 1, h, w]`; with neither it is plain Wan text-to-video (equal to
        `WanPipeline`). `callback` runs after every step and may raise (e.g. `GenerationCancelled`) to stop.
        """
        self.check_generation_args(
            height, width, num_frames, num_inference_steps, guidance_scale, reference_guidance_scale
        )
        prompts, batch_size = self._check_call(
            prompt, prompt_embeds, negative_prompt_embeds, reference_image, reference_latents,
            reference_guidance_scale, output_type,
        )
        reference_timestep = parse_reference_timestep(reference_timestep)
        hint = non_finite_hint(self.transformer.dtype)
        device = self._execution_device
        dtype = self.transformer.dtype
        do_cfg = guidance_scale > 1.0
        prompt_embeds, negative_embeds = self._encode_text(
            prompts, negative_prompt, do_cfg, prompt_embeds, negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
        )
        if reference_image is not None:
            reference_latents = self.encode_reference_image(
                reference_image, height, width, fit=fit, subject_mask=subject_mask, generator=generator
            )
        if reference_latents is not None:
            reference_latents = reference_latents.to(device=device, dtype=dtype)
            if reference_latents.shape[0] == 1 and batch_size > 1:
                reference_latents = reference_latents.expand(batch_size, -1, -1, -1, -1)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self.scheduler.set_begin_index(0)
        latents = self.prepare_latents(
            batch_size, self.transformer.config.in_channels, height, width, num_frames, torch.float32, device,
            generator,
        )
        reference_kwargs = {"reference_latents": reference_latents, "reference_timestep": reference_timestep}

        def predict(text: torch.Tensor, t: torch.Tensor, branch: str, with_reference: bool = True) -> torch.Tensor:
            # Each branch has its own step-cache state (First Block Cache compares a branch with itself).
            with self.transformer.cache_context(branch):
                return self.transformer(
                    hidden_states=latents.to(dtype), timestep=self._timestep(t, latents), encoder_hidden_states=text,
                    return_dict=False, **(reference_kwargs if with_reference else {}),
                )[0]

        try:
            with self.progress_bar(total=num_inference_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    velocity_text = predict(prompt_embeds, t, "cond")
                    velocity = velocity_text
                    if do_cfg:
                        velocity_uncond = predict(negative_embeds, t, "uncond")
                        velocity = velocity_uncond + guidance_scale * (velocity_text - velocity_uncond)
                    if reference_guidance_scale:
                        velocity_no_reference = predict(prompt_embeds, t, "no_reference", with_reference=False)
                        velocity = velocity + reference_guidance_scale * (velocity_text - velocity_no_reference)
                    # Flow matching: x_t = (1 - σ) x_0 + σ ε and v = ε - x_0, so x_0 = x_t - σ v.
                    denoised = latents - self.scheduler.sigmas[i].to(latents.device) * velocity.float()
                    latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                    check_finite(latents, f"the latents after sampling step {i + 1} of {num_inference_steps}", hint)
                    progress_bar.update()
                    if callback is not None:
                        callback(StepInfo(i, num_inference_steps, int(t), latents, denoised))
            frames = None if output_type == "latent" else self.decode(latents)
        finally:
            self.maybe_free_model_hooks()
        return SDVGenOutput(frames=frames, latents=latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False, sliced: bool = False) -> torch.Tensor:
        """Latents `[B, C, T, h, w]` -> frames `[B, 4(T-1)+1, 3, 16h, 16w]` in 0..1 (`tiled`/`sliced` save memory)."""
        if tiled:
            self.vae.enable_tiling()
        else:
            self.vae.disable_tiling()
        if sliced:
            self.vae.enable_slicing()
        else:
            self.vae.disable_slicing()
        check_finite(latents, "the latents to decode", "they come from a failed or fp16-overflowed sampling run")
        latents = latents.to(device=self._execution_device, dtype=self.vae.dtype)
        video = self.vae.decode(denormalize_latents(self.vae, latents), return_dict=False)[0]  # [B, 3, F, H, W]
        check_finite(video, "the decoded frames", non_finite_hint(self.transformer.dtype))
        return ((video.float() / 2 + 0.5).clamp(0, 1)).permute(0, 2, 1, 3, 4)
