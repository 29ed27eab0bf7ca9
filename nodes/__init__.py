"""ComfyUI node classes of the SDV-Gen pack (thin wrappers over `sdvgen_core`)."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
