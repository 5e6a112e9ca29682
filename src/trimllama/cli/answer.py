"""Shared by `generate` and `show`: images + prompt -> model inputs -> (trimmed) generation -> stats.

Not a subcommand (not in `COMMANDS`). One prompt, one sample: every `--image` goes into that sample.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from ..adapters import TrimStats, adapter_for
from ..errors import TrimllamaError
from ..handle import trim
from ..loading import encode, prompt_text
from ..methods import SelectionMethod
from .options import (
    CommandError,
    flag_message,
    load_image,
    load_model,
    method_from_args,
    progress_bar,
    resolve_device,
)


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input")
    group.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="image file (repeatable: several images, one prompt); without one the prompt runs text-only, as untrimmed",
    )
    group.add_argument("--prompt", required=True, help="the question or instruction about the image(s)")
    group.add_argument(
        "--max-new-tokens", type=int, default=32, metavar="N", help="most tokens to generate (default 32)"
    )
    group.add_argument(
        "--chat-template",
        default="auto",
        choices=["auto", "on", "off"],
        help="wrap the prompt in the processor's chat template (the prompt rule of every front-end, "
        "trimllama.loading.prompt_text); auto: when the processor has one (the testbed's renders its training "
        "format), else <|image|> per image, <|begin_of_text|>, the prompt",
    )
    group.add_argument("--json", action="store_true", help="print one JSON record instead of text; no progress bars")


@dataclass
class Generation:
    """One prompt answered by the (trimmed) model.

    Attributes:
        answer: the generated text, special tokens removed.
        inputs: the processor's CPU tensors for the one sample (pixel_values (1, images, tiles, C, H, W), ...).
        processor: the processor that made them.
        kept: 1-D LongTensor, kept indices into the sample's flattened image-token axis (images x tiles x patches).
        stats: what the prefill kept and what the cross-attention cache held.
        method: the selection method, None for `--method none`.
        num_patches: image tokens per tile (patch 0 is the class token).
        prompt_tokens, new_tokens: text lengths; seconds: wall time of `generate` (prefill and decode).
    """

    answer: str
    inputs: dict
    processor: object
    kept: torch.Tensor
    stats: TrimStats
    method: SelectionMethod | None
    num_patches: int
    model: str
    prompt_tokens: int
    new_tokens: int
    seconds: float

    @property
    def kept_fraction(self) -> float:
        return self.stats.kept_fraction[0]

    def record(self) -> dict:
        """JSON-ready summary (the `--json` output of `generate`); bytes are the sample's own (`TrimStats.samples`)."""
        stats, sample = self.stats, self.stats.samples[0]
        return dict(
            answer=self.answer,
            model=self.model,
            method=method_record(self.method),
            image_tokens_before=stats.image_tokens_before[0],
            image_tokens_valid=stats.image_tokens_valid[0],
            image_tokens_after=stats.image_tokens_after[0],
            extra_tokens=stats.extra_tokens[0],
            kept_fraction=self.kept_fraction,
            cross_kv_bytes_before=sample.cross_kv_bytes_before,
            cross_kv_bytes_after=sample.cross_kv_bytes_after,
            cross_kv_bytes_saved=sample.cross_kv_bytes_saved,
            trimmed_layers=stats.trimmed_layers,
            prompt_tokens=self.prompt_tokens,
            new_tokens=self.new_tokens,
            seconds=round(self.seconds, 4),
        )

    def summary(self) -> str:
        """One line: image tokens before -> after, cross-attention KV before -> after, time."""
        stats, sample = self.stats, self.stats.samples[0]
        before, valid, after = stats.image_tokens_before[0], stats.image_tokens_valid[0], stats.image_tokens_after[0]
        tokens = f"image tokens {before}" + (f" ({valid} in real tiles)" if valid != before else "")
        if before == 0:
            tokens = "no image (text-only, nothing to trim)"
        elif self.method is None:
            tokens += f" -> {after} (untrimmed)"
        else:
            extra = f" + {stats.extra_tokens[0]} remainder" if stats.extra_tokens[0] else ""
            of = f" of {valid}" if valid != before else ""
            tokens += f" -> {after}{extra} ({self.kept_fraction:.1%}{of})"
        kv = (
            f"cross-attention KV {_mib(sample.cross_kv_bytes_before)} -> {_mib(sample.cross_kv_bytes_after)} "
            f"(saved {_mib(sample.cross_kv_bytes_saved)})"
        )
        return f"{tokens}, {kv}, {self.seconds:.2f} s"


def method_record(method: SelectionMethod | None) -> dict:
    """{'name', 'label', 'parameters'} of a method (wrapped methods nested), or the untrimmed model's."""
    if method is None:
        return dict(name="none", label="none (untrimmed)", parameters={})
    parameters = {
        key: method_record(value) if isinstance(value, SelectionMethod) else value
        for key, value in method.parameters.items()
    }
    return dict(name=method.name, label=method.label(), parameters=parameters)


def run(args: argparse.Namespace) -> Generation:
    """Check every input, load the model, trim, generate; every bad input is a `CommandError`."""
    if not args.prompt.strip():
        raise CommandError("--prompt is empty")
    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    images = [load_image(path) for path in args.image]
    method_from_args(args)  # refuse bad settings before loading the model
    resolve_device(args.device)

    model, processor, device = load_model(args)
    inputs = build_inputs(processor, images, args.prompt, args.chat_template)
    facts = adapter_for(model)
    num_patches = facts.tokens_per_tile(model)
    check_lengths(model, inputs, args.max_new_tokens)
    method = method_from_args(args, image_tokens=facts.image_tokens(model, inputs)[0] if images else None)

    model_inputs = {name: value.to(device) for name, value in inputs.items()}
    if images:
        model_inputs["pixel_values"] = model_inputs["pixel_values"].to(model.dtype)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    with torch.no_grad():
        if method is None:
            output, seconds = _generate(model, model_inputs, args)
            stats = facts.untrimmed_stats(model, inputs)
            kept = valid_token_indices(inputs, num_patches)
        else:
            with trim(model, method, trim_scoring_layer=args.trim_scoring_layer, tokenizer=processor) as handle:
                output, seconds = _generate(model, model_inputs, args)
            stats, kept = handle.stats, handle.kept[0]
    new_ids = output.sequences[0, prompt_tokens:]
    return Generation(
        answer=processor.decode(new_ids, skip_special_tokens=True).strip(),
        inputs=inputs,
        processor=processor,
        kept=kept,
        stats=stats,
        method=method,
        num_patches=num_patches,
        model=args.model or "testbed",
        prompt_tokens=prompt_tokens,
        new_tokens=int(new_ids.shape[0]),
        seconds=seconds,
    )


def build_inputs(processor, images: list, prompt: str, chat_template: str) -> dict:
    """The processor's tensors for one sample holding every image: input_ids (1, text_len), pixel_values,
    aspect_ratio_ids (1, images), aspect_ratio_mask (1, images, tiles), cross_attention_mask, attention_mask."""
    from transformers.utils import logging

    try:
        text = prompt_text(processor, prompt, len(images), chat_template)
    except TrimllamaError as error:
        raise CommandError(flag_message(error)) from None
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a too long prompt is reported once, by `check_lengths`
    try:
        return dict(encode(processor, [text], [images] if images else None))
    except (ValueError, TypeError, OSError) as error:
        raise CommandError(f"the processor could not prepare the image(s) and prompt: {error}") from None
    finally:
        logging.set_verbosity(verbosity)


def check_lengths(model, inputs: dict, max_new_tokens: int) -> None:
    """Refuse a prompt (plus the tokens to generate) longer than the model's position embeddings."""
    limit = adapter_for(model).context_length(model)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    if prompt_tokens > limit:
        raise CommandError(f"prompt too long: {prompt_tokens} tokens, the model takes at most {limit}")
    if prompt_tokens + max_new_tokens > limit:
        raise CommandError(
            f"prompt too long for --max-new-tokens {max_new_tokens}: {prompt_tokens} + {max_new_tokens} tokens "
            f"exceed the model's {limit} positions; lower --max-new-tokens to {limit - prompt_tokens} or less"
        )


def valid_token_indices(inputs: dict, num_patches: int) -> torch.Tensor:
    """1-D LongTensor: indices of the image tokens of real (non-padding) tiles on the flattened axis."""
    if "aspect_ratio_mask" not in inputs:
        return torch.zeros(0, dtype=torch.long)
    tile_valid = inputs["aspect_ratio_mask"][0].bool()  # (images, tiles)
    return torch.nonzero(tile_valid.flatten().repeat_interleave(num_patches)).flatten()


def _generate(model, inputs: dict, args: argparse.Namespace):
    """(generate output with `.sequences`, seconds): greedy decoding of up to `--max-new-tokens` tokens."""
    max_new_tokens = args.max_new_tokens
    bar = progress_bar(args, max_new_tokens, desc="generating", unit="tok", leave=False)
    streamer = _TokenProgress(bar) if bar is not None else None
    synchronize = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, streamer=streamer
    )
    synchronize()
    return output, time.perf_counter() - start


class _TokenProgress:
    """A `generate` streamer that advances a tqdm bar by one per generated token."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:  # the first call hands over the prompt
            self.bar.update(1)
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"
