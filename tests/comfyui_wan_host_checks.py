"""Run by ComfyUI's own Python from tests/test_comfyui_host_wan.py: the native Wan nodes inside a real ComfyUI.

    python comfyui_wan_host_checks.py COMFYUI_ROOT REPO WORKDIR LORA_FILE NATIVE_LORA_FILE STRENGTH

Builds a tiny native-format Wan 2.2 TI2V-5B transformer (detected by ComfyUI from its tensor shapes), loads
it with the core UNETLoader, patches it with our nodes, samples with the core KSampler, and prints one JSON
object of measured results (the pytest side asserts on them). The text encoder and VAE are the test-only
stand-ins of comfyui_wan_standins.py (the host's UMT5-XXL and Wan 2.2 VAE only come at full size).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

COMFYUI_ROOT, REPO, WORKDIR, LORA_FILE, NATIVE_LORA_FILE = (Path(arg) for arg in sys.argv[1:6])
LORA_STRENGTH = float(sys.argv[6])
sys.path.insert(0, str(COMFYUI_ROOT))
sys.path.insert(0, str(WORKDIR))

import torch  # noqa: E402

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # as `main.py --cpu`: before model_management picks a device

import comfy.lora  # noqa: E402
import comfy.lora_convert  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import folder_paths  # noqa: E402
import nodes as comfy_nodes  # noqa: E402  (ComfyUI's nodes.py: UNETLoader, KSampler, LoraLoaderModelOnly)

from comfyui_wan_standins import PoolingVAE, tiny_umt5_clip, write_tiny_wan22  # noqa: E402

PACK = "sdvgen_pack_under_test"
(WORKDIR / PACK).symlink_to(REPO, target_is_directory=True)
wan_nodes = importlib.import_module(f"{PACK}.nodes.wan")
wan_lora = importlib.import_module(f"{PACK}.sdvgen_core.wan_lora")

UNET_NAME, LORA_NAME, NATIVE_LORA_NAME = "tiny_wan22_ti2v.safetensors", LORA_FILE.name, NATIVE_LORA_FILE.name
WIDTH, HEIGHT, LENGTH = 64, 32, 9  # latent 4 x 2 x 3 frames
results: dict[str, object] = {}


def patched_native_prediction(model_patcher, latents: torch.Tensor, timestep: torch.Tensor,
                              context: torch.Tensor) -> torch.Tensor:
    """Flow velocity `[B, 48, T, h, w]` the (patched) native model predicts for model-space `latents` at
    `timestep` `[B]` (0..1000) with text `context` `[B, L, 4096]`, through `BaseModel.apply_model` with the
    patcher's wrappers exactly as ComfyUI's sampler passes them (`sampler_helpers.prepare_model_patcher`)."""
    comfy.model_management.load_models_gpu([model_patcher])
    base = model_patcher.model
    sigma = timestep.float() / base.model_sampling.multiplier  # ModelSamplingDiscreteFlow: t = sigma * multiplier
    options = {"wrappers": comfy.patcher_extension.copy_nested_dicts(model_patcher.wrappers)}
    denoised = base.apply_model(latents, sigma, c_crossattn=context, transformer_options=options)
    return (latents - denoised) / sigma.reshape(-1, 1, 1, 1, 1)


class FixedLatentVAE:
    """A VAE whose encoding is a given model-space latent (in the VAE's raw scale, so that the node's
    `process_latent_in` gives it back): feeds the diffusers side's reference latent to the node unchanged."""

    def __init__(self, model_patcher, latent: torch.Tensor) -> None:
        self.raw = model_patcher.model.process_latent_out(latent.clone())

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.raw.clone()


def subject_image(seed: int) -> torch.Tensor:
    return torch.rand(1, 80, 100, 3, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    for folder, name in (("diffusion_models", "models/diffusion_models"), ("loras", "models/loras")):
        (WORKDIR / name).mkdir(parents=True, exist_ok=True)  # diffusion_models holds the renamed diffusers model
        folder_paths.add_model_folder_path(folder, str(WORKDIR / name), is_default=True)
    state = write_tiny_wan22(WORKDIR / "models/diffusion_models" / UNET_NAME)
    for name, path in ((LORA_NAME, LORA_FILE), (NATIVE_LORA_NAME, NATIVE_LORA_FILE)):
        (WORKDIR / "models/loras" / name).symlink_to(path)

    (model,) = comfy_nodes.UNETLoader().load_unet(UNET_NAME, "default")
    results["detected"] = [type(model.model).__name__, model.model.latent_format.latent_channels,
                           type(model.model.diffusion_model).__name__]

    # --- weights renamed from a stock diffusers model: ComfyUI's model predicts what diffusers predicted --------
    from safetensors.torch import load_file
    stock = load_file(str(WORKDIR / "diffusers_reference.safetensors"))  # inputs and the diffusers prediction
    renamed = load_file(str(WORKDIR / "models/diffusion_models/tiny_wan22_from_diffusers.safetensors"))
    (from_diffusers,) = comfy_nodes.UNETLoader().load_unet("tiny_wan22_from_diffusers.safetensors", "default")
    native_keys = set(from_diffusers.model.diffusion_model.state_dict())
    velocity = patched_native_prediction(from_diffusers, stock["latents"], stock["timestep"], stock["context"])
    results["diffusers_vs_native"] = {
        "missing": sorted(native_keys - set(renamed)), "unexpected": sorted(set(renamed) - native_keys),
        "max_error": (velocity - stock["velocity"]).abs().max().item(), "scale": stock["velocity"].abs().max().item(),
    }

    # --- the cross-check: the same weights, LoRA and inputs as our diffusers-side adapter ----------------------
    # core LoraLoaderModelOnly with the native copy, our patch with the same model-space reference latent
    (lora_from_diffusers,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(
        from_diffusers, NATIVE_LORA_NAME, LORA_STRENGTH)
    inputs = (stock["video"], stock["video_timestep"], stock["video_context"])
    vae = FixedLatentVAE(from_diffusers, stock["reference"])
    cross_check, predictions = {}, {}
    for mode in ("video", "clean"):
        patched, _, _ = wan_nodes.WanSubjectReference().apply(
            lora_from_diffusers, vae, subject_image(3), WIDTH, HEIGHT, LENGTH, 2, mode)
        ours = predictions[mode] = patched_native_prediction(patched, *inputs)
        without_lora, _, _ = wan_nodes.WanSubjectReference().apply(
            from_diffusers, vae, subject_image(3), WIDTH, HEIGHT, LENGTH, 2, mode)
        adapter = stock[f"adapter_{mode}"]
        cross_check[mode] = {
            "shape": list(ours.shape), "max_error": (ours - adapter).abs().max().item(),
            "scale": adapter.abs().max().item(),
            "lora_changes_prediction": (ours - patched_native_prediction(without_lora, *inputs)).abs().max().item(),
            "reference_changes_prediction": (ours - patched_native_prediction(lora_from_diffusers, *inputs)).abs().max().item(),
        }
    cross_check["modes_differ_by"] = (predictions["video"] - predictions["clean"]).abs().max().item()
    results["native_vs_diffusers_adapter"] = cross_check
    del from_diffusers, lora_from_diffusers, patched, without_lora
    comfy.model_management.unload_all_models()

    # --- LoRA: core LoraLoaderModelOnly maps none of the diffusers layout but all of the native copy; our loader
    # maps the diffusers file; both patch W + strength * B @ A, identically -------------------------------------
    raw, native_copy = load_file(str(LORA_FILE)), load_file(str(NATIVE_LORA_FILE))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    results["lora_modules"] = len({k.rsplit(".lora_", 1)[0] for k in raw})
    results["core_mapped_modules"] = len(comfy.lora.load_lora(comfy.lora_convert.convert_lora(raw), key_map, log_missing=False))
    results["native_copy_mapped_modules"] = len(
        comfy.lora.load_lora(comfy.lora_convert.convert_lora(native_copy), key_map, log_missing=False))
    converted = wan_lora.diffusers_wan_lora_to_native(raw)
    results["converted_mapped_modules"] = len(comfy.lora.load_lora(converted, key_map, log_missing=False))

    def patched_weights(model_patcher) -> dict[str, torch.Tensor]:
        comfy.model_management.load_models_gpu([model_patcher])
        weights = {k: v.detach().float().cpu().clone() for k, v in model_patcher.model.diffusion_model.state_dict().items()}
        comfy.model_management.unload_all_models()
        return weights

    (core_lora_model,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, NATIVE_LORA_NAME, LORA_STRENGTH)
    (lora_model,) = wan_nodes.WanLoraLoader().load(model, LORA_NAME, LORA_STRENGTH)
    by_core, by_ours = patched_weights(core_lora_model), patched_weights(lora_model)
    results["loaders_differ_at"] = sorted(k for k in by_core if not torch.equal(by_core[k], by_ours[k]))
    errors = {"core": [], "ours": []}
    for key in (key for key in raw if key.endswith(".lora_A.weight")):
        down, up = raw[key].float(), raw[key.replace("lora_A", "lora_B")].float()
        module = wan_lora.native_module_name(key[len("transformer."):-len(".lora_A.weight")])
        base_weight = state[f"{module}.weight"]
        expected = base_weight + LORA_STRENGTH * (up.flatten(1) @ down.flatten(1)).reshape(base_weight.shape)
        for loader, weights in (("core", by_core), ("ours", by_ours)):
            errors[loader].append((weights[f"{module}.weight"] - expected).abs().max().item())
    results["core_loader_weight_max_error"], results["lora_weight_max_error"] = max(errors["core"]), max(errors["ours"])

    # --- the patch: patched prediction == unpatched model on [reference ; video] with per-frame timesteps -------
    vae = PoolingVAE()
    generator = torch.Generator().manual_seed(1)
    context = torch.randn(2, 7, 4096, generator=generator)
    equivalence = {}
    for mode in ("video", "clean"):
        patched, latent, seen = wan_nodes.WanSubjectReference().apply(
            model, vae, subject_image(3), WIDTH, HEIGHT, LENGTH, 2, mode)
        reference = model.model.process_latent_in(vae.encode(seen))
        video = torch.randn(latent["samples"].shape, generator=generator)
        timestep = torch.tensor([700.0, 250.0])
        ours = patched_native_prediction(patched, video, timestep, context)
        # independent: the core model itself on the concatenation, per-frame timesteps from a denoise mask
        # (WAN22.process_timestep), frame 0 (the reference) at the video's timestep or at 0
        joint = torch.cat([reference.expand(2, -1, -1, -1, -1), video], dim=2)
        mask = torch.ones(2, 1, joint.shape[2], *joint.shape[-2:])
        mask[:, :, 0] = 1.0 if mode == "video" else 0.0
        sigma = timestep / model.model.model_sampling.multiplier
        denoised = model.model.apply_model(joint, sigma, c_crossattn=context, denoise_mask=mask)
        core = ((joint - denoised) / sigma.reshape(-1, 1, 1, 1, 1))[:, :, 1:]
        plain = patched_native_prediction(model, video, timestep, context)
        equivalence[mode] = {
            "shape": list(ours.shape), "max_error": (ours - core).abs().max().item(),
            "scale": core.abs().max().item(), "differs_from_unpatched": (ours - plain).abs().max().item(),
        }
    results["equivalence"] = equivalence

    # --- KSampler on the patched model (with the LoRA, another wrapper, CFG, a batch of 2) ----------------------
    calls = []

    def counting_wrapper(executor, *args, **kwargs):  # another extension's wrapper: must still run, unchanged
        calls.append(args[0].shape[2])
        return executor(*args, **kwargs)

    other = lora_model.clone()
    other.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "other_extension", counting_wrapper)
    positive = [[context[:1], {}]]
    negative = [[torch.zeros(1, 7, 4096), {}]]

    def sample(model_patcher, latent):
        return comfy_nodes.KSampler().sample(model_patcher, 7, 3, 5.0, "uni_pc", "simple", positive, negative,
                                             latent, denoise=1.0)[0]["samples"]

    memory_shapes = []
    memory_required = lora_model.model.memory_required

    def recording_memory_required(input_shape, *args, **kwargs):
        memory_shapes.append(list(input_shape))
        return memory_required(input_shape, *args, **kwargs)

    lora_model.model.memory_required = recording_memory_required
    runs = {}
    for image_seed in (3, 4):
        patched, latent, _ = wan_nodes.WanSubjectReference().apply(
            other, vae, subject_image(image_seed), WIDTH, HEIGHT, LENGTH, 2, "video")
        runs[image_seed] = sample(patched, latent)
    patched_memory_shapes = memory_shapes[:]
    plain = sample(lora_model, latent)
    del lora_model.model.memory_required
    results["ksampler"] = {
        "shape": list(runs[3].shape), "finite": bool(torch.isfinite(runs[3]).all()),
        "other_wrapper_frames": sorted(set(calls)), "other_wrapper_calls": len(calls),
        "reference_changes_video": (runs[3] - runs[4]).abs().max().item(),
        "patch_changes_video": (runs[3] - plain).abs().max().item(),
        "memory_frames_patched": sorted({shape[2] for shape in patched_memory_shapes}),
        "memory_frames_plain": sorted({shape[2] for shape in memory_shapes[len(patched_memory_shapes):]}),
    }
    twice, _, _ = wan_nodes.WanSubjectReference().apply(patched, vae, subject_image(3), WIDTH, HEIGHT, LENGTH, 2, "video")
    results["reapplied_wrappers"] = len(twice.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                           wan_nodes.WRAPPER_KEY))
    try:
        wrong_size = {"samples": torch.zeros(1, 48, 3, 4, 4)}
        sample(patched, wrong_size)
        results["wrong_size_error"] = None
    except Exception as error:  # noqa: BLE001 - the message is what the test checks
        results["wrong_size_error"] = str(error)

    results["cls"] = cls_checks()
    print("RESULTS " + json.dumps(results))


def cls_checks() -> dict:
    import sentencepiece

    clip, spm = tiny_umt5_clip()
    pieces = sentencepiece.SentencePieceProcessor(model_proto=spm).get_piece_size()
    out = wan_nodes.WanCLSTextEncode().encode(clip, "a toy robot walks through a snowy forest", "robot")
    (conditioning, encoded) = out["result"]
    seen = []
    original = clip.cond_stage_model.encode_token_weights

    def spy(token_weight_pairs):
        seen.append([token for token, *_ in token_weight_pairs["umt5xxl"][0]])
        return original(token_weight_pairs)

    clip.cond_stage_model.encode_token_weights = spy
    wan_nodes.WanCLSTextEncode().encode(clip, "a toy robot walks through a snowy forest", "robot")
    # independent: ComfyUI's own tokens of the prompt without <cls>, the id inserted before the subject's tokens
    tokenizer = clip.tokenizer.clip_umt5xxl
    plain = clip.tokenize("a toy robot walks through a snowy forest")["umt5xxl"][0]
    subject = [t for t, *_ in tokenizer.tokenize_with_weights("robot")[0] if t not in (0, 1)]
    ids = [t for t, *_ in plain]
    start = next(i for i in range(len(ids)) if ids[i:i + len(subject)] == subject)
    expected = plain[:start] + [(pieces + 300, 1.0)] + plain[start:]
    expected = expected[:max(len(plain), tokenizer.min_length)] if ids[-1] == 0 else expected
    direct = clip.encode_from_tokens_scheduled({"umt5xxl": [expected]})
    # the <cls> row is the one used: changing row 256300 changes the output
    encoder = clip.cond_stage_model.umt5xxl.transformer
    with torch.no_grad():
        encoder.shared.weight[pieces + 300] += 1.0
    changed = wan_nodes.WanCLSTextEncode().encode(clip, "a toy robot walks through a snowy forest", "robot")["result"][0]
    return {
        "encoded": encoded, "cls_id": pieces + 300, "rows": encoder.shared.weight.shape[0],
        "cls_count": seen[0].count(pieces + 300), "cls_index": seen[0].index(pieces + 300), "subject_index": start,
        "token_count": len(seen[0]), "expected_count": len(expected),
        "max_error_vs_direct": (conditioning[0][0] - direct[0][0]).abs().max().item(),
        "row_changes_output": (changed[0][0] - conditioning[0][0]).abs().max().item(),
    }


if __name__ == "__main__":
    main()
