"""The generation loop: one batched prefill, then one batched decode step per token.

Written out instead of calling `model.generate()` so that every row has its own sampling
settings and `torch.Generator`, its own `max_tokens` and stop sequences, streams its text as it
is produced, and can be cancelled alone. The inputs of every forward pass are the ones
`generate()` builds for Mllama (left padding, position ids from the attention mask on the
prefill and on every decode step, the last cross-attention mask row on decode steps,
`logits_to_keep=1`), so greedy tokens equal `generate()`'s, batched or alone. A finished or cancelled row stays in the batch (fed padding, its output
ignored) until every row is done: this is request-level batching, not iteration-level.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from ..adapters import SampleStats, adapter_for
from ..handle import TrimHandle, trim
from .feature_cache import FeatureCache, cached_image_features, slot_key
from .prompts import EncodedPrompt, collate
from .trimming import TrimSetting


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. temperature 0 is greedy (argmax); any temperature > 0 samples,
    and a tiny one tends exactly to greedy (see `sample_token`), never to NaN."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrimReport:
    """What trimming did for one request: the method's label ("none" untrimmed) and the request's own
    `SampleStats` (its image tokens without batch or tile padding, those kept, those added, its cache bytes)."""

    method: str
    sample: SampleStats

    def as_dict(self) -> dict:
        """The `trim` object of a response: `method`, then `SampleStats`' fields and properties by their names."""
        sample = self.sample
        return {
            "method": self.method,
            **dataclasses.asdict(sample),
            "kept_fraction": sample.kept_fraction,
            "cross_kv_bytes_saved": sample.cross_kv_bytes_saved,
        }


@dataclass(frozen=True)
class RowResult:
    """A finished request: its text, why it stopped ("stop" or "length"), token counts, trimming."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    trim: TrimReport


class Job(Protocol):
    """A request as the engine sees it: inputs, settings, and where its output goes."""

    prompt: EncodedPrompt
    sampling: SamplingParams

    def cancelled(self) -> bool: ...

    def delta(self, text: str) -> None: ...

    def finish(self, result: RowResult) -> None: ...


class TextStream:
    """Generated token ids -> text deltas, holding back text that may be the start of a stop sequence.

    Each new token is decoded together with the token before it, so the deltas concatenate to
    the decoded text (spaces between words included), and a partial UTF-8 character
    (decoded as U+FFFD) waits for the token that completes it.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.text = ""
        self._pending = ""
        self._prefix = 0
        self._read = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add one token; returns (text now safe to emit, whether a stop sequence was reached)."""
        self.tokens.append(token)
        self._pending += self._decode_new()
        return self._release()

    def flush(self) -> str:
        """At the end: emit whatever was held back."""
        rest, self._pending = self._pending, ""
        self.text += rest
        return rest

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _decode_new(self) -> str:
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return after[len(before) :]

    def _release(self) -> tuple[str, bool]:
        hits = [index for index in (self._pending.find(stop) for stop in self.stop) if index >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            self.text += out
            return out, True
        hold = max((_overlap(self._pending, stop) for stop in self.stop), default=0)
        out, self._pending = self._pending[: len(self._pending) - hold], self._pending[len(self._pending) - hold :]
        self.text += out
        return out, False


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for length in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0


@dataclass
class _Row:
    """Decoding state of one job in the batch."""

    job: Job
    stream: TextStream
    generator: torch.Generator | None
    warpers: LogitsProcessorList | None
    finish_reason: str | None = None
    done: bool = False
    completion_tokens: int = field(default=0)


class Engine:
    """Runs batches of jobs on one Mllama model. Not thread-safe: one thread calls `generate`."""

    def __init__(self, model, processor, feature_cache: FeatureCache | None = None) -> None:
        self.model = model
        self.processor = processor
        self.feature_cache = feature_cache
        self.tokenizer = processor.tokenizer
        generation_config = model.generation_config
        eos = generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        pads = (self.tokenizer.pad_token_id, generation_config.pad_token_id, min(self.eos_ids))
        self.pad_id = int(next(pad for pad in pads if pad is not None))
        self.facts = adapter_for(model)
        self.context_length = self.facts.context_length(model)
        self.default_sampling = (
            (float(generation_config.temperature or 1.0), float(generation_config.top_p or 1.0))
            if generation_config.do_sample
            else (0.0, 1.0)
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def generate(self, jobs: Sequence[Job], setting: TrimSetting) -> None:
        """Serve `jobs` together; each gets its deltas and then `finish(RowResult)`, unless cancelled."""
        batch = collate([job.prompt for job in jobs], self.pad_id)
        keys = self._slot_keys(batch)
        batch = {key: value.to(self.device) for key, value in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        rows = [
            _Row(job, TextStream(self.tokenizer, job.sampling.stop), self._generator(job.sampling), _warpers(job.sampling))
            for job in jobs
        ]
        trimmed = setting.method is not None and "pixel_values" in batch
        context = (
            trim(self.model, setting.method, trim_scoring_layer=setting.trim_scoring_layer, tokenizer=self.processor)
            if trimmed
            else None
        )
        with context if context is not None else contextlib.nullcontext():
            attention_mask = batch["attention_mask"]
            # as generate(): positions count the row's own tokens, so left padding shifts nothing
            prefill_positions = (attention_mask.cumsum(dim=-1) - 1).masked_fill(attention_mask == 0, 0)
            prefill = {**batch, "position_ids": prefill_positions}
            if keys is not None:
                features = cached_image_features(self.feature_cache, self.facts, self.model, batch, keys)
                prefill = self.facts.with_image_features(self.model, prefill, features)
            logits, cache = self._forward(prefill, cache=None)
            reports = self._trim_reports(batch, context, setting)
            positions = prefill_positions[:, -1:]  # (batch, 1)
            cross_mask = batch.get("cross_attention_mask")
            while True:
                tokens = self._next_tokens(logits, rows)
                self._advance(rows, tokens)
                if all(row.done for row in rows):
                    break
                positions = positions + 1
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
                step = {"input_ids": tokens[:, None], "attention_mask": attention_mask, "position_ids": positions}
                if cross_mask is not None:
                    step["cross_attention_mask"] = cross_mask[:, -1:]
                logits, cache = self._forward(step, cache=cache)
        for row, report in zip(rows, reports):
            if row.job.cancelled():
                continue
            tail = row.stream.flush()
            if tail:
                row.job.delta(tail)
            row.job.finish(
                RowResult(
                    text=row.stream.text,
                    finish_reason=row.finish_reason or "length",
                    prompt_tokens=row.job.prompt.prompt_tokens,
                    completion_tokens=row.completion_tokens,
                    trim=report,
                )
            )

    def _slot_keys(self, batch: dict) -> list[list[str]] | None:
        """`slot_key` of every (sample, image) slot of a CPU batch; None without images or without a feature cache."""
        if self.feature_cache is None or "pixel_values" not in batch:
            return None
        slots = [batch[name] for name in self.facts.image_inputs]
        return [
            [slot_key(*(inputs[sample, image] for inputs in slots)) for image in range(slots[0].shape[1])]
            for sample in range(slots[0].shape[0])
        ]

    def _forward(self, inputs: dict, cache) -> tuple[torch.Tensor, object]:
        """(batch, vocab) float32 logits of the last position, and the cache."""
        keyword = self.facts.cache_keyword
        output = self.model(**inputs, **{keyword: cache}, use_cache=True, logits_to_keep=1)
        return output.logits[:, -1, :].float(), getattr(output, keyword)

    def _generator(self, sampling: SamplingParams) -> torch.Generator | None:
        """The row's own generator (generate() has one global RNG; rows here need their own seeds)."""
        if sampling.temperature == 0:
            return None
        generator = torch.Generator(device=self.device)
        if sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.seed)
        return generator

    def _next_tokens(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """(batch,) long: argmax for greedy rows, a draw from each row's own generator otherwise; pad for done rows."""
        tokens = logits.argmax(dim=-1)
        for index, row in enumerate(rows):
            if row.done:
                tokens[index] = self.pad_id
            elif row.generator is not None:
                tokens[index] = sample_token(logits[index], row.warpers, row.generator)
        return tokens

    def _advance(self, rows: list[_Row], tokens: torch.Tensor) -> None:
        for row, token in zip(rows, tokens.tolist()):
            if row.done:
                continue
            if row.job.cancelled():
                row.done = True
                continue
            if token in self.eos_ids:
                row.done, row.finish_reason = True, "stop"
                continue
            row.completion_tokens += 1
            delta, stopped = row.stream.push(token)
            if delta:
                row.job.delta(delta)
            if stopped:
                row.done, row.finish_reason = True, "stop"
            elif row.completion_tokens >= row.job.sampling.max_tokens:
                row.done, row.finish_reason = True, "length"

    def _trim_reports(self, batch: dict, handle: TrimHandle | None, setting: TrimSetting) -> list[TrimReport]:
        """Per request: its own image tokens and cross-attention cache bytes, untrimmed and as served
        (`TrimStats.samples`)."""
        stats = handle.stats if handle is not None else self.facts.untrimmed_stats(self.model, batch)
        label = setting.label if handle is not None else "none"
        return [TrimReport(label, sample) for sample in stats.samples]


def _warpers(sampling: SamplingParams) -> LogitsProcessorList | None:
    """transformers' temperature and top-p warpers of one sampling row; None when greedy."""
    if sampling.temperature == 0:
        return None
    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(sampling.temperature))])
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(sampling.top_p)))
    return warpers


def sample_token(logits: torch.Tensor, warpers: LogitsProcessorList, generator: torch.Generator) -> int:
    """Draw one token from (vocab,) float32 logits, warped by `warpers`, with the row's own generator.

    The logits are shifted so that their maximum is 0, and taken to float64 (where any temperature a
    request can send is non-zero), before the temperature divides them: the distribution is the same,
    and a tiny temperature sends the other logits to -inf (probability 0, the exact greedy limit, ties
    shared) instead of overflowing the maximum to +inf and softmax to NaN.
    """
    scores = warpers(None, (logits - logits.max()).double()[None, :])  # (1, vocab)
    return int(torch.multinomial(scores.softmax(dim=-1)[0], 1, generator=generator))
