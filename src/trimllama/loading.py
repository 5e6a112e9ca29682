"""Loading a model for trimming, and the one prompt rule: shared by every front-end (generate, show, eval, serve,
lmms-eval), each of which only maps the errors (`ModelLoadError`, `UnsupportedModelError`, `PromptError`) to its form.

    model, processor, device = load_model("meta-llama/Llama-3.2-11B-Vision-Instruct")
    text = prompt_text(processor, "What is in this image?", num_images=1)
    inputs = encode(processor, [text], [[image]])
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .adapters import supported_model_types
from .errors import ModelLoadError, PromptError, UnsupportedModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TESTBED = "testbed"  # the model name of the shipped testbed checkpoint
CHAT_TEMPLATE_MODES = ("auto", "on", "off")
IMAGE_TOKEN = "<|image|>"


def resolve_source(source: str | None) -> str:
    """A model id or directory; None or "testbed" is the shipped testbed checkpoint."""
    if source is None or source == TESTBED:
        from .testbed import CHECKPOINT_DIR

        return str(CHECKPOINT_DIR)
    return str(source)


def resolve_device(name: str) -> torch.device:
    """"auto" is cuda when a GPU is there, else cpu; "cpu", "cuda" and "cuda:N" as named. Asking for a GPU
    without one, or for another name, is refused."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(name)):
        raise ModelLoadError(f"device {name!r}: choose auto, cpu, cuda or cuda:N", setting="device")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name} was asked for, but no CUDA GPU is available on this machine", setting="device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ModelLoadError(
            f"device {name} was asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)", setting="device"
        )
    return device


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """"auto" is bfloat16 on a GPU and float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}", setting="dtype")
    return DTYPES[name]


def load_model(
    source: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    device_map: str | None = None,
):
    """(model in eval mode, processor padding on the left, device) of a checkpoint some adapter supports.

    Args:
        source: a Hugging Face id (owner/name) or a local directory; None or "testbed": the shipped testbed.
        device: "auto", "cpu", "cuda" or "cuda:N"; ignored with `device_map`.
        dtype: "auto" (bfloat16 on a GPU, float32 on the CPU) or a key of `DTYPES`.
        device_map: passed to `from_pretrained` (e.g. "auto" spreads the model over the visible GPUs).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    source = resolve_source(source)
    if device_map is None:
        target = resolve_device(device)
    else:
        target = torch.device("cuda" if torch.cuda.is_available() and not str(device_map).startswith("cpu") else "cpu")
    torch_dtype = resolve_dtype(dtype, target)
    local = Path(source)
    if local.exists() and not (local / "config.json").is_file():
        raise ModelLoadError(f"model {source}: not a model directory (no config.json)", setting="model")
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise ModelLoadError(
            f"model {source}: no such directory, and not a Hugging Face model id (owner/name)", setting="model"
        )
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as error:  # hub or parsing failure: one line, not a traceback
        raise ModelLoadError(f"model {source}: could not load its config ({first_line(error)})", setting="model") from None
    supported = supported_model_types()
    if config.model_type not in supported:
        raise UnsupportedModelError(
            f"model {source}: model_type {config.model_type!r} is not a supported cross-attention model "
            f"(supported: {', '.join(supported)}, i.e. Llama-3.2-Vision)",
            setting="model",
            model_type=config.model_type,
        )
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation, device_map=device_map
        )
        processor = AutoProcessor.from_pretrained(source)
    except Exception as error:
        raise ModelLoadError(f"model {source}: could not load it ({first_line(error)})", setting="model") from None
    processor.tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    if device_map is None:
        model = model.to(target)
    return model.eval(), processor, model.device


def has_chat_template(processor) -> bool:
    return bool(getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None))


def chat_text(processor, messages: list[dict], chat_template: str = "auto") -> str:
    """The prompt rule for a conversation (`[{"role", "content": str | [{"type": "image"}, {"type": "text", ...}]}]`).

    "auto" and "on": the processor's chat template with the generation prompt ("on" refuses a processor without
    one). "off", or "auto" without a template: one user turn, written as the base models take it:
    `<|image|>` per image, `<|begin_of_text|>`, the text.
    """
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise PromptError(f"chat_template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {chat_template!r}")
    if chat_template == "on" or (chat_template == "auto" and has_chat_template(processor)):
        if not has_chat_template(processor):
            raise PromptError("chat_template on: the processor has no chat template", setting="chat_template")
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise PromptError("without a chat template, a prompt is one user message", setting="chat_template")
    content = messages[0]["content"]
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    images = sum(part["type"] == "image" for part in parts)
    text = " ".join(part["text"] for part in parts if part["type"] == "text")
    return IMAGE_TOKEN * images + processor.tokenizer.bos_token + text


def prompt_text(processor, text: str, num_images: int, chat_template: str = "auto") -> str:
    """The prompt rule for one question about `num_images` images (one user turn: the images, then the text).

    A text that already holds `<|image|>` is taken as the finished prompt ("auto" / "off"), when it holds one
    per image.
    """
    found = text.count(IMAGE_TOKEN)
    if found:
        if chat_template == "on":
            raise PromptError(f"chat_template on, but the text already holds {IMAGE_TOKEN}", setting="chat_template")
        if found != num_images:
            raise PromptError(f"the text holds {found} {IMAGE_TOKEN} tokens for {num_images} images")
        return text
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    return chat_text(processor, [{"role": "user", "content": content}], chat_template)


def encode(processor, texts: list[str], images: list[list] | None = None):
    """The processor's (left-padded) batch for prompts written by the prompt rule (`prompt_text`, `chat_text`).

    Those prompts already hold every special token (the chat template, or the base-model format, writes
    `<|begin_of_text|>`), so the tokenizer adds none: a Llama tokenizer would add a second BOS otherwise.

    Args:
        texts: one prompt per sample.
        images: per sample, its images in the order of its `<|image|>` tokens; None for text-only prompts.
    """
    return processor(images=images, text=texts, add_special_tokens=False, padding=True, return_tensors="pt")


def count_tokens(processor, text: str) -> int:
    """Tokens of one prompt as `encode` tokenizes it, without preparing any image (cheap: checks a length first)."""
    return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
