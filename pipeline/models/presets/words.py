"""The tiny preset's processor, built offline from a vocabulary.

A word-level `PreTrainedTokenizerFast` (lower-cased, words and single punctuation marks),
LLaVA's `<image>` token and the llava-hf chat template ("USER: <image>\\n... ASSISTANT:"),
a `CLIPImageProcessor` and a `LlavaProcessor`. Everything round-trips through
`save_pretrained` / `from_pretrained`.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

from data.chat_template import ASSISTANT_ROLE, LLAVA15_CHAT_TEMPLATE, USER_ROLE
from data.prompts import IMAGE_TOKEN

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE_TOKEN]
WORD_PATTERN = r"\w+|[^\w\s]"

# Words the conversation format itself needs, whatever the data's vocabulary.
_FORMAT_TEXTS = [USER_ROLE, ASSISTANT_ROLE, ":"]


def _split_words(text: str) -> list[str]:
    import re

    return re.findall(WORD_PATTERN, text.lower())


def build_word_tokenizer(vocabulary: Iterable[str], extra_texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocabulary` plus the words of `extra_texts` (e.g. the prompts).

    Ids are assigned in sorted order after the special tokens, so the same vocabulary always
    gives the same ids.
    """
    words: set[str] = set()
    for word in vocabulary:
        words.update(_split_words(word))
    for text in list(extra_texts) + _FORMAT_TEXTS:
        words.update(_split_words(text))
    ordered = SPECIAL_TOKENS + sorted(words - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate(ordered)}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")]
    )
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
        model_max_length=4096,
        chat_template=LLAVA15_CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def build_tiny_processor(
    vocabulary: Iterable[str], image_size: int, patch_size: int, extra_texts: Iterable[str] = ()
) -> LlavaProcessor:
    """LlavaProcessor for a CLIP tower of `image_size`/`patch_size` with the default feature strategy.

    `num_additional_image_tokens=1` accounts for CLIP's CLS token, which the 'default'
    strategy drops: the processor then expands `<image>` to (image_size / patch_size)^2
    tokens, exactly the number of features the model produces.
    """
    tokenizer = build_word_tokenizer(vocabulary, extra_texts)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA15_CHAT_TEMPLATE,
    )
