"""Test-only ComfyUI nodes for test_comfyui_host_wan.py's server run (placed by the test, never shipped):
loaders that stand in for CLIPLoader (umt5_xxl) and VAELoader (wan2.2_vae) with the tiny stand-ins."""

from .comfyui_wan_standins import PoolingVAE, tiny_umt5_clip


class TinyUMT5Loader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self):
        return (tiny_umt5_clip(width=4096, rows=384)[0],)  # Wan's text width


class PoolingVAELoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self):
        return (PoolingVAE(),)


NODE_CLASS_MAPPINGS = {"SDVGenTestTinyUMT5Loader": TinyUMT5Loader, "SDVGenTestPoolingVAELoader": PoolingVAELoader}
