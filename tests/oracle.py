"""Independent references for the trimmed model, written without the library's gathering code.

The masking oracle: dropping a token from a cross-attention layer equals giving it -inf attention
logits in that layer. `masked_later_layers` runs the *untrimmed* model with the dropped columns
masked in every cross-attention layer but the first.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def masked_layers(
    model,
    keep: torch.Tensor,
    extra_features=None,
    extra_bias=None,
    extra_source=None,
    layers=None,
    decode_only=False,
    prefill_rows=None,
):
    """Untrimmed model; the given cross-attention layers (default: all but the first) mask the columns
    where `keep` (batch, image_tokens) is False.

    A row left with no visible column attends to nothing: its attention output is set to 0 (the limit
    of -inf logits everywhere; a finite mask would spread it uniformly instead).
    With `extra_*` (batch, extra[, hidden]) the layers also get extra feature columns appended, whose
    logit bias is `extra_bias` in the rows that see the column `extra_source` and -inf elsewhere.
    `decode_only` leaves prefill forwards (those with image features) alone; `prefill_rows` (batch, text_len) bool
    masks only those rows of a prefill forward (decode forwards mask every row).
    """
    text_model = model.model.language_model
    if layers is None:
        layers = sorted(text_model.cross_attention_layers)[1:]

    def before_layer(module, args, kwargs):
        if decode_only and kwargs["cross_attention_states"] is not None:
            return None
        mask = kwargs["cross_attention_mask"]  # (batch, 1, text_len, image_tokens)
        row_visible = kwargs["full_text_row_masked_out_mask"]  # (batch, 1, text_len, 1)
        lowest = torch.finfo(mask.dtype).min
        dropped = ~keep[:, None, None, :]
        if prefill_rows is not None and kwargs["cross_attention_states"] is not None:
            dropped = dropped & prefill_rows[:, None, :, None]
        new_mask = mask.masked_fill(dropped, lowest)
        if extra_features is not None:
            source_mask = torch.stack([mask[b, :, :, extra_source[b]] for b in range(mask.shape[0])])
            visible = (source_mask == 0) & (row_visible > 0)
            bias = extra_bias[:, None, None, :].to(mask.dtype)
            extra_columns = torch.where(visible & torch.isfinite(bias), bias, torch.full_like(source_mask, lowest))
            new_mask = torch.cat([new_mask, extra_columns], dim=-1)
            states = kwargs["cross_attention_states"]
            if states is not None:
                states = states.reshape(mask.shape[0], -1, states.shape[-1])
                kwargs["cross_attention_states"] = torch.cat([states, extra_features.to(states.dtype)], dim=1)
        kwargs["cross_attention_mask"] = new_mask
        return args, kwargs

    def after_attention(module, args, kwargs, output):
        attention_mask = kwargs["attention_mask"]
        blind = (attention_mask == torch.finfo(attention_mask.dtype).min).all(dim=-1)  # (batch, 1, text_len)
        return (output[0].masked_fill(blind.transpose(1, 2), 0), *output[1:])

    handles = []
    for index in layers:
        layer = text_model.layers[index]
        handles.append(layer.register_forward_pre_hook(before_layer, with_kwargs=True))
        handles.append(layer.cross_attn.register_forward_hook(after_attention, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def rows_after_their_image_turn(input_ids: torch.Tensor, image_token_id: int, assistant_opener, sees_image) -> torch.Tensor:
    """(batch, text_len) bool: rows that see an image and lie after the user message of their latest image token
    (an assistant opener started after it), walked token by token. sees_image: (batch, text_len) bool."""
    opener = list(assistant_opener)
    late = torch.zeros(input_ids.shape, dtype=torch.bool)
    for sample, ids in enumerate(input_ids.tolist()):
        seen_image = in_image_message = False
        for position, token in enumerate(ids):
            if token == image_token_id:
                seen_image = in_image_message = True
            elif ids[position : position + len(opener)] == opener:
                in_image_message = False
            late[sample, position] = seen_image and not in_image_message and bool(sees_image[sample, position])
    return late


def keep_mask_from_indices(kept: list[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """(batch, image_tokens) bool from `handle.kept`."""
    keep = torch.zeros(len(kept), num_tokens, dtype=torch.bool)
    for sample, indices in enumerate(kept):
        keep[sample, indices] = True
    return keep


def extend_for_generated(batch: dict, sequences: torch.Tensor) -> dict:
    """Inputs for one teacher-forced forward over prompt + generated tokens (as generate extends them)."""
    extra = sequences.shape[1] - batch["input_ids"].shape[1]
    full = dict(batch)
    full["input_ids"] = sequences
    full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(sequences[:, -extra:])], dim=1)
    last_row = batch["cross_attention_mask"][:, -1:]
    full["cross_attention_mask"] = torch.cat([batch["cross_attention_mask"], last_row.repeat(1, extra, 1, 1)], dim=1)
    return full


def generated_step_logits(model, batch: dict, max_new_tokens: int):
    """(sequences, (batch, steps, vocab) logits of every generated step), greedy."""
    output = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return output.sequences, torch.stack(output.logits, dim=1)


def teacher_forced_logits(model, batch: dict, sequences: torch.Tensor) -> torch.Tensor:
    """(batch, steps, vocab) logits predicting each generated token, from one forward pass."""
    prompt_len = batch["input_ids"].shape[1]
    full = extend_for_generated(batch, sequences[:, :-1])
    logits = model(**full, use_cache=False).logits
    return logits[:, prompt_len - 1 :]
