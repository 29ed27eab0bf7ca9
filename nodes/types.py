"""Socket type names and choice lists shared by the nodes.

The sockets carry SDV-Gen objects that core ComfyUI nodes cannot use, so they get their own names
(never MODEL, CONDITIONING, LATENT ...): ComfyUI then only lets them connect to SDV-Gen nodes. The
choice lists mirror `sdvgen_core` (checked by the tests) but are spelled out here so that building the
node definitions does not import torch.
"""

PIPE = "SDVGEN_PIPE"
CONDITIONING = "SDVGEN_COND"
REFERENCE = "SDVGEN_REFERENCE"
LATENT = "SDVGEN_LATENT"

CATEGORY = "sdvgen"

NO_LORA = "none"
FROM_MODEL_FOLDER = "from model folder"  # text encoder: the model folder's text_encoder/ + tokenizer/
PRECISIONS = ["auto", "bf16", "fp16", "fp32"]  # auto: see host.default_precision
MEMORY_MODES = ["auto", "on_device", "model_offload", "group_offload", "sequential_offload"]  # sdvgen_core.MemoryMode
WEIGHTS = ["precision", "fp8"]  # sdvgen_core.acceleration_options (torch-free)
COMPILE_MODES = ["off", "blocks"]
ATTENTION_NAMES = ["sdpa", "flash", "sage", "xformers"]
CACHES = ["off", "first_block"]
FIT_MODES = ["crop", "pad", "stretch"]  # sdvgen_core.FitMode
SCHEDULERS = ["ddim", "dpm"]  # sdvgen_core.pipeline.SCHEDULERS

MAX_FRAMES = 49  # CogVideoX-5B's sample_frames; frames are 4k + 1
MAX_SIZE = 2048
SIZE_STEP = 16  # VAE factor 8 times patch size 2
