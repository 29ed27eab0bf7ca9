"""ComfyUI entry point of the SDV-Gen node pack.

Only the node mappings are imported here; torch, diffusers and the models load when a node runs.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
