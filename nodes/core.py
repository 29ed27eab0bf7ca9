"""The `sdvgen_core` package that ships beside `nodes/`.

Inside ComfyUI the extension folder is itself a package (`<folder>.nodes`), so the core is imported
relatively as its sibling `<folder>.sdvgen_core` (ComfyUI owns the top-level name `nodes`, and the core
need not be pip-installed). Imported as a top-level `nodes` package (tests and scripts run from the
repository root) the core is the top-level `sdvgen_core`. Importing it is cheap: torch and diffusers load
on first use of one of its names.
"""

import importlib

if __package__ and "." in __package__:
    sdvgen_core = importlib.import_module("..sdvgen_core", __package__)
else:
    sdvgen_core = importlib.import_module("sdvgen_core")


def core_module(name: str):
    """The submodule `sdvgen_core.<name>` (imports torch)."""
    return importlib.import_module(f"{sdvgen_core.__name__}.{name}")
