"""Follow-up questions: second-turn accuracy of two-turn conversations on the testbed.

Each conversation asks about one object, then about another object of the same image (`make_conversations`).
The second turn is a re-prefill of the whole conversation (what `generate` and every stateless server do),
with the model's own first answer in it. An arm trims both turns with its method, except:

- `reused kept set`: the first turn selects (HeadwiseTopK, all rows) and the second turn keeps exactly the
  first turn's kept tokens: what a reused, already-trimmed prefix cache (e.g. a radix cache) would give.
- `image turn` (`query_rows="image_turn"`): only the rows of the user message that holds the image score, so the
  second turn keeps what the first kept, chosen without the generation prompt: the rule an engine's prefix cache
  can reuse.
- `untrimmed` and `floor` (later cross-attention layers see no image token) are the references.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..handle import trim
from ..loading import chat_text, encode
from ..methods import (
    Floor,
    ImageTokens,
    MergeRemainder,
    RandomSelect,
    SelectionMethod,
    method_from_settings,
)
from .evaluate import FLOOR, UNTRIMMED

REUSED = "reused kept set"


@dataclass
class FixedKeep(SelectionMethod):
    """Keep a given set of tokens, whatever the question (the reused-prefix case).

    Args:
        keep: (batch, image_tokens) bool, the kept set to apply to the next prefill of the same images.
    """

    name = "fixed_keep"
    description = "harness only: a kept set chosen on an earlier prefill"

    keep: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        return self.keep.to(tokens.valid.device) & tokens.valid

    def label(self) -> str:
        return f"{self.name}(kept on the first turn)"


@dataclass
class ConversationArm:
    """One arm: `method` trims both turns (None: untrimmed); `reuse`: the second turn keeps the first turn's set."""

    curve: str
    parameter: float | int | None
    method: SelectionMethod | None
    reuse: bool = False


@dataclass
class ConversationResult:
    """First- and second-turn accuracy of one arm; second-turn accuracy and kept fraction per type."""

    curve: str
    method: str
    parameter: float | int | None
    kept_fraction: float
    first_turn_accuracy: float
    accuracy: float
    per_type: dict[str, float]
    conversations: int
    answers: list[str] = field(default_factory=list, repr=False)


ROW_RULES = {"all rows": "all", "last turn": "last_turn", "image turn": "image_turn"}  # curve name -> query_rows


def build_conversation_arms(
    settings: Sequence[float | int],
    remainder: bool = True,
    matched_random: bool = True,
    params: Mapping[str, object] | None = None,
) -> list[ConversationArm]:
    """References, then at each head_k: HeadwiseTopK with each `query_rows` (all rows, the last turn, the image's
    turn), the reused first-turn set, the remainder variants and random matched to the all-rows counts.

    params: settings every HeadwiseTopK arm gets (`method_from_settings`); not head_k or query_rows, which the arms set.
    """
    params = dict(params or {})
    for key in ("head_k", "query_rows"):
        if key in params:
            raise ValueError(f"{key} is set by the conversation arms; it is not also a --param")
    arms = [ConversationArm(UNTRIMMED, None, None), ConversationArm(FLOOR, None, Floor())]
    for setting in settings:
        by_rows = {
            curve: method_from_settings("headwise_topk", {**params, "head_k": setting, "query_rows": rows})
            for curve, rows in ROW_RULES.items()
        }
        arms += [ConversationArm(f"headwise_topk ({curve})", setting, method) for curve, method in by_rows.items()]
        arms.append(ConversationArm(REUSED, setting, by_rows["all rows"], reuse=True))
        if remainder:
            arms += [
                ConversationArm(f"headwise_topk ({curve}) + remainder", setting, MergeRemainder(method))
                for curve, method in by_rows.items()
            ]
        if matched_random:
            arms.append(ConversationArm("random (count-matched)", setting, RandomSelect(like=by_rows["all rows"])))
    return arms


def first_messages(question) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.question}]}]


def second_messages(conversation, first_answer: str) -> list[dict]:
    return [
        *first_messages(conversation.first),
        {"role": "assistant", "content": first_answer.strip()},
        {"role": "user", "content": conversation.second.question},
    ]


@torch.no_grad()
def _generate(model, processor, images, texts, method, keep=None, max_new_tokens: int = 4):
    """Greedy answers, kept fractions and the (batch, image_tokens) kept mask of one batch."""
    inputs = encode(processor, texts, images).to(next(model.parameters()).device)
    if keep is not None:
        method = FixedKeep(keep=keep)
    if method is None:
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        kept, mask = [1.0] * len(texts), None
    else:
        with trim(model, method, tokenizer=processor) as handle:
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        kept = handle.stats.kept_fraction
        mask = torch.zeros(len(texts), handle.stats.image_tokens_before[0], dtype=torch.bool)
        for sample, indices in enumerate(handle.kept):
            mask[sample, indices] = True
    answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers, kept, mask


def run_arm(
    model, processor, conversations: Sequence, arm: ConversationArm, matches: Callable, batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> ConversationResult:
    """Both turns of every conversation under one arm, scored."""
    first_answers, second_answers, kept = [], [], []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        images = [[c.first.image] for c in chunk]
        texts = [chat_text(processor, first_messages(c.first)) for c in chunk]
        answers, _, keep = _generate(model, processor, images, texts, arm.method)
        texts = [chat_text(processor, second_messages(c, answer)) for c, answer in zip(chunk, answers)]
        follow_ups, kept_fractions, _ = _generate(
            model, processor, images, texts, None if arm.reuse else arm.method, keep if arm.reuse else None
        )
        first_answers += answers
        second_answers += follow_ups
        kept += kept_fractions
        if progress is not None:
            progress(len(chunk))
    first_correct = [matches(a, c.first.answer) for a, c in zip(first_answers, conversations)]
    per_type: dict[str, list[bool]] = {}
    for answer, c in zip(second_answers, conversations):
        per_type.setdefault(c.qtype, []).append(matches(answer, c.second.answer))
    correct = [ok for oks in per_type.values() for ok in oks]
    method = arm.method.label() if arm.method is not None else UNTRIMMED
    return ConversationResult(
        curve=arm.curve,
        method=f"{REUSED}: {method}" if arm.reuse else method,
        parameter=arm.parameter,
        kept_fraction=0.0 if isinstance(arm.method, Floor) else sum(kept) / len(kept),
        first_turn_accuracy=sum(first_correct) / len(first_correct),
        accuracy=sum(correct) / len(correct),
        per_type={qtype: sum(oks) / len(oks) for qtype, oks in sorted(per_type.items())},
        conversations=len(conversations),
        answers=second_answers,
    )


def write_json(results: Sequence[ConversationResult], path: Path, meta: dict) -> None:
    records = [{k: v for k, v in dataclasses.asdict(r).items() if k != "answers"} for r in results]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta, results=records), indent=2))


def plot(results: Sequence[ConversationResult], path: Path, title: str = "") -> None:
    """Grouped bars: second-turn accuracy per type (and overall) for every arm, one panel per head_k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r.parameter for r in results if r.parameter is not None})
    references = [r for r in results if r.parameter is None]
    types = ["overall", *results[0].per_type]
    figure, axes = plt.subplots(1, len(settings), figsize=(7.5 * len(settings), 5.4), squeeze=False)
    for axis, setting in zip(axes.flat, settings):
        arms = references + [r for r in results if r.parameter == setting]
        width = 0.85 / len(arms)
        for index, r in enumerate(arms):
            values = [r.accuracy if t == "overall" else r.per_type[t] for t in types]
            label = r.curve if r.parameter is None else f"{r.curve} ({r.kept_fraction:.0%} kept)"
            axis.bar([x + index * width for x in range(len(types))], values, width, label=label,
                     color=plt.get_cmap("tab10")(index % 10))
        axis.set_xticks([x + 0.85 / 2 - width / 2 for x in range(len(types))], types)
        axis.set_ylim(0, 1.02)
        axis.set_ylabel("second-turn accuracy")
        axis.set_title(f"head_k {setting}")
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
