"""Server settings: what `trimllama serve` options become, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from ..methods import SelectionMethod

MAX_BATCH_WINDOW_MS = 60_000.0  # a request never waits longer than a minute for others to join its batch


@dataclass(frozen=True)
class ImageLimits:
    """What one request may send as images.

    Attributes:
        max_bytes: decoded bytes of one image file.
        max_pixels: width x height of one image, checked from its header before any pixel is decoded; at
            most PIL's own decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`), which PIL enforces first.
        max_images: images in one request (all messages together).
    """

    max_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096
    max_images: int = 2


@dataclass(frozen=True)
class ServeConfig:
    """Everything the app and the batcher need besides the model.

    Attributes:
        model_name: the id `GET /v1/models` lists and requests must name.
        method: the trimming applied when a request gives no `trim` object (None: untrimmed).
        trim_scoring_layer: default of the per-request `trim.trim_scoring_layer`.
        api_key: if set, every request needs `Authorization: Bearer <api_key>`.
        max_batch_size: requests served together in one prefill and decode.
        batch_window_ms: how long the oldest waiting request waits for others to join its batch (at most
            `MAX_BATCH_WINDOW_MS`).
        max_queue: requests waiting for a batch; one more is answered 503.
        default_max_tokens: completion length when a request gives no `max_tokens` (capped by the context).
        images: per-request image limits.
        max_body_bytes: bytes of one request body (413); None: enough for `images.max_images` images of
            `images.max_bytes`, base64-encoded, and `max_text_chars` of text with every character JSON-escaped
            (6 bytes), plus 1 MiB for the rest (32,156,338 bytes with the defaults).
        max_messages: messages in one request (400), checked before the body is validated.
        max_content_parts: content parts in one request, all messages together (400), checked with
            `max_messages`. With them, neither parsing nor the chat template has more than a few hundred
            items to go through, whatever the body holds.
        max_text_chars: characters of text in one request (all messages), checked before tokenizing (413).
        encode_workers: requests whose images are decoded and prompt tokenized at the same time, each in
            its own thread with its own processor: with the image and text limits, this bounds the
            memory encoding takes (an image costs a few tens of bytes per pixel while it is processed).
            Requests beyond wait for a worker, up to `max_queue` of them; one more is answered 503.
        max_concurrent_decodes: requests whose images are decoded and preprocessed at the same time (an
            image holds up to ~24 bytes per pixel of `images.max_pixels` meanwhile, so this bounds the memory
            images take however many arrive). Requests with images beyond it wait without holding an encoder
            thread (text-only requests go past them), within the same `max_queue` bound: one more is 503.
        feature_cache_bytes: byte limit of the LRU of full projected image features keyed by image content
            (`serve.feature_cache`), so a follow-up about the same image skips the vision tower; 0 turns it off.
    """

    model_name: str
    method: SelectionMethod | None = None
    trim_scoring_layer: bool = False
    api_key: str | None = None
    max_batch_size: int = 8
    batch_window_ms: float = 10.0
    max_queue: int = 64
    default_max_tokens: int = 512
    images: ImageLimits = ImageLimits()
    max_body_bytes: int | None = None
    max_messages: int = 256
    max_content_parts: int = 256
    max_text_chars: int = 512 * 1024
    encode_workers: int = 2
    max_concurrent_decodes: int = 2
    feature_cache_bytes: int = 2**30

    def __post_init__(self) -> None:
        if self.max_body_bytes is None:
            images = self.images.max_images * (self.images.max_bytes * 4 // 3 + 4)
            object.__setattr__(self, "max_body_bytes", images + 6 * self.max_text_chars + 2**20)
        counts = (
            "max_batch_size max_queue default_max_tokens max_body_bytes max_messages max_content_parts max_text_chars "
            "encode_workers max_concurrent_decodes"
        )
        for name in counts.split():
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.feature_cache_bytes < 0:
            raise ValueError(f"feature_cache_bytes must be >= 0 (0 turns the feature cache off), got {self.feature_cache_bytes}")
        if not 0 <= self.batch_window_ms <= MAX_BATCH_WINDOW_MS:  # also refuses nan
            raise ValueError(f"batch_window_ms must lie in [0, {MAX_BATCH_WINDOW_MS}], got {self.batch_window_ms}")
        for name in ("max_bytes", "max_pixels", "max_images"):
            if getattr(self.images, name) < 1:
                raise ValueError(f"images.{name} must be >= 1, got {getattr(self.images, name)}")
        if Image.MAX_IMAGE_PIXELS is not None and self.images.max_pixels > Image.MAX_IMAGE_PIXELS:
            raise ValueError(
                f"images.max_pixels must be at most {Image.MAX_IMAGE_PIXELS} (PIL's decompression-bomb limit), "
                f"got {self.images.max_pixels}"
            )
        key = self.api_key
        if key is not None and not (key and key.isascii() and key.isprintable() and key == key.strip()):
            raise ValueError("the API key must be printable ASCII without surrounding spaces (HTTP headers carry ASCII)")
