"""Exceptions raised by trimllama. Each names the problem it reports."""


class TrimllamaError(Exception):
    """Base class of every error trimllama raises on purpose.

    `setting` names the input the message is about, where there is one (`head_k`, `budget`, `model`, `device`,
    ...), so that each front-end can point at its own spelling of it (a CLI flag, a request field).
    """

    def __init__(self, *args, setting: str | None = None) -> None:
        super().__init__(*args)
        self.setting = setting


class UnsupportedModelError(TrimllamaError, TypeError, ValueError):
    """The model is not a cross-attention model trimllama knows how to wire (or its version is not supported).

    `model_type`: the checkpoint's `config.model_type`, when the refusal comes from loading one.
    """

    def __init__(self, *args, setting: str | None = None, model_type: str | None = None) -> None:
        super().__init__(*args, setting=setting)
        self.model_type = model_type


class InvalidSettingError(TrimllamaError, ValueError):
    """A selection setting (`head_k`, `budget`, `ratio`, ...) is out of range, of the wrong type, or not taken."""


class UnknownMethodError(TrimllamaError, KeyError, ValueError):
    """A selection method name that is not in `trimllama.METHODS`."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingImageError(TrimllamaError, ValueError):
    """A decode step whose cache holds image keys that no trimmed prefill planned (the prefill ran untrimmed)."""


class ShapeMismatchError(TrimllamaError, ValueError):
    """Inputs whose shapes do not line up with the image-token layout the trimming relies on."""


class ModelLoadError(TrimllamaError, ValueError):
    """A model, processor, device or dtype that cannot be loaded as asked (`trimllama.loading`)."""


class PromptError(TrimllamaError, ValueError):
    """A prompt the prompt rule cannot build (`trimllama.loading.prompt_text`): no chat template where one is
    asked for, or `<|image|>` tokens that do not match the images."""


class AlreadyTrimmedError(TrimllamaError, RuntimeError):
    """`trim` was called on a model that is already trimmed; `remove()` the first handle before trimming again."""
