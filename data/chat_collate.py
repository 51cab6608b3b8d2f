"""Training batches through the processor's chat template: any VLM family (`model.arch: vlm`).

The benchmark tasks (captions, VQAv2, GQA; packed questions as turns) and your own conversations become
chat messages with the prompts of `data.prompts`; `data.chat_template.chat_labels` renders them with the
processor's template, lets the processor expand the images (anyres tiles, dynamic resolution, Qwen-VL's
grid: each family's own count) and labels the assistant replies only. The processor's extras
(`image_grid_thw`, `mm_token_type_ids`, `image_sizes`, `pixel_attention_mask`, PaliGemma's
`token_type_ids`...) ride along in the batch, never made by hand.

`max_length` holds as for LLaVA (`data.collate.LlavaCollator`): a conversation longer than it is split between
turns into rows, never inside an image's tokens or an answer; a row that continues a conversation starts
with the images of the turns before it (and the system text). A turn that cannot fit even alone is dropped
and counted (`dropped_turns` when other turns of the sample are kept, `overlong_examples` when none is).
Lengths are measured with the processor itself (images expanded), so the rule holds for every family.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from data.chat import split_messages
from data.chat_template import (
    add_special_tokens_for,
    chat_labels,
    fold_system,
    render,
    to_template_messages,
    uses_chat_template,
)
from data.collate import LlavaCollator, flatten_rows, to_rgb, turns
from data.prompts import IMAGE_TOKEN

Row = tuple[list[dict[str, Any]], list[Any]]  # (template messages, the images they hold)


@dataclass
class ChatCollator:
    """Batches for any `AutoModelForImageTextToText` model: the processor's tensors plus `labels`.

    Args:
        processor: the model's processor, with a chat template whose replies are in `{% generation %}` blocks.
        max_length: token limit per row (images expanded). Image tokens and answers are never cut.
        seed: seeds the choice of reference caption, so a stream gives the same batches.
    """

    processor: Any
    max_length: int = 256
    seed: int = 0
    caption_reference: str = "random"
    dropped_turns: int = 0
    overlong_examples: int = 0
    last_rows: list[int] = field(init=False, repr=False, default_factory=list)
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def length(self, messages: list[dict[str, Any]], images: Sequence[Any]) -> int:
        """Tokens of one row as the processor encodes it (its images expanded)."""
        text = render(self.processor, [messages])[0][0]
        special = add_special_tokens_for(self.processor, [text])
        if not images:  # text only (PaliGemma's processor refuses a call without images)
            return len(self.processor.tokenizer(text, add_special_tokens=special)["input_ids"])
        return len(self.processor(text=[text], images=[list(images)], add_special_tokens=special)["input_ids"][0])

    def image_tokens(self, image: Any = None) -> int:
        """Tokens `image` (default a 32 x 32 one) adds to a prompt, as the processor expands it (any-res tiles and
        dynamic resolution give larger images more)."""
        from PIL import Image

        image = to_rgb(image) if image is not None else Image.new("RGB", (32, 32))
        with_image = to_template_messages([{"role": "user", "content": f"{IMAGE_TOKEN}\nx"}])
        without = to_template_messages([{"role": "user", "content": "x"}])
        return self.length(with_image, [image]) - self.length(without, [])

    def sample_rows(self, sample: dict[str, Any]) -> list[Row]:
        """Rows of one sample; no row means it is lost (counted)."""
        if sample["task"] == "conversations":
            system, pairs = split_messages(sample["messages"])
            images = [to_rgb(im) for im in sample.get("images") or []]
        else:
            system, images = None, [to_rgb(sample["image"])]
            pairs = turns(sample, self._rng, self.caption_reference)
            pairs = [(f"{IMAGE_TOKEN}\n{pairs[0][0]}", pairs[0][1]), *pairs[1:]]
        tags = [user.count(IMAGE_TOKEN) for user, _ in pairs]
        before = [sum(tags[:k]) for k in range(len(pairs) + 1)]  # images introduced before turn k

        def row(start: int, end: int) -> Row:
            canonical = [{"role": "system", "content": system}] if system else []
            for user, answer in pairs[start:end]:
                canonical += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            messages = fold_system(self.processor,
                                   to_template_messages(canonical, carried_images=before[start] if start else 0))
            return messages, images[:before[end]]

        whole = row(0, len(pairs))
        if self.length(*whole) <= self.max_length:
            return [whole]
        rows: list[Row] = []
        start, dropped = 0, 0
        while start < len(pairs):
            if self.length(*row(start, start + 1)) > self.max_length:
                dropped, start = dropped + 1, start + 1
                continue
            end = start + 1
            while end < len(pairs) and self.length(*row(start, end + 1)) <= self.max_length:
                end += 1
            rows.append(row(start, end))
            start = end
        if rows:
            self.dropped_turns += dropped
        else:
            self.overlong_examples += 1
        return rows

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows, self.last_rows = flatten_rows([self.sample_rows(s) for s in samples], self.max_length)
        return chat_labels(self.processor, [m for m, _ in rows], [ims for _, ims in rows])


def make_collator(processor: Any, max_length: int = 256, seed: int = 0):
    """The training collator of a processor: LlavaCollator for LLaVA processors (the llava-hf text, which is what
    their chat template renders), `data.chat_collate.ChatCollator` (the processor's chat template) for the rest."""
    if uses_chat_template(processor):
        return ChatCollator(processor, max_length=max_length, seed=seed)
    return LlavaCollator(processor, max_length=max_length, seed=seed)
