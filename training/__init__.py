"""The dual-task LoRA fine-tuner (accelerate); imports `sdvgen_core`, never ComfyUI."""
