"""ComfyUI node classes of the SDV-Gen pack (thin wrappers over `sdvgen_core`).

Node API decision: the classic V1 API (class attributes INPUT_TYPES / RETURN_TYPES / FUNCTION /
VALIDATE_INPUTS), not V3 (`comfy_api.latest`: `io.ComfyNode` with `define_schema()` / `execute()` and a
`comfy_entrypoint()` returning a `ComfyExtension`). Why: V1 classes are plain Python that import and run
without ComfyUI, which the tests, the CLI-side scripts and the no-torch-at-import check rely on, and every
ComfyUI release loads them; V3 needs the host's `comfy_api` package even to define a node and exists only
from ComfyUI 0.3.48 (requires-comfyui is 0.3.40). No node is half-migrated: every node of the pack is V1.

A later move to V3, all nodes at once, needs: (1) `comfy_api` importable in tests (a pinned ComfyUI checkout
on the path, or a stand-in of `comfy_api.latest.io` good enough to build schemas); (2) the socket types in
`types.py` as `io.Custom("SDVGEN_PIPE")` etc., keeping the same type names so saved workflows still connect;
(3) each INPUT_TYPES dict as `io.Int.Input(...)` / `io.Combo.Input(...)` with the same names, defaults,
ranges and tooltips, and the `text_encoder` widget staying optional and last (saved widgets_values are
positional); (4) `VALIDATE_INPUTS` -> `validate_inputs` with the same one-concern signatures (ComfyUI still
pins a failure on every input named there, see validation.py), `encode`'s {"ui": ...} result ->
`io.NodeOutput(..., ui=...)`; (5) node ids (the NODE_CLASS_MAPPINGS keys) and display names unchanged;
(6) requires-comfyui raised to the first release whose `comfy_api.latest` has everything used.

Host services (model folders, progress bar, previews, cancel, device, memory) are optional, see `host.py`.
Nothing here imports torch until a node runs.
"""

from .conditioning import CLSPrompt, SubjectReferenceEncode
from .loader import LoadSDVLoRA
from .sampling import DualTaskSampler, SDVGenDecode
from .wan import WanCLSTextEncode, WanLoraLoader, WanSubjectReference

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "SDVGenLoadLoRA": LoadSDVLoRA,
    "SDVGenCLSPrompt": CLSPrompt,
    "SDVGenSubjectReferenceEncode": SubjectReferenceEncode,
    "SDVGenDualTaskSampler": DualTaskSampler,
    "SDVGenDecode": SDVGenDecode,
    "SDVGenWanSubjectReference": WanSubjectReference,
    "SDVGenWanCLSTextEncode": WanCLSTextEncode,
    "SDVGenWanLoraLoader": WanLoraLoader,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "SDVGenLoadLoRA": "Load SDV LoRA",
    "SDVGenCLSPrompt": "CLS Prompt",
    "SDVGenSubjectReferenceEncode": "Subject Reference Encode",
    "SDVGenDualTaskSampler": "Dual-Task Sampler",
    "SDVGenDecode": "SDV-Gen Decode",
    "SDVGenWanSubjectReference": "SDV-Gen Wan Subject Reference",
    "SDVGenWanCLSTextEncode": "SDV-Gen Wan CLS Text Encode",
    "SDVGenWanLoraLoader": "SDV-Gen Wan LoRA Loader",
}
