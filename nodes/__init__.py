"""ComfyUI node classes of the SDV-Gen pack (thin wrappers over `sdvgen_core`).

Written against ComfyUI's V1 node API (class attributes INPUT_TYPES / RETURN_TYPES / FUNCTION) rather than
V3 (`comfy_api.latest`): V1 classes are plain Python that import and run without ComfyUI, which the tests
and scripts rely on, and every ComfyUI release loads them (V3 needs a recent host and its `comfy_api`
package even to define a node). Host services (model folders, progress bar, previews, cancel, device,
memory) are optional, see `host.py`. Nothing here imports torch until a node runs.
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
