"""Errors that reach users: each names the input at fault and what was expected."""


class SDVGenError(ValueError):
    """A problem with something the user supplied (a file, a folder, a prompt, an image, a setting)."""


class ModelLoadError(SDVGenError):
    """The base model folder cannot be used."""


class LoraLoadError(SDVGenError):
    """A LoRA file cannot be used with the loaded model."""


class NonFiniteError(SDVGenError):
    """NaN or inf met in a tensor that would otherwise become a black or garbage video."""


class GenerationCancelled(RuntimeError):
    """Raised from a step callback to stop sampling; the pipeline frees its step tensors on the way out."""
