"""Accuracy against kept tokens: every method at a list of settings, per question type, on the testbed.

An *arm* is one (method, setting) point of a curve. Two references are always evaluated beside the
methods: `untrimmed`, and the `floor`, where the later cross-attention layers get no image token at all
(the first layer is never trimmed and may answer easy questions alone).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..handle import trim
from ..loading import encode
from ..methods import METHODS, Floor, MergeRemainder, RandomSelect, SelectionMethod, method_from_settings

UNTRIMMED, FLOOR = "untrimmed", "floor"


@dataclass
class Arm:
    """One point of one curve: `method` None means the untrimmed model."""

    curve: str
    parameter: float | int | None
    method: SelectionMethod | None


@dataclass
class ArmResult:
    """Accuracy of one arm on a question set (accuracy per type keyed by question type).

    `kept_by_type` / `kept_by_tiles`: the mean kept fraction per question type and per number of tiles of the
    image, which shows whether the union adapts its size to the task at a fixed per-head k (the paper's claim).
    """

    curve: str
    method: str
    parameter: float | int | None
    kept_fraction: float
    extra_tokens: float
    accuracy: float
    per_type: dict[str, float]
    questions: int
    kept_by_type: dict[str, float] = field(default_factory=dict)
    kept_by_tiles: dict[str, float] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list, repr=False)


SWEPT_BY_DEFAULT = "head_k"  # HeadwiseTopK's per-head k, the `ratio` of the ratio methods (`build_method`)


def build_arms(
    methods: Sequence[str],
    settings: Sequence[float | int],
    merge_remainder: bool = False,
    matched_random: bool = True,
    least_attended: bool = False,
    params: Mapping[str, object] | None = None,
) -> list[Arm]:
    """References first, then each method at each setting, built by `method_from_settings` as in every front-end.

    Args:
        methods: registered method names, each `NAME` (sweeps `head_k`: HeadwiseTopK's per-head k, the `ratio` of
            random, uniform_stride, ...) or `NAME:SETTING` (sweeps that setting, e.g. `attention_mass:mass`).
        settings: the swept values (a fraction, or a count if an int). Each point is plotted at the kept fraction
            it measures.
        merge_remainder: also a `MergeRemainder` arm next to every method arm.
        matched_random: next to every headwise_topk arm, a random arm keeping the same per-sample counts.
        least_attended: next to every headwise_topk arm, the same per-head k of each head's *least* attended
            tokens (`order="least"`), the paper's feature-order control: it should fall to random or below.
        params: settings every method arm gets (e.g. `query_rows="image_turn"`), as `--param` gives them.

    Raises:
        TrimllamaError: a method or setting `method_from_settings` refuses (a reference such as floor, which takes
            no setting, is not a curve); ValueError: a swept setting also in `params`, or a wrapper as a curve.
    """
    params = dict(params or {})
    arms = [Arm(UNTRIMMED, None, None), Arm(FLOOR, None, Floor())]
    for spec in methods:
        name, _, swept = spec.partition(":")
        swept = swept or SWEPT_BY_DEFAULT
        if swept in params or (least_attended and "order" in params):
            raise ValueError(f"{swept if swept in params else 'order'} is set by the sweep; it is not also a --param")
        if METHODS.get(name) is MergeRemainder:
            raise ValueError("merge_remainder is a wrapper, not a curve: give --merge-remainder")
        for setting in settings:
            method = method_from_settings(name, {**params, swept: setting})
            if method is None:
                raise ValueError("none is the untrimmed reference, evaluated in every run; it is not a curve")
            arms.append(Arm(method.name, setting, method))
            if merge_remainder:
                arms.append(Arm(f"{method.name} + remainder", setting, MergeRemainder(method)))
            if matched_random and method.name == "headwise_topk":
                arms.append(Arm("random (count-matched)", setting, RandomSelect(like=method)))
                if merge_remainder:
                    arms.append(Arm("random (count-matched) + remainder", setting, MergeRemainder(RandomSelect(like=method))))
            if least_attended and method.name == "headwise_topk":
                least = method_from_settings(name, {**params, swept: setting, "order": "least"})
                arms.append(Arm(f"{method.name} (least attended)", setting, least))
                if matched_random:  # the union of least attended sets is larger: compare at its own counts too
                    arms.append(Arm("random (matched to least attended)", setting, RandomSelect(like=least)))
    return arms


def encode_questions(
    processor, questions: Sequence, prompt: Callable[[object, str], str], batch_size: int = 32, shuffle_images: bool = False
) -> list[dict]:
    """Processor outputs (pixel_values, input_ids, masks) of `questions` in batches of `batch_size`.

    Encoding is deterministic, so a sweep encodes once and reuses the batches for every arm.
    With `shuffle_images`, every batch's images are permuted (a control: answers must then be at chance).
    """
    shuffler = random.Random(0)
    batches = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        images = [[q.image] for q in chunk]
        if shuffle_images:
            shuffler.shuffle(images)
        batches.append(encode(processor, [prompt(processor, q.question) for q in chunk], images))
    return batches


@torch.no_grad()
def answer_questions(
    model,
    processor,
    questions: Sequence,
    method: SelectionMethod | None,
    prompt: Callable[[object, str], str],
    batch_size: int = 32,
    max_new_tokens: int = 4,
    shuffle_images: bool = False,
    progress: Callable[[int], None] | None = None,
    batches: list[dict] | None = None,
) -> tuple[list[str], list[float], list[int]]:
    """Greedy answers, kept fraction and extra tokens per question.

    `batches` (from `encode_questions` with the same questions, prompt, batch size and shuffling) skips
    the encoding; otherwise the questions are encoded here.
    """
    if batches is None:
        batches = encode_questions(processor, questions, prompt, batch_size, shuffle_images)
    answers, kept_fractions, extra_tokens = [], [], []
    device = next(model.parameters()).device
    for encoded in batches:
        inputs = encoded.to(device)
        size = inputs["input_ids"].shape[0]
        if method is None:
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            kept_fractions += [1.0] * size
            extra_tokens += [0] * size
        else:
            with trim(model, method, tokenizer=processor) as handle:  # the chat template's markers, for query_rows
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            kept_fractions += handle.stats.kept_fraction
            extra_tokens += handle.stats.extra_tokens
        answers += processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        if progress is not None:
            progress(size)
    if len(answers) != len(questions):
        raise ValueError(f"{len(answers)} answers for {len(questions)} questions: the batches encode other questions")
    return answers, kept_fractions, extra_tokens


def score(
    arm: Arm, questions: Sequence, answers: list[str], kept: list[float], extra: list[int], matches: Callable
) -> ArmResult:
    """Accuracy overall and per question type for one arm's answers."""
    correct = [matches(answer, q.answer) for answer, q in zip(answers, questions)]
    per_type: dict[str, list[bool]] = {}
    for ok, q in zip(correct, questions):
        per_type.setdefault(q.qtype, []).append(ok)
    return ArmResult(
        curve=arm.curve,
        method=UNTRIMMED if arm.method is None else arm.method.label(),
        parameter=arm.parameter,
        kept_fraction=0.0 if isinstance(arm.method, Floor) else sum(kept) / len(kept),
        extra_tokens=sum(extra) / len(extra),
        accuracy=sum(correct) / len(correct),
        per_type={qtype: sum(oks) / len(oks) for qtype, oks in sorted(per_type.items())},
        questions=len(questions),
        kept_by_type=_mean_by(kept, [q.qtype for q in questions]),
        kept_by_tiles=_mean_by(kept, [str(q.num_tiles) for q in questions]),
        answers=answers,
    )


def _mean_by(values: Sequence[float], keys: Sequence[str]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for value, key in zip(values, keys):
        groups.setdefault(key, []).append(value)
    return {key: sum(group) / len(group) for key, group in sorted(groups.items())}


def uninformative_types(results: Sequence[ArmResult], margin: float = 0.2) -> list[str]:
    """Question types whose floor is within `margin` of untrimmed: they cannot tell methods apart."""
    untrimmed = next(r for r in results if r.curve == UNTRIMMED)
    floor = next(r for r in results if r.curve == FLOOR)
    return [qtype for qtype, accuracy in untrimmed.per_type.items() if accuracy - floor.per_type[qtype] < margin]


def write_json(results: Sequence[ArmResult], path: Path, meta: dict) -> None:
    """Results without the raw answers, plus `meta` (model, questions, seed, ...)."""
    records = [{k: v for k, v in dataclasses.asdict(r).items() if k != "answers"} for r in results]
    payload = dict(meta, results=records, floor_close_types=uninformative_types(results))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def plot(results: Sequence[ArmResult], path: Path, title: str = "") -> None:
    """Accuracy against mean kept fraction: one panel per question type (and overall), one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["overall", *results[0].per_type]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    curves: dict[str, list[ArmResult]] = {}
    for result in results:
        curves.setdefault(result.curve, []).append(result)
    bases = sorted({curve.replace(" + remainder", "") for curve in curves} - {UNTRIMMED, FLOOR})
    colour = {base: plt.get_cmap("tab10")(index % 10) for index, base in enumerate(bases)}
    for axis, panel in zip(axes.flat, panels):
        value = (lambda r: r.accuracy) if panel == "overall" else (lambda r, p=panel: r.per_type[p])
        for curve, points in curves.items():
            if curve in (UNTRIMMED, FLOOR):
                style = dict(color="black", linestyle="--" if curve == UNTRIMMED else ":", linewidth=1.2)
                axis.axhline(value(points[0]), label=curve, **style)
                continue
            points = sorted(points, key=lambda r: r.kept_fraction)
            axis.plot(
                [r.kept_fraction for r in points],
                [value(r) for r in points],
                marker="o",
                markersize=3,
                linestyle="--" if curve.endswith(" + remainder") else "-",
                color=colour[curve.replace(" + remainder", "")],
                label=curve,
            )
        axis.set_title(panel)
        axis.set_xlabel("mean kept fraction of image tokens")
        axis.set_ylabel("accuracy")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) // 5), 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
