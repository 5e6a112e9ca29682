"""Where turns start: the turn markers of a chat template, as token ids.

Both markers are read off the tokenizer's (or processor's) own chat template by rendering a short probe
conversation:

- `user_turn_opener`: the text that opens a user message after an assistant reply: for Llama 3
  `<|start_header_id|>user<|end_header_id|>`, for the shipped testbed `<|begin_of_text|>question :`. Scoring methods
  with `query_rows="last_turn"` score only the rows from its last occurrence on (`selection.last_turn_rows`).
- `assistant_turn_opener`: the text that opens an assistant message after a user message: for Llama 3
  `<|start_header_id|>assistant<|end_header_id|>`, for the testbed `answer :`. Scoring methods with
  `query_rows="image_turn"` score only the rows of the user message that holds the image, which end where it
  occurs (`selection.image_turn_rows`).

`turn_markers` reads the markers a method's row rules need (`trim(..., tokenizer=...)` calls it).
"""

from __future__ import annotations

from .errors import InvalidSettingError

_PROBES = ("xfirstx", "xreplyx", "xsecondx")  # lower-case words no template rewrites


def user_turn_opener(tokenizer) -> tuple[int, ...]:
    """Token ids that open a user message in `tokenizer`'s chat template (a tokenizer or a processor).

    Raises:
        InvalidSettingError (setting `query_rows`): no chat template, or one without a recognisable user-turn marker.
    """
    first, reply, second = _PROBES
    conversation = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": second},
    ]
    return _opener(tokenizer, conversation, "last_turn", "a user message after an assistant reply")


def assistant_turn_opener(tokenizer) -> tuple[int, ...]:
    """Token ids that open an assistant message in `tokenizer`'s chat template (a tokenizer or a processor).

    Raises:
        InvalidSettingError (setting `query_rows`): no chat template, or one without a recognisable
        assistant-turn marker.
    """
    first, reply, _ = _PROBES
    conversation = [{"role": "user", "content": first}, {"role": "assistant", "content": reply}]
    return _opener(tokenizer, conversation, "image_turn", "an assistant message after a user message")


def _opener(tokenizer, conversation: list[dict], rule: str, opens: str) -> tuple[int, ...]:
    """The token ids of what opens the last message of `conversation` (whose earlier message is closed by what the
    template writes after it when it ends the conversation), for the `query_rows` value `rule`."""
    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    template = getattr(tokenizer, "chat_template", None) or getattr(text_tokenizer, "chat_template", None)
    if not template:
        raise InvalidSettingError(
            f"query_rows={rule} needs a tokenizer with a chat template, to find where a message starts",
            setting="query_rows",
        )
    earlier, last = conversation[-2]["content"], conversation[-1]["content"]
    full = _render(text_tokenizer, template, conversation, rule)
    ends_with_earlier = _render(text_tokenizer, template, conversation[:-1], rule)
    closing = ends_with_earlier[ends_with_earlier.find(earlier) + len(earlier) :]  # what closes the earlier message
    between = full[full.find(earlier) + len(earlier) : full.find(last)]
    opener = between[len(closing) :].strip() if between.startswith(closing) else ""
    ids = tuple(text_tokenizer.encode(opener, add_special_tokens=False)) if opener else ()
    if not ids:
        raise InvalidSettingError(
            f"query_rows={rule}: the chat template has no marker that opens {opens}, so the turns cannot be found",
            setting="query_rows",
        )
    return ids


def _render(tokenizer, template: str, conversation: list[dict], rule: str) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)
    except (TemplateError, ValueError, TypeError) as error:  # a template that refuses plain-text turns
        raise InvalidSettingError(
            f"query_rows={rule}: the chat template cannot render a plain-text conversation ({error})",
            setting="query_rows",
        ) from error


MARKER_READERS = {"last_turn": user_turn_opener, "image_turn": assistant_turn_opener}  # the marker each row rule reads


def turn_markers(tokenizer, rules: set[str]) -> dict[str, tuple[int, ...]]:
    """The chat template's markers that the `query_rows` values `rules` read, keyed by rule ("all" reads none).

    Raises:
        InvalidSettingError (setting `query_rows`): a marker the template does not have.
    """
    return {rule: read(tokenizer) for rule, read in MARKER_READERS.items() if rule in rules}
