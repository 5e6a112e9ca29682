"""Build the testbed's MllamaConfig, tokenizer and processor (no download needed).

The tokenizer is a real ``tokenizers`` WordLevel tokenizer over the task's vocabulary,
wrapped as ``PreTrainedTokenizerFast``; the image processor is the stock
``MllamaImageProcessor`` with 112-px tiles. ``save_processor(dir)`` writes everything
``AutoProcessor.from_pretrained(dir)`` needs.
"""

from __future__ import annotations

from pathlib import Path

from .data import COLOR_NAMES, PATCH_SIZE, SHAPES, TILE_SIZE

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
IMAGE = "<|image|>"
UNK = "<unk>"
SPECIAL_TOKENS = [
    BOS,  # 0
    EOS,  # 1
    PAD,  # 2
    IMAGE,  # 3
    "<|python_tag|>",  # 4 (MllamaProcessor looks it up)
    "<|start_header_id|>",  # 5
    "<|end_header_id|>",  # 6
    "<|eot_id|>",  # 7
    UNK,  # 8
]
BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = 0, 1, 2, 3

WORDS = [
    "question", "answer", ":", "?", ".", ",", "what", "which", "color", "colour", "shape",
    "is", "are", "the", "a", "one", "how", "many", "shapes", "there", "left", "right", "of",
    "above", "below", "in", "image", "this", "and", "yes", "no", "object", "objects",
    "user", "assistant",
    *COLOR_NAMES, *SHAPES,
    *[str(i) for i in range(10)],
]
VOCAB_SIZE = 96  # lm_head rows; >= len(SPECIAL_TOKENS) + len(WORDS)

# The prompt the model is trained on; build_prompt() in __init__ reproduces it.
PROMPT_TEMPLATE = IMAGE + BOS + "question : {question} answer :"

# A chat template that renders a user turn (image + text) exactly as PROMPT_TEMPLATE.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}"
    "<|begin_of_text|>question : {{ message['content'] | lower }}"
    "{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}<|image|>{%- endfor -%}"
    "<|begin_of_text|>question : "
    "{%- for c in message['content'] if c['type'] == 'text' %} {{ c['text'] | lower | trim }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    " answer : "
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for c in message['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
    "{%- endif -%}<|end_of_text|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %} answer :{%- endif -%}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for t in SPECIAL_TOKENS + WORDS:
        if t not in vocab:
            vocab[t] = len(vocab)
    assert len(vocab) <= VOCAB_SIZE, len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=256,
        extra_special_tokens={"image_token": IMAGE},
    )
    assert fast.convert_tokens_to_ids(IMAGE) == IMAGE_ID
    assert fast.pad_token_id == PAD_ID and fast.eos_token_id == EOS_ID and fast.bos_token_id == BOS_ID
    return fast


def make_image_processor():
    from transformers import MllamaImageProcessor

    return MllamaImageProcessor(
        size={"height": TILE_SIZE, "width": TILE_SIZE},
        max_image_tiles=4,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        do_pad=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
    )


def make_processor():
    from transformers import MllamaProcessor

    return MllamaProcessor(image_processor=make_image_processor(), tokenizer=make_tokenizer(),
                           chat_template=CHAT_TEMPLATE)


def make_config(
    vision_hidden: int = 96,
    vision_layers: int = 2,
    vision_global_layers: int = 1,
    text_hidden: int = 128,
    text_layers: int = 6,
    cross_attention_layers=(1, 3, 5),
):
    from transformers import MllamaConfig

    inter = [vision_layers - 1] if vision_layers > 1 else []  # one intermediate layer
    vision = dict(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_global_layers=vision_global_layers,
        attention_heads=4,
        image_size=TILE_SIZE,
        patch_size=PATCH_SIZE,
        max_num_tiles=4,
        intermediate_layers_indices=inter,
        vision_output_dim=vision_hidden * (1 + len(inter)),
        supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    )
    text = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=text_hidden * 4,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        cross_attention_layers=list(cross_attention_layers),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    cfg = MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID)
    return cfg


def new_model(config=None, gate_init: float = 1.0, qk_norm_init: float = 1.7, seed: int = 0):
    """A freshly initialised testbed model.

    Mllama's cross-attention gates start at 0, which stalls learning from scratch: they
    start at ``gate_init`` instead. The cross-attention q/k RMSNorm weights start at
    ``qk_norm_init``: with head_dim 16 and unit norm weights a logit can never exceed
    sqrt(16) = 4, too flat to single out 2-4 object patches among up to 788 image tokens,
    and the weights barely move from 1 during training (a first run with 1.0 learned only
    pooled colour statistics). 1.7 allows logits up to 1.7**2 * 4 = 11.6.
    """
    import torch
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    config = config or make_config()
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(gate_init)
                layer.cross_attn_mlp_gate.fill_(gate_init)
                layer.cross_attn.q_norm.weight.fill_(qk_norm_init)
                layer.cross_attn.k_norm.weight.fill_(qk_norm_init)
    return model


def set_generation_config(model) -> None:
    gc = model.generation_config
    gc.bos_token_id = BOS_ID
    gc.eos_token_id = EOS_ID
    gc.pad_token_id = PAD_ID
    gc.do_sample = False
    gc.max_new_tokens = 4


def save_all(model, processor, out_dir, dtype=None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_generation_config(model)
    if dtype is not None:
        import copy

        model = copy.deepcopy(model).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
