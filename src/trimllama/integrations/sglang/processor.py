"""SGLang's Mllama request processor, refusing a request whose images and `<|image|>` tokens disagree.

Registered with `SGLANG_EXTERNAL_MM_PROCESSOR_PACKAGE` (runs in SGLang's HTTP process, before the scheduler): a
prompt with more or fewer `<|image|>` tokens than images (an image with empty text, say) would otherwise reach the
scheduler, whose pad ids and scoring spans need one image token per image, and stop it for every request.
"""

from __future__ import annotations

from sglang.srt.multimodal.processors.mlama import MllamaImageProcessor

from .model import MllamaForConditionalGeneration


class CheckedMllamaImageProcessor(MllamaImageProcessor):
    """SGLang's Mllama processor; a request must hold exactly one `<|image|>` token per image (a ValueError, which
    SGLang answers with a 400 naming the problem)."""

    models = [MllamaForConditionalGeneration]

    async def process_mm_data_async(self, image_data, input_text, *args, **kwargs):
        images = len(image_data) if isinstance(image_data, (list, tuple)) else int(image_data is not None)
        if isinstance(input_text, str):
            tokens = input_text.count(self._processor.image_token)
        else:
            tokens = sum(1 for token in input_text or () if token == self._processor.image_token_id)
        if tokens != images:
            raise ValueError(
                f"the prompt has {tokens} <|image|> token(s) for {images} image(s): put one <|image|> token in the "
                "text where each image belongs (the chat template does this for image content parts)"
            )
        return await super().process_mm_data_async(image_data, input_text, *args, **kwargs)
