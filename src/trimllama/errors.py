"""Exceptions raised by trimllama. Each names the problem it reports."""


class TrimllamaError(Exception):
    """Base class of every error trimllama raises on purpose."""


class UnsupportedModelError(TrimllamaError, TypeError, ValueError):
    """The model is not a cross-attention model trimllama knows how to wire (or its version is not supported)."""


class InvalidSettingError(TrimllamaError, ValueError):
    """A selection setting (`head_k`, `budget`, `ratio`, ...) is out of range or of the wrong type."""


class UnknownMethodError(TrimllamaError, KeyError, ValueError):
    """A selection method name that is not in `trimllama.METHODS`."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingImageError(TrimllamaError, ValueError):
    """A decode step whose cache holds image keys that no trimmed prefill planned (the prefill ran untrimmed)."""


class ShapeMismatchError(TrimllamaError, ValueError):
    """Inputs whose shapes do not line up with the image-token layout the trimming relies on."""
