"""A tiny LLaVA model and processor for the eval tests, built from config with no download.

Word-level tokenizer (tokenizers library) over a small vocabulary plus the words of the
prompts in data.prompts, "<image>" as a special token, a CLIP image processor and a
LlavaProcessor whose image-token count matches the CLIP tower (num_additional_image_tokens=1
for the CLS token that the 'default' feature strategy drops).
"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from data.chat_template import ASSISTANT_ROLE, LLAVA15_CHAT_TEMPLATE, USER_ROLE
from data.prompts import CAPTION_PROMPT, IMAGE_TOKEN, SHORT_ANSWER_POSTPROMPT

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
WORDS = ("a the an red blue green yellow big small square circle triangle star is on in left right of "
         "above below next to and two three one yes no what color shape how many are there picture")
IMAGE_SIZE = 32
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
_PATTERN = r"\w+|[^\w\s]"


def tiny_processor() -> LlavaProcessor:
    words = set(re.findall(_PATTERN, WORDS.lower()))
    for text in (CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT, USER_ROLE, ASSISTANT_ROLE):
        words.update(re.findall(_PATTERN, text.lower()))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_PATTERN), behavior="isolated")]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, model_max_length=4096,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA15_CHAT_TEMPLATE)


def tiny_llava(processor: LlavaProcessor, seed: int = 0, max_position: int = 256) -> LlavaForConditionalGeneration:
    tok = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_position,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=NUM_IMAGE_TOKENS, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval()


def tiny_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Random RGB images of varied sizes (the processor resizes them)."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 48), (32, 32), (50, 36)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(n)]
