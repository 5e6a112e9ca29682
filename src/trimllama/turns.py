"""Where the last user message starts: the turn marker of a chat template, as token ids.

`user_turn_opener(tokenizer)` renders a short probe conversation with the tokenizer's (or processor's) own chat
template and reads off the text that opens a user message after an assistant reply: for Llama 3
`<|start_header_id|>user<|end_header_id|>`, for the shipped testbed `<|begin_of_text|>question :`. Scoring methods
with `query_rows="last_turn"` score only the rows from its last occurrence on (`selection.last_turn_rows`).
"""

from __future__ import annotations

from .errors import InvalidSettingError

_PROBES = ("xfirstx", "xreplyx", "xsecondx")  # lower-case words no template rewrites


def user_turn_opener(tokenizer) -> tuple[int, ...]:
    """Token ids that open a user message in `tokenizer`'s chat template (a tokenizer or a processor).

    Raises:
        InvalidSettingError (setting `query_rows`): no chat template, or one without a recognisable user-turn marker.
    """
    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    template = getattr(tokenizer, "chat_template", None) or getattr(text_tokenizer, "chat_template", None)
    if not template:
        raise InvalidSettingError(
            "query_rows=last_turn needs a tokenizer with a chat template, to find where the last user message starts",
            setting="query_rows",
        )
    first, reply, second = _PROBES
    conversation = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": second},
    ]
    full = _render(text_tokenizer, template, conversation)
    one_reply = _render(text_tokenizer, template, conversation[:2])
    end_of_reply = one_reply[one_reply.find(reply) + len(reply) :]  # what closes an assistant message
    between = full[full.find(reply) + len(reply) : full.find(second)]
    opener = between[len(end_of_reply) :].strip() if between.startswith(end_of_reply) else ""
    ids = tuple(text_tokenizer.encode(opener, add_special_tokens=False)) if opener else ()
    if not ids:
        raise InvalidSettingError(
            "query_rows=last_turn: the chat template has no marker that opens a user message after an assistant "
            "reply, so the last turn cannot be found",
            setting="query_rows",
        )
    return ids


def _render(tokenizer, template: str, conversation: list[dict]) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)
    except (TemplateError, ValueError, TypeError) as error:  # a template that refuses plain-text turns
        raise InvalidSettingError(
            f"query_rows=last_turn: the chat template cannot render a two-turn conversation ({error})",
            setting="query_rows",
        ) from error
