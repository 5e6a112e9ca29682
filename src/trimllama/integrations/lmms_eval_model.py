"""lmms-eval model `trimllama`: Llama-3.2-Vision (HF Mllama) with its cross-attended image features trimmed.

    pip install "trimllama[eval]"
    python -m lmms_eval --model trimllama --tasks mme --batch_size 8 \\
        --model_args pretrained=meta-llama/Llama-3.2-11B-Vision-Instruct,method=headwise_topk,head_k=0.25

Registered through the `lmms_eval.models` entry point (`trimllama.integrations.lmms_eval_manifest`); this
module imports lmms-eval, so only lmms-eval imports it. Requests are batched (left padding, in request order,
grouped by generation settings), decoded greedily unless a task asks for sampling, and stopped at the task's
`until` strings and `max_new_tokens`. Every request's kept image tokens are recorded; the mean kept fraction
(overall and per task) is logged at the end and lands in lmms-eval's "Throughput Summary" table and in the
results JSON under `throughput` (`avg_kept_fraction`, `avg_kept_fraction/<task>`), next to the accuracy.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.utils import simple_parse_args_string
from loguru import logger
from PIL import Image
from tqdm import tqdm
from transformers import (
    MllamaForConditionalGeneration,
    StoppingCriteria,
    StoppingCriteriaList,
)

from .. import loading, methods
from ..adapters import SampleStats, adapter_for
from ..errors import TrimllamaError, UnsupportedModelError
from ..handle import trim
from ..methods import SelectionMethod

DEFAULT_PRETRAINED = "meta-llama/Llama-3.2-11B-Vision-Instruct"
CHAT_TEMPLATE_MODES = {"auto": "auto", True: "on", False: "off"}  # apply_chat_template -> the prompt rule's mode


def build_method(
    method: str,
    head_k: int | float | None = None,
    budget: int | None = None,
    merge_remainder: bool = False,
    like: str | None = None,
    **settings,
) -> SelectionMethod | None:
    """The selection method the model arguments describe (`trimllama.method_from_settings`), or None for the
    untrimmed model; its errors become lmms-eval's `ValueError`s. `settings`: any other setting of the method."""
    loose = dict(settings, head_k=head_k, budget=budget, merge_remainder=merge_remainder, like=like)
    try:
        return methods.method_from_settings(method, loose)
    except TrimllamaError as error:
        raise ValueError(f"trimllama: {error}") from None


@dataclass(frozen=True)
class Decoding:
    """Generation settings of one group of requests, from the task's `generation_kwargs`."""

    until: tuple[str, ...]
    max_new_tokens: int
    do_sample: bool
    temperature: float | None
    top_p: float | None

    @classmethod
    def from_gen_kwargs(cls, gen_kwargs: dict, default_max_new_tokens: int) -> Decoding:
        until = gen_kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(stop for stop in until if stop)
        if int(gen_kwargs.get("num_beams") or 1) > 1:
            raise ValueError("trimllama: num_beams > 1 (beam search) is not supported; use greedy decoding or sampling")
        temperature = gen_kwargs.get("temperature")
        do_sample = bool(gen_kwargs.get("do_sample", False)) and (temperature is None or float(temperature) > 0)
        return cls(
            until=until,
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
            do_sample=do_sample,
            temperature=float(temperature) if do_sample and temperature is not None else None,
            top_p=float(gen_kwargs["top_p"]) if do_sample and gen_kwargs.get("top_p") is not None else None,
        )

    def generate_kwargs(self, tokenizer, prompt_length: int) -> dict:
        """Keyword arguments of `model.generate` for a batch whose prompts are `prompt_length` tokens long."""
        kwargs: dict = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
        if self.do_sample:
            kwargs.update(
                {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p)) if v is not None}
            )
        if self.until:
            kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(self.until, tokenizer, prompt_length)])
        return kwargs


class StopOnStrings(StoppingCriteria):
    """Finishes each sample once its decoded continuation contains one of `stops`.

    Kept instead of `generate(stop_strings=..., tokenizer=...)`: transformers' `StopStringCriteria` cannot read a
    vocabulary without a prefix-space marker (it raises on the testbed's tokenizer, transformers 5.23).
    """

    def __init__(self, stops: tuple[str, ...], tokenizer, prompt_length: int) -> None:
        self.stops = stops
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        """input_ids: (batch, prompt + generated) -> (batch,) bool, True where a stop string appeared."""
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in self.stops) for text in texts], device=input_ids.device)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to (not including) the first occurrence of any stop string."""
    cut = min((text.find(stop) for stop in stops if stop in text), default=len(text))
    return text[:cut]


def request_images(visuals) -> list[Image.Image]:
    """The RGB images of one request's `doc_to_visual` output (nested lists flattened, None skipped)."""
    images = []
    for visual in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if isinstance(visual, (list, tuple)):
            images.extend(request_images(visual))
        elif isinstance(visual, Image.Image):
            images.append(visual.convert("RGB"))
        elif visual is not None:
            raise ValueError(
                f"trimllama: a request has a {type(visual).__name__} visual ({str(visual)[:80]!r}); "
                "only images are supported (no video or audio)"
            )
    return images


@dataclass(frozen=True)
class KeptRecord(SampleStats):
    """One request's `SampleStats` (its own image tokens, those kept for the later cross-attention layers, those
    the method added, and their cache bytes), with the task and document it came from."""

    task: str = ""
    doc_id: int = 0


def kept_summary(records: list[KeptRecord]) -> dict[str, float]:
    """Means over requests: kept fraction, image / kept / extra tokens, and the kept fraction of each task."""
    summary = {
        "kept_fraction": sum(r.kept_fraction for r in records) / len(records),
        "image_tokens": sum(r.image_tokens for r in records) / len(records),
        "kept_tokens": sum(r.kept_tokens for r in records) / len(records),
        "extra_tokens": sum(r.extra_tokens for r in records) / len(records),
    }
    by_task: dict[str, list[float]] = defaultdict(list)
    for record in records:
        by_task[record.task].append(record.kept_fraction)
    summary.update({f"kept_fraction/{task}": sum(values) / len(values) for task, values in sorted(by_task.items())})
    return summary


class TrimmedLlamaVision(lmms):
    """Llama-3.2-Vision for lmms-eval, optionally trimmed by a trimllama selection method.

    Args:
        pretrained: Hugging Face id or local directory of a Mllama checkpoint; "testbed" is the shipped testbed.
        method: a registered selection method (`trimllama methods`), or "none" for the untrimmed model.
        head_k: HeadwiseTopK's per-head count (int) or fraction (float); the `ratio` of random, uniform_stride, ...
        budget: exactly this many kept image tokens per request (methods with a budget setting).
        merge_remainder: wrap the method in `MergeRemainder` (one remainder token per tile).
        like: with method=random, keep as many tokens per request as this method (configured by head_k /
            budget) keeps: the count-matched random baseline of `trimllama eval`.
        any other setting of the method (`trimllama methods`), e.g. `query_rows=image_turn`, `seed=3`.
        trim_scoring_layer: also compact the first cross-attention layer's cache.
        dtype: "auto" (bfloat16 on GPU, float32 on CPU), "bfloat16", "float16" or "float32".
        device_map: passed to `from_pretrained` ("auto" spreads one model over the visible GPUs);
            not with `accelerate launch`, where each process holds a full copy on its own GPU.
        device: the device when no device_map is given (default: cuda if available, else cpu).
        attn_implementation: "sdpa" or "eager".
        batch_size: requests per `generate` call (lmms-eval's `--batch_size`, or here in `--model_args`).
        max_new_tokens: for tasks whose generation_kwargs set none.
        apply_chat_template: the prompt rule's mode (`trimllama.loading.prompt_text`): "auto" applies the
            processor's chat template when it has one, else `<|image|>` per image, `<|begin_of_text|>`, the context;
            a context that already holds `<|image|>` goes through unchanged. true / false force it on / off.
        kept_log: optional path of a JSONL file with one kept-token record per request.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str = DEFAULT_PRETRAINED,
        method: str = "none",
        head_k: int | float | None = None,
        budget: int | None = None,
        merge_remainder: bool = False,
        like: str | None = None,
        trim_scoring_layer: bool = False,
        dtype: str = "auto",
        device_map: str | None = None,
        device: str | None = None,
        attn_implementation: str = "sdpa",
        batch_size: int | str = 1,
        max_new_tokens: int = 256,
        apply_chat_template: str | bool = "auto",
        kept_log: str | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        settings = {key: value for key, value in unknown.items() if key in methods.setting_names() | set(methods.RESERVED)}
        unknown = {key: value for key, value in unknown.items() if key not in settings}
        if unknown:
            accepted = ", ".join(name for name in inspect.signature(TrimmedLlamaVision).parameters if name != "unknown")
            raise ValueError(
                f"trimllama: unknown model argument(s) {', '.join(unknown)}; accepted: {accepted}, "
                "and any setting of the method"
            )
        self.method = build_method(str(method), head_k, budget, bool(merge_remainder), like, **settings)
        self.trim_scoring_layer = bool(trim_scoring_layer)
        self.batch_size_per_gpu = _positive_int("batch_size", batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        if apply_chat_template not in CHAT_TEMPLATE_MODES:
            raise ValueError(f"trimllama: apply_chat_template must be auto, true or false, got {apply_chat_template!r}")
        self.chat_template_mode = CHAT_TEMPLATE_MODES[apply_chat_template]
        self.kept_log = Path(kept_log) if kept_log else None
        self.kept_records: list[KeptRecord] = []

        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            if device_map:
                raise ValueError(
                    "trimllama: device_map cannot be combined with a multi-process launch (accelerate launch); "
                    "each process holds one full copy of the model on its own GPU"
                )
            device = str(self.accelerator.device)
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
        try:
            self._model, self.processor, _ = loading.load_model(
                str(pretrained), device or "auto", str(dtype), attn_implementation, device_map
            )
        except UnsupportedModelError as error:
            raise ValueError(
                f"trimllama: pretrained={pretrained} is a {error.model_type!r} model; this plugin runs Llama-3.2-Vision "
                f"(mllama)"
            ) from None
        except TrimllamaError as error:
            raise ValueError(f"trimllama: {error}") from None
        if self.chat_template_mode == "on" and not loading.has_chat_template(self.processor):
            raise ValueError(f"trimllama: apply_chat_template=true, but {pretrained} has no chat template")
        self.facts = adapter_for(self._model)
        self.num_patches = self.facts.tokens_per_tile(self._model)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TrimmedLlamaVision:
        """lmms-eval always passes `--batch_size` (default 1); `batch_size` in `--model_args` wins over that default."""
        args = simple_parse_args_string(arg_string)
        extra = {key: value for key, value in (additional_config or {}).items() if value is not None}
        if "batch_size" in args and "batch_size" in extra:
            cli_value = str(extra.pop("batch_size"))
            if cli_value not in ("1", str(args["batch_size"])):
                given = f"{args['batch_size']} in --model_args and {cli_value} in --batch_size"
                raise ValueError(f"trimllama: batch_size given twice: {given}")
        return cls(**args, **extra)

    @property
    def model(self) -> MllamaForConditionalGeneration:
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._model.device

    def prompt(self, context: str, num_images: int) -> str:
        """The text given to the processor for one request: the prompt rule of every front-end
        (`trimllama.loading.prompt_text`); a context that already holds `<|image|>` goes through unchanged."""
        try:
            return loading.prompt_text(self.processor, context, num_images, self.chat_template_mode)
        except TrimllamaError as error:
            raise ValueError(f"trimllama: {error}") from None

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One continuation per request, batched by `batch_size` in request order within groups of equal
        generation settings (a batch mixing text-only and image requests runs as two `generate` calls)."""
        answers: list[str] = [""] * len(requests)
        groups: dict[Decoding, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[Decoding.from_gen_kwargs(request.args[1], self.max_new_tokens)].append(index)
        records: list[KeptRecord] = []
        started, generated_tokens = time.perf_counter(), 0
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="trimllama")
        for decoding, indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts, kept, new_tokens = self._generate_chunk([requests[i] for i in chunk], decoding)
                for index, text in zip(chunk, texts):
                    answers[index] = text
                records += kept
                generated_tokens += new_tokens
                progress.update(len(chunk))
        progress.close()
        self._report(records, time.perf_counter() - started, generated_tokens)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "trimllama: loglikelihood (multiple_choice tasks such as seedbench_ppl) is not implemented; "
            "MME, SEED-Bench, MMVP, ScienceQA-IMG, POPE and GQA generate (generate_until)"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("trimllama: multi-round generation is not implemented")

    # -- helpers -------------------------------------------------------------------------------

    def _generate_chunk(self, requests: list[Instance], decoding: Decoding) -> tuple[list[str], list[KeptRecord], int]:
        """Continuations (in request order), kept-token records and generated tokens of up to `batch_size`
        requests; those with images and those without run as separate batches."""
        prompts, images = [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            images.append(request_images(doc_to_visual(self.task_dict[task][split][doc_id])))
            prompts.append(self.prompt(context, len(images[-1])))
        texts, records, new_tokens = [""] * len(requests), [], 0
        for with_images in (True, False):
            part = [i for i, found in enumerate(images) if bool(found) == with_images]
            if not part:
                continue
            part_texts, part_records, part_tokens = self._generate(
                [requests[i] for i in part], [prompts[i] for i in part], [images[i] for i in part], decoding
            )
            for i, text in zip(part, part_texts):
                texts[i] = text
            records += part_records
            new_tokens += part_tokens
        return texts, records, new_tokens

    def _generate(
        self, requests: list[Instance], prompts: list[str], images: list[list[Image.Image]], decoding: Decoding
    ) -> tuple[list[str], list[KeptRecord], int]:
        """Continuations, kept-token records (none for text-only requests) and generated tokens of one batch,
        whose requests either all have images or none has."""
        has_images = bool(images[0])
        inputs = loading.encode(self.processor, prompts, images if has_images else None).to(self.device)
        prompt_length = inputs["input_ids"].shape[1]
        kwargs = decoding.generate_kwargs(self.tokenizer, prompt_length)
        with torch.no_grad():
            if self.method is None or not has_images:
                output = self.model.generate(**inputs, **kwargs)
                stats = None
            else:
                with trim(
                    self.model, self.method, trim_scoring_layer=self.trim_scoring_layer, tokenizer=self.processor
                ) as handle:
                    output = self.model.generate(**inputs, **kwargs)
                stats = handle.stats
        generated = output[:, prompt_length:]
        texts = [
            cut_at_stop(text, decoding.until)
            for text in self.processor.batch_decode(generated, skip_special_tokens=True)
        ]
        new_tokens = int((generated != self.tokenizer.pad_token_id).sum())
        return texts, self._kept_records(requests, inputs, stats) if has_images else [], new_tokens

    def _kept_records(self, requests: list[Instance], inputs, stats) -> list[KeptRecord]:
        """Per request (rank-padding copies left out): non-padding image tokens (seen by some text row),
        kept and extra tokens."""
        if stats is None:
            stats = self.facts.untrimmed_stats(self.model, inputs)
        return [
            KeptRecord(**dataclasses.asdict(sample), task=request.task_name, doc_id=int(request.doc_id))
            for request, sample in zip(requests, stats.samples)
            if not _padding_only(request)
        ]

    def _report(self, records: list[KeptRecord], seconds: float, generated_tokens: int) -> None:
        """Gather every rank's records; rank 0 logs the kept-token summary, and writes `kept_log`."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            gathered: list = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, (records, seconds, generated_tokens))
            records = [record for rank_records, _, _ in gathered for record in rank_records]
            seconds = max(rank_seconds for _, rank_seconds, _ in gathered)
            generated_tokens = sum(rank_tokens for _, _, rank_tokens in gathered)
        if self.rank != 0:
            return
        self.kept_records += records
        summary = kept_summary(records) if records else {}
        if records:
            logger.info(
                f"trimllama: {self.method.label() if self.method else 'untrimmed'} kept "
                f"{summary['kept_fraction']:.4f} of the image tokens on average "
                f"({summary['kept_tokens']:.1f} of {summary['image_tokens']:.1f}) over {len(records)} requests"
            )
        log_metrics(
            total_elapsed_time=seconds,
            total_gen_tokens=generated_tokens,
            avg_speed=generated_tokens / seconds if seconds > 0 else 0.0,
            additional_metrics=summary,
        )
        if self.kept_log is not None:
            self.kept_log.parent.mkdir(parents=True, exist_ok=True)
            with self.kept_log.open("a") as file:
                for record in records:
                    file.write(json.dumps(dict(dataclasses.asdict(record), kept_fraction=record.kept_fraction)) + "\n")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"trimllama: {name} must be a positive integer, got {value!r}")
    return int(value)


def _padding_only(request: Instance) -> bool:
    """lmms-eval pads ranks to equal request counts with copies; they are not counted."""
    return bool((request.metadata or {}).get("__padding_only__"))
