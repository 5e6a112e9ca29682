"""From OpenAI messages to model inputs: one request encoded alone, many collated into a batch.

Each request is encoded on its own (chat template, tokenizer, image processor) in the request's
thread, so the generation thread only runs the model. `collate` then pads a group of encoded
requests exactly as `MllamaProcessor` pads a batch: tokens on the left, images and tiles with
zeros, padding images with aspect-ratio id 0 and an aspect-ratio mask that marks their first tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from ..errors import PromptError
from ..loading import chat_text, count_tokens, encode
from .config import ImageLimits
from .errors import APIError, invalid
from .images import decode_image_url
from .schemas import ImagePart, Message

@dataclass
class Conversation:
    """Messages in the chat-template form (`{"type": "image"}` parts) and the images in order."""

    messages: list[dict]
    images: list[Image.Image]


@dataclass
class EncodedPrompt:
    """One request's model inputs, batch dimension 1.

    inputs: input_ids and attention_mask (1, text_len); with images also pixel_values
        (1, images, tiles, channels, height, width), aspect_ratio_ids (1, images),
        aspect_ratio_mask (1, images, tiles) and cross_attention_mask (1, text_len, images, tiles).
    """

    inputs: dict[str, torch.Tensor]

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    @property
    def has_images(self) -> bool:
        return "pixel_values" in self.inputs


def encode_messages(
    processor, messages: list[Message], limits: ImageLimits, check_length: Callable[[int], object]
) -> EncodedPrompt:
    """A request's messages as model inputs: rendered, and if they hold images, their tokens counted and given to
    `check_length` (which raises when they cannot fit) before any image is decoded (data URLs only, under
    `limits`) and the processor runs."""
    template, urls = template_messages(messages, limits)
    text = render_prompt(processor, template, len(urls))
    if urls:
        check_length(count_tokens(processor, text))
    return encode_text(processor, text, [decode_image_url(url, limits, param) for url, param in urls])


def template_messages(messages: list[Message], limits: ImageLimits) -> tuple[list[dict], list[tuple[str, str]]]:
    """The messages in the chat-template form (`{"type": "image"}` parts), and each image's data URL with where
    it sits in the request, in order; nothing is decoded. A 400 past `limits.max_images` images."""
    urls = [
        (part.image_url.url, f"messages[{index}].content[{part_index}].image_url.url")
        for index, message in enumerate(messages)
        for part_index, part in enumerate(message.parts)
        if isinstance(part, ImagePart)
    ]
    if len(urls) > limits.max_images:
        raise invalid(
            f"'messages': {len(urls)} images, more than the limit of {limits.max_images} images per request "
            "(--max-images)",
            "messages",
            "too_many_images",
        )
    converted = []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        if not isinstance(message.content, list):
            converted.append({"role": role, "content": message.content or ""})
            continue
        parts = [{"type": "image"} if isinstance(part, ImagePart) else {"type": "text", "text": part.text} for part in message.content]
        converted.append({"role": role, "content": parts})
    return converted, urls


def encode_conversation(processor, conversation: Conversation) -> EncodedPrompt:
    """Render the prompt (`render_prompt`) and run the processor on it with the images."""
    return encode_text(processor, render_prompt(processor, conversation.messages, len(conversation.images)), conversation.images)


def render_prompt(processor, messages: list[dict], images: int) -> str:
    """The prompt text of chat-template `messages` (`trimllama.loading.chat_text`, the one prompt rule); a 400 if
    it does not place one image token per image."""
    from jinja2 import TemplateError

    try:
        text = chat_text(processor, messages)
    except PromptError as error:
        raise invalid(f"'messages': {error}", "messages") from None
    except TemplateError as error:
        raise invalid(f"'messages': the model's chat template refused the conversation ({error})", "messages") from None
    image_token = processor.image_token
    if text.count(image_token) != images:
        raise invalid(
            f"'messages': the chat template placed {text.count(image_token)} image tokens for "
            f"{images} images (images are read from user messages only)",
            "messages",
        )
    return text


def encode_text(processor, text: str, images: list[Image.Image]) -> EncodedPrompt:
    """The processor's inputs for a rendered prompt and its images."""
    images = [images] if images else None
    try:
        encoded = encode(processor, [text], images)
    except (ValueError, TypeError) as error:
        raise invalid(f"'messages': the processor could not prepare the inputs ({error})", "messages") from None
    return EncodedPrompt({key: value for key, value in encoded.items()})


def check_prompt_length(prompt_tokens: int, max_tokens: int | None, context: int, default_max_tokens: int) -> int:
    """The completion budget of a request, or a 400 if the prompt (plus max_tokens) does not fit."""
    if prompt_tokens >= context:
        raise invalid(
            f"'messages': the prompt has {prompt_tokens} tokens, more than the model allows ({context} tokens of "
            "context, which must also hold the answer); shorten the messages",
            "messages",
            "context_length_exceeded",
        )
    room = context - prompt_tokens
    if max_tokens is None:
        return min(default_max_tokens, room)
    if max_tokens > room:
        raise invalid(
            f"'max_tokens': the model's context is {context} tokens; the prompt has {prompt_tokens}, which leaves "
            f"{room} for the completion, but max_tokens={max_tokens} was requested",
            "max_tokens",
            "context_length_exceeded",
        )
    return max_tokens


def collate(prompts: list[EncodedPrompt], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad single-request inputs into one batch; equal to the processor's own batched output.

    Returns the same keys as `EncodedPrompt.inputs` with batch dimension len(prompts); text is
    left-padded to the longest prompt, images and tiles padded to the largest counts.
    """
    if len({prompt.has_images for prompt in prompts}) != 1:
        raise APIError(500, "a batch mixes requests with and without images")
    text_len = max(prompt.prompt_tokens for prompt in prompts)
    batch = {
        "input_ids": torch.cat([_left_pad(p.inputs["input_ids"], text_len, pad_token_id) for p in prompts]),
        "attention_mask": torch.cat([_left_pad(p.inputs["attention_mask"], text_len, 0) for p in prompts]),
    }
    if not prompts[0].has_images:
        return batch
    images = max(p.inputs["pixel_values"].shape[1] for p in prompts)
    tiles = max(p.inputs["pixel_values"].shape[2] for p in prompts)
    batch["pixel_values"] = torch.cat([_pad_dims(p.inputs["pixel_values"], {1: images, 2: tiles}) for p in prompts])
    batch["aspect_ratio_ids"] = torch.cat([_pad_dims(p.inputs["aspect_ratio_ids"], {1: images}) for p in prompts])
    batch["aspect_ratio_mask"] = torch.cat([_pad_aspect_ratio_mask(p.inputs["aspect_ratio_mask"], images, tiles) for p in prompts])
    batch["cross_attention_mask"] = torch.cat(
        [_pad_dims(_left_pad(p.inputs["cross_attention_mask"], text_len, 0), {2: images, 3: tiles}) for p in prompts]
    )
    return batch


def _left_pad(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """Pad dim 1 on the left to `length`."""
    missing = length - tensor.shape[1]
    if missing == 0:
        return tensor
    shape = (tensor.shape[0], missing, *tensor.shape[2:])
    return torch.cat([torch.full(shape, value, dtype=tensor.dtype), tensor], dim=1)


def _pad_dims(tensor: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    """Zero-pad the given dims on the right to the given sizes."""
    shape = list(tensor.shape)
    for dim, size in sizes.items():
        shape[dim] = size
    if shape == list(tensor.shape):
        return tensor
    padded = tensor.new_zeros(shape)
    padded[tuple(slice(0, length) for length in tensor.shape)] = tensor
    return padded


def _pad_aspect_ratio_mask(mask: torch.Tensor, images: int, tiles: int) -> torch.Tensor:
    """(1, images_i, tiles_i) -> (1, images, tiles); a padding image marks its first tile, as the processor does."""
    padded = _pad_dims(mask, {1: images, 2: tiles})
    padded[:, mask.shape[1] :, 0] = 1
    return padded
