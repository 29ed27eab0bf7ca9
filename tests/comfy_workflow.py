"""Reading ComfyUI UI-format workflows against node definitions in /object_info form; conversion to the API format.

Node definitions are dicts shaped like ComfyUI's `/object_info` entries: `input` (`required` / `optional`
name -> `[type, options]`, a combo's type being its list of choices or "COMBO" with `options`),
`input_order` and `output`. The UI format stores widget values positionally in the node definition's input
order; the frontend adds one extra value after a widget with `control_after_generate` (the seed's
"fixed"/"randomize" control) and after an `image_upload` combo (the upload button).
"""

from __future__ import annotations

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL_NODES = ("Note", "MarkdownNote")  # frontend-only: never sent to the server
SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")


def node_info_from_class(cls) -> dict:
    """The `/object_info` entry ComfyUI builds for a V1 node class (the parts workflows depend on)."""
    spec = cls.INPUT_TYPES()
    return {
        "input": {"required": spec.get("required", {}), "optional": spec.get("optional", {})},
        "input_order": {section: list(spec.get(section, {})) for section in ("required", "optional")},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
    }


def ordered_inputs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of every input, in the node definition's order."""
    order = info.get("input_order") or {section: list(info["input"].get(section, {})) for section in ("required", "optional")}
    result = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            result.append((name, spec[0], spec[1] if len(spec) > 1 else {}))
    return result


def is_widget(kind, options: dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def combo_choices(kind, options: dict) -> list:
    return kind if isinstance(kind, list) else options.get("options", [])


def widget_values_by_name(node: dict, info: dict) -> dict[str, object]:
    """Map a UI node's positional `widgets_values` to input names; raises AssertionError on a count mismatch."""
    values = list(node.get("widgets_values") or [])
    named: dict[str, object] = {}
    position = 0
    for name, kind, options in ordered_inputs(info):
        if not is_widget(kind, options):
            continue
        assert position < len(values), f"node {node['id']} ({node['type']}): no widget value for {name!r}"
        named[name] = values[position]
        position += 1
        if options.get("control_after_generate"):
            assert values[position] in SEED_CONTROLS, f"node {node['id']}: {name!r} control {values[position]!r}"
            position += 1
        if options.get("image_upload"):
            position += 1  # the upload button's value
    assert position == len(values), (
        f"node {node['id']} ({node['type']}): {len(values)} widget values, the definition has {position}"
    )
    return named


def check_widget_value(kind, options: dict, value, where: str, free_combos: tuple[str, ...] = ()) -> None:
    """AssertionError unless `value` is valid for the widget; `free_combos` names combos whose choices are files."""
    if isinstance(kind, list) or kind == "COMBO":
        if where.rsplit(".", 1)[-1] not in free_combos:
            assert value in combo_choices(kind, options), f"{where}: {value!r} not in {combo_choices(kind, options)}"
        else:
            assert isinstance(value, str) and value, f"{where}: file name expected, got {value!r}"
        return
    if kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
    else:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
        if kind == "INT":
            assert float(value).is_integer(), f"{where}: {value!r} is not an integer"
        low, high = options.get("min", float("-inf")), options.get("max", float("inf"))
        assert low <= value <= high, f"{where}: {value!r} outside [{low}, {high}]"
        step = options.get("step")
        if kind == "INT" and step:
            assert (value - options.get("min", 0)) % step == 0, f"{where}: {value!r} off the step {step}"


def types_match(output_type: str, input_type) -> bool:
    return output_type == input_type or "*" in (output_type, input_type)


def to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """The API-format prompt (`/prompt`'s `prompt`) of a UI-format workflow; virtual and muted nodes are left out."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        inputs: dict[str, object] = dict(widget_values_by_name(node, info))
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                _, source, slot, *_ = links[socket["link"]]
                inputs[socket["name"]] = [str(source), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _core(required: dict, output: list, optional: dict | None = None) -> dict:
    optional = optional or {}
    return {
        "input": {"required": required, "optional": optional},
        "input_order": {"required": list(required), "optional": list(optional)},
        "output": output,
    }


# The core ComfyUI nodes the workflows use, as ComfyUI v0.3.64 defines them (the real-host test checks
# these against the host's /object_info). Combos whose choices are the user's files list no choices.
CORE_NODES = {
    "LoadImage": _core({"image": [[], {"image_upload": True}]}, ["IMAGE", "MASK"]),
    "PreviewImage": _core({"images": ["IMAGE", {}]}, []),
    "PreviewAny": _core({"source": ["*", {}]}, []),
    "ImageStitch": _core(
        {
            "image1": ["IMAGE", {}],
            "direction": [["right", "down", "left", "up"], {"default": "right"}],
            "match_image_size": ["BOOLEAN", {"default": True}],
            "spacing_width": ["INT", {"default": 0, "min": 0, "max": 1024, "step": 2}],
            "spacing_color": [["white", "black", "red", "green", "blue"], {"default": "white"}],
        },
        ["IMAGE"],
        {"image2": ["IMAGE", {}]},
    ),
    "SaveAnimatedWEBP": _core(
        {
            "images": ["IMAGE", {}],
            "filename_prefix": ["STRING", {"default": "ComfyUI"}],
            "fps": ["FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}],
            "lossless": ["BOOLEAN", {"default": True}],
            "quality": ["INT", {"default": 80, "min": 0, "max": 100}],
            "method": [["default", "fastest", "slowest"], {}],
        },
        [],
    ),
    "CreateVideo": _core(
        {"images": ["IMAGE", {}], "fps": ["FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0}]},
        ["VIDEO"],
        {"audio": ["AUDIO", {}]},
    ),
    "SaveVideo": _core(
        {
            "video": ["VIDEO", {}],
            "filename_prefix": ["STRING", {"default": "video/ComfyUI"}],
            "format": ["COMBO", {"options": ["auto", "mp4"], "default": "auto"}],
            "codec": ["COMBO", {"options": ["auto", "h264"], "default": "auto"}],
        },
        [],
    ),
    # Wan 2.2 (sdvgen_wan22_subject_to_video.json)
    "UNETLoader": _core(
        {"unet_name": [[], {}], "weight_dtype": [["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"], {}]}, ["MODEL"]
    ),
    "CLIPLoader": _core(
        {
            "clip_name": [[], {}],
            "type": [["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
                      "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image"], {}],
        },
        ["CLIP"],
        {"device": [["default", "cpu"], {}]},
    ),
    "VAELoader": _core({"vae_name": [[], {}]}, ["VAE"]),
    "CLIPTextEncode": _core({"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}, ["CONDITIONING"]),
    "KSampler": _core(
        {
            "model": ["MODEL", {}],
            "seed": ["INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}],
            "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
            "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}],
            "sampler_name": [[
                "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
                "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
                "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
                "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
                "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
                "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
                "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
            ], {}],
            "scheduler": [["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                           "linear_quadratic", "kl_optimal"], {}],
            "positive": ["CONDITIONING", {}],
            "negative": ["CONDITIONING", {}],
            "latent_image": ["LATENT", {}],
            "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}],
        },
        ["LATENT"],
    ),
    "VAEDecode": _core({"samples": ["LATENT", {}], "vae": ["VAE", {}]}, ["IMAGE"]),
}
