"""Encoding requests off the event loop: images decoded and prompts tokenized in a bounded pool of threads.

Each of `encode_workers` threads has its own copy of the processor (a fast tokenizer may not be called from
two threads at once, and no lock is shared between requests, so a long text does not hold up a short one).
At most `max_concurrent_decodes` requests with images are encoded at once (their images' memory is bounded
however many arrive); requests with images beyond it wait without holding a thread, so text-only requests go
past them. Beyond `encode_workers + max_queue` requests being encoded or waiting for it, one more is a 503.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import threading
from concurrent.futures import ThreadPoolExecutor

from .config import ServeConfig
from .errors import APIError
from .metrics import ServeMetrics
from .prompts import EncodedPrompt, check_prompt_length, encode_messages
from .schemas import ChatCompletionRequest


class Encoder:
    """Turns checked chat requests into model inputs (`EncodedPrompt`) on its own threads, under its bounds."""

    def __init__(self, processor, context_length: int, config: ServeConfig, metrics: ServeMetrics) -> None:
        self.processor = processor
        self.context_length = context_length
        self.config = config
        self.metrics = metrics
        self._threads = ThreadPoolExecutor(config.encode_workers, thread_name_prefix="trimllama-encode")
        self._local = threading.local()
        self._decode_slots = asyncio.Semaphore(config.max_concurrent_decodes)  # held by requests with images
        self._admitted = 0  # requests being encoded or waiting for it; only touched on the event loop

    async def encode(self, chat: ChatCompletionRequest) -> tuple[EncodedPrompt, int]:
        """`chat` encoded on an encoder thread, and its completion budget (`max_tokens`, checked against the
        context), holding a decode slot if it has images (until its thread is done, even if the request is
        cancelled); a 503 when `encode_workers + max_queue` requests are admitted already."""
        config = self.config
        if self._admitted >= config.encode_workers + config.max_queue:
            raise APIError(
                503,
                f"the server is busy: {self._admitted} requests are being encoded or wait for it (--encode-workers "
                f"{config.encode_workers}, --max-concurrent-decodes {config.max_concurrent_decodes}, --max-queue "
                f"{config.max_queue}); retry shortly",
                code="encoders_busy",
                headers={"Retry-After": "1"},
            )
        self._admitted += 1
        try:
            if not chat.has_images:
                return await asyncio.wrap_future(self._threads.submit(self._encode, chat, (self.metrics.encoding,)))
            await self._decode_slots.acquire()
            try:
                future = self._threads.submit(self._encode, chat, (self.metrics.encoding, self.metrics.decoding))
            except BaseException:
                self._decode_slots.release()
                raise
            loop = asyncio.get_running_loop()
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._decode_slots.release))
            return await asyncio.wrap_future(future)
        finally:
            self._admitted -= 1

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _encode(self, chat: ChatCompletionRequest, gauges: tuple) -> tuple[EncodedPrompt, int]:
        """Render the prompt, count its tokens against the context, then decode the images and run the processor
        (on an encoder thread, counted in `gauges`): a prompt too long is refused before any image is decoded."""
        if not hasattr(self._local, "processor"):
            self._local.processor = copy.deepcopy(self.processor)
        for gauge in gauges:
            gauge.inc()
        try:
            budget = functools.partial(self._completion_budget, chat=chat)
            prompt = encode_messages(self._local.processor, chat.messages, self.config.images, check_length=budget)
            return prompt, budget(prompt.prompt_tokens)
        finally:
            for gauge in gauges:
                gauge.dec()

    def _completion_budget(self, prompt_tokens: int, chat: ChatCompletionRequest) -> int:
        return check_prompt_length(
            prompt_tokens, chat.requested_max_tokens, self.context_length, self.config.default_max_tokens
        )
