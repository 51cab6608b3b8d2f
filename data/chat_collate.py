"""Training batches through the processor's chat template: every VLM family, LLaVA-1.5 included.

The benchmark tasks (captions, VQAv2, GQA; packed questions as turns) and your own conversations become
chat messages with the task prompts of `data.prompts`; `data.chat_template.chat_labels` renders them with the
processor's template, lets the processor expand the images (anyres tiles, dynamic resolution, Qwen-VL's
grid: each family's own count) and labels the assistant replies only. The processor's extras
(`image_grid_thw`, `mm_token_type_ids`, `image_sizes`, `pixel_attention_mask`, PaliGemma's
`token_type_ids`...) ride along in the batch, never made by hand.

`max_length`: a conversation longer than it is split between turns into rows (`data.chat.split_turns`), never
inside an image's tokens or an answer; a row that continues a conversation starts with the images of the
turns before it (and the system text). A turn that cannot fit even alone is dropped and counted
(`dropped_turns` when other turns of the sample are kept, `overlong_examples` when none is).

Lengths are the rendered text's tokens plus what the sample's images add, asked of the processor once per
combination of image sizes (the expansion depends on the images' sizes only), so a batch's images go through
the image processor once, in the batch's own processor call.

Long-context examples (`data.long_context`): a share of the caption examples get other training images'
captions between the image and the instruction, measured in this model's own tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from data.chat import split_messages, split_turns
from data.chat_template import (
    add_special_tokens_for,
    chat_labels,
    fold_system,
    render_text,
    to_template_messages,
)
from data.collate import flatten_rows, to_rgb, turns
from data.long_context import LongContextMaker
from data.prompts import IMAGE_TOKEN

Row = tuple[list[dict[str, Any]], list[Any]]  # (template messages, the images they hold)


@dataclass
class ChatCollator:
    """Batches for any `AutoModelForImageTextToText` model: the processor's tensors plus `labels`.

    Args:
        processor: the model's processor, with a chat template (the door, `pipeline.models`, makes sure).
        max_length: token limit per row (images expanded). Image tokens and answers are never cut.
        seed: seeds the choice of reference caption, so a stream gives the same batches.
        caption_reference: "random", "longest" or "consensus" (`data.collate.conversation`).
        long_context: makes a share of the caption examples long-context ones (training stream only).
    """

    processor: Any
    max_length: int = 256
    seed: int = 0
    caption_reference: str = "random"
    long_context: LongContextMaker | None = None
    dropped_turns: int = 0
    overlong_examples: int = 0
    last_rows: list[int] = field(init=False, repr=False, default_factory=list)
    _rng: random.Random = field(init=False, repr=False)
    _image_cost: dict[tuple, int] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    # --- lengths ------------------------------------------------------------------------------------------

    def _text_tokens(self, text: str) -> int:
        special = add_special_tokens_for(self.processor, [text])
        return len(self.processor.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _images_cost(self, text: str, images: Sequence[Any]) -> int:
        """Tokens the processor adds to `text` for `images` (expanded image tokens, inserted markers), asked of
        the processor once per tuple of image sizes."""
        key = tuple(im.size for im in images)
        if key not in self._image_cost:
            special = add_special_tokens_for(self.processor, [text])
            full = len(self.processor(text=[text], images=[list(images)], add_special_tokens=special)["input_ids"][0])
            self._image_cost[key] = full - self._text_tokens(text)
        return self._image_cost[key]

    def length(self, messages: list[dict[str, Any]], images: Sequence[Any]) -> int:
        """Tokens of one row as the processor encodes it (its images expanded)."""
        text = render_text(self.processor, messages)
        return self._text_tokens(text) + (self._images_cost(text, images) if images else 0)

    def _prompt_length(self, user_text: str, images: Sequence[Any]) -> int:
        """Tokens of a one-turn generation prompt (`user_text` with its `<image>` tags), images expanded."""
        messages = to_template_messages([{"role": "user", "content": user_text}])
        text = render_text(self.processor, messages, add_generation_prompt=True)
        return self._text_tokens(text) + (self._images_cost(text, images) if images else 0)

    def image_tokens(self, image: Any = None) -> int:
        """Tokens `image` (default a 32 x 32 one) costs in a row, as the processor expands it (any-res tiles and
        dynamic resolution give larger images more): its placeholder's expansion and the markers the processor
        adds, not the template's text around the placeholder."""
        from PIL import Image

        from data.chat_template import multimodal_ids

        image = to_rgb(image) if image is not None else Image.new("RGB", (32, 32))
        messages = to_template_messages([{"role": "user", "content": f"{IMAGE_TOKEN}\nx"}])
        text = render_text(self.processor, messages, add_generation_prompt=True)
        special = add_special_tokens_for(self.processor, [text])
        placeholders = sum(i in multimodal_ids(self.processor)
                           for i in self.processor.tokenizer(text, add_special_tokens=special)["input_ids"])
        return self._images_cost(text, [image]) + placeholders

    # --- rows ---------------------------------------------------------------------------------------------

    def _pairs(self, sample: dict[str, Any]) -> tuple[str | None, list[tuple[str, str]], list[Any]]:
        """(system, [(user, answer)], images) of one sample, `<image>` tags in the user texts."""
        if sample["task"] == "conversations":
            system, pairs = split_messages(sample["messages"])
            return system, pairs, [to_rgb(im) for im in sample.get("images") or []]
        pairs = turns(sample, self._rng, self.caption_reference)
        return None, [(f"{IMAGE_TOKEN}\n{pairs[0][0]}", pairs[0][1]), *pairs[1:]], [to_rgb(sample["image"])]

    def _row(self, system: str | None, pairs: list[tuple[str, str]], images: list[Any], start: int,
             end: int) -> Row:
        """The row of turns [start, end) of a sample: the system text, and the images of the turns before it."""
        before = sum(user.count(IMAGE_TOKEN) for user, _ in pairs[:start])  # images introduced before the row
        canonical = [{"role": "system", "content": system}] if system else []
        for user, answer in pairs[start:end]:
            canonical += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        messages = fold_system(self.processor, to_template_messages(canonical, carried_images=before))
        return messages, images[:before + sum(user.count(IMAGE_TOKEN) for user, _ in pairs[start:end])]

    def _rows(self, system: str | None, pairs: list[tuple[str, str]], images: list[Any]) -> list[Row]:
        """Rows of one sample; no row means it is lost (counted)."""
        def row(start: int, end: int) -> Row:
            return self._row(system, pairs, images, start, end)

        ranges, dropped = split_turns(len(pairs), lambda a, b: self.length(*row(a, b)) <= self.max_length)
        if ranges:
            self.dropped_turns += dropped
        else:
            self.overlong_examples += 1
        return [row(a, b) for a, b in ranges]

    def measure(self, sample: dict[str, Any]) -> tuple[int, int, int]:
        """(tokens of the whole sample as one row, the tokens its images add to the text, rows it becomes under
        `max_length`: 1 fits, more is split between turns, 0 is dropped): the data card's numbers."""
        system, pairs, images = self._pairs(sample)
        messages, _ = self._row(system, pairs, images, 0, len(pairs))
        text = render_text(self.processor, messages)
        added = self._images_cost(text, images) if images else 0
        return self._text_tokens(text) + added, added, len(self._rows(system, pairs, images))

    def sample_rows(self, sample: dict[str, Any]) -> list[Row]:
        """Rows of one sample (no long-context rewrite); no row means it is lost (counted)."""
        return self._rows(*self._pairs(sample))

    # --- long-context examples ----------------------------------------------------------------------------

    @property
    def long_context_examples(self) -> int:
        return self.long_context.made if self.long_context is not None else 0

    @property
    def long_context_no_pool(self) -> int:
        return self.long_context.no_pool if self.long_context is not None else 0

    def _lengthen(self, samples: Sequence[dict[str, Any]], parts: list[tuple]) -> None:
        """A share of the caption examples made long-context ones (data.long_context), in stream order."""
        self.long_context.begin_batch()
        for sample, (_, pairs, images) in zip(samples, parts):
            if sample["task"] != "conversations" and len(pairs) == 1:
                (_, answer), = pairs
                prompt_only = self._prompt_length(pairs[0][0], images)
                whole = to_template_messages([{"role": "user", "content": pairs[0][0]},
                                              {"role": "assistant", "content": answer}])
                answer_tokens = self.length(whole, images) - prompt_only

                def measure(user_text: str, images=images) -> int:
                    return self._prompt_length(f"{IMAGE_TOKEN}\n{user_text}", images)

                text = self.long_context.prompt(sample, measure, answer_tokens, self.max_length)
                if text is not None:
                    pairs[0] = (f"{IMAGE_TOKEN}\n{text}", answer)
            self.long_context.observe(sample)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        parts = [self._pairs(s) for s in samples]
        if self.long_context is not None:
            self._lengthen(samples, parts)
        rows, self.last_rows = flatten_rows([self._rows(*p) for p in parts], self.max_length)
        return chat_labels(self.processor, [m for m, _ in rows], [ims for _, ims in rows])


def make_collator(processor: Any, max_length: int = 256, seed: int = 0) -> ChatCollator:
    """The training collator of a processor (every family renders through its chat template)."""
    return ChatCollator(processor, max_length=max_length, seed=seed)
