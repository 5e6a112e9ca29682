"""The contract between selection methods and model adapters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from ..errors import InvalidSettingError


@dataclass
class ImageTokens:
    """Everything a selection method may look at for one prefill of one batch.

    The adapter fills it in; the attention scores are computed only if a method asks for them.

    Attributes:
        features: (batch, image_tokens, hidden) projected image features, the `cross_attention_states`.
        valid: (batch, image_tokens) bool, tokens of real tiles that some text row sees.
            Padding tiles, absent images and tiles no row attends to are False. Never keep them.
        layout: (images, tiles, patches) of the flattened image-token axis; patch 0 of a tile is its class token.
        attention: callable `(reduce, query_rows) -> (batch, heads, image_tokens)`, the scoring layer's per-head
            attention of the text rows that see an image, aggregated over rows with `reduce` ("sum" or "max");
            `query_rows` (`AttentionScored.query_rows`) says which rows score.
        last_row_attention: callable `() -> (batch, heads, image_tokens)`, attention of each sample's last
            text row that sees an image.
    """

    features: torch.Tensor
    valid: torch.Tensor
    layout: tuple[int, int, int]
    attention: Callable[[str, str], torch.Tensor]
    last_row_attention: Callable[[], torch.Tensor]
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def num_valid(self) -> torch.Tensor:
        """(batch,) long, valid tokens per sample."""
        return self.valid.sum(dim=-1)

    def head_attention(self, reduce: str = "sum", query_rows: str = "all") -> torch.Tensor:
        """(batch, heads, image_tokens) float32, computed once per reduction and row set."""
        if (reduce, query_rows) not in self._cache:
            self._cache[reduce, query_rows] = self.attention(reduce, query_rows)
        return self._cache[reduce, query_rows]

    def last_row(self) -> torch.Tensor:
        """(batch, heads, image_tokens) float32."""
        if "last" not in self._cache:
            self._cache["last"] = self.last_row_attention()
        return self._cache["last"]

    def tiled(self, tensor: torch.Tensor) -> torch.Tensor:
        """View a (batch, image_tokens, ...) tensor as (batch, images * tiles, patches, ...)."""
        images, tiles, patches = self.layout
        return tensor.reshape(tensor.shape[0], images * tiles, patches, *tensor.shape[2:])


@dataclass
class ExtraTokens:
    """Tokens a method adds after the kept ones for the later cross-attention layers.

    Attributes:
        features: (batch, extra, hidden) features to project like image tokens.
        bias: (batch, extra) float added to the column's attention logit; -inf disables the column.
        source: (batch, extra) long, an image-token index whose mask column says which text rows
            may see this extra column (e.g. the first token of the tile it stands for).
    """

    features: torch.Tensor
    bias: torch.Tensor
    source: torch.Tensor


@dataclass
class SelectionMethod:
    """Base of every selection method: a small dataclass with a `select` rule.

    Subclasses set `name` (the registry key) and `description` (one line for `trimllama methods`),
    validate their settings in `__post_init__`, and implement `select`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __post_init__(self) -> None:
        """Validate the settings; subclasses extend it (and call `super().__post_init__()`)."""

    def select(self, tokens: ImageTokens) -> torch.Tensor:
        """Return the (batch, image_tokens) bool keep-mask for this prefill."""
        raise NotImplementedError

    def extra_tokens(self, tokens: ImageTokens, keep: torch.Tensor) -> ExtraTokens | None:
        """Extra tokens for the later layers; none by default (see `MergeRemainder`)."""
        return None

    @property
    def parameters(self) -> dict:
        """The method's settings, as given to its constructor."""
        return {f.name: getattr(self, f.name) for f in setting_fields(self)}

    def label(self) -> str:
        """Short human-readable label, e.g. `headwise_topk(head_k=0.25)`."""
        settings = ", ".join(f"{key}={value}" for key, value in self.parameters.items() if value is not None)
        return f"{self.name}({settings})"


def setting_fields(method: SelectionMethod | type[SelectionMethod]) -> list[dataclasses.Field]:
    """The settings of a method (class or instance) in the order its constructor takes them: keyword-only ones last."""
    return sorted(dataclasses.fields(method), key=lambda f: f.kw_only)


@dataclass
class RatioMethod(SelectionMethod):
    """A method that keeps `ratio` of each sample's non-padding tokens (a fraction, or an int count)."""

    ratio: int | float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count_or_fraction("ratio", self.ratio)


def check_count_or_fraction(name: str, value: int | float, allow_zero: bool = False) -> None:
    """Validate a setting given as an int count (>= 1) or a float fraction in (0, 1]."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSettingError(f"{name} must be an int count or a float fraction, got {value!r}")
    if isinstance(value, float):
        if not (0.0 < value <= 1.0 or (allow_zero and value == 0.0)):
            raise InvalidSettingError(f"{name}={value} is out of range: a fraction must lie in (0, 1]")
    elif value < low:
        raise InvalidSettingError(f"{name}={value} is out of range: a token count must be >= {low}")


# which text rows score: every row that sees an image, the last user message's, or the image's own user message's
QUERY_ROWS = ("all", "last_turn", "image_turn")


@dataclass
class AttentionScored(SelectionMethod):
    """Base of the methods that rank by the scoring layer's attention: which text rows score.

    Attributes:
        query_rows: "all" (every row that sees an image, the paper's rule), "last_turn" (only the last user
            message and what follows it) or "image_turn" (only the rows of the user message that holds each row's
            latest image, so later turns of a conversation never change the kept set). "last_turn" and
            "image_turn" read the chat template's turn markers: they need `trim(..., tokenizer=...)`.
    """

    query_rows: str = field(default="all", kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query_rows not in QUERY_ROWS:
            raise InvalidSettingError(
                f"query_rows must be one of {', '.join(QUERY_ROWS)}, got {self.query_rows!r}", setting="query_rows"
            )


def nested_methods(method: SelectionMethod | None) -> list[SelectionMethod]:
    """`method` and the methods it wraps (MergeRemainder's `method`, RandomSelect's `like`); [] for None."""
    found = []
    while isinstance(method, SelectionMethod):
        found.append(method)
        method = getattr(method, "method", None) or getattr(method, "like", None)
    return found


def query_rows_of(method: SelectionMethod | None) -> set[str]:
    """The `query_rows` values of `method` and of the methods it wraps."""
    return {inner.query_rows for inner in nested_methods(method) if isinstance(inner, AttentionScored)}


def check_budget(budget: int | None) -> None:
    """Validate a fixed per-sample token budget."""
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise InvalidSettingError(f"budget must be an int number of tokens, got {budget!r}")
    if budget < 1:
        raise InvalidSettingError(f"budget={budget} is out of range: it must be >= 1 token per sample")


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def check_seed(name: str, seed: int) -> None:
    """Validate a seed for `torch.Generator.manual_seed`: an int in SEED_RANGE."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidSettingError(f"{name} must be an int, got {seed!r}")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise InvalidSettingError(f"{name}={seed} is out of range: a seed must lie in [-2**63, 2**64 - 1]")


def budget_counts(budget: int, tokens: ImageTokens) -> torch.Tensor:
    """(batch,) long counts for a fixed budget: `budget`, or all non-padding tokens of a smaller sample."""
    available = tokens.num_valid
    return torch.minimum(torch.full_like(available, budget), available)
