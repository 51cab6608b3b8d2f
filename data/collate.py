"""From decoded samples to what the collators need: the turns of a task sample, images, classification batches.

A sample is a dict with at least `image` (PIL) and `task`, plus the record fields of its
task (`captions`, `question`, `answer` / `multiple_choice_answer`, `label`), or `turns` (the
packed questions of one image). `turns` gives its (prompt, answer) pairs with the task prompts of
`data.prompts`; `data.chat_collate.ChatCollator` renders them through the processor's chat template.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from data.errors import OverlongBatchError
from data.prompts import task_prompt

QUESTION_TASKS = ("vqav2", "gqa")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every mode: grayscale and CMYK convert; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def preprocess_images(processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """pixel_values for a list of images: the processor's image transform after `to_rgb`."""
    image_processor = getattr(processor, "image_processor", processor)
    return image_processor(images=[to_rgb(im) for im in images], return_tensors="pt")["pixel_values"]


def consensus_caption(captions: Sequence[str]) -> str:
    """The reference that agrees most with the image's other references: the highest mean cosine similarity of
    word 1- to 4-gram counts with each other reference (CIDEr's n-gram vectors without the corpus idf, and no
    length penalty), first one on a tie. Training on it aims at what the references share, which is what a
    consensus metric such as CIDEr-D rewards (the metric and the references scored against are unchanged)."""
    from collections import Counter

    def grams(text: str) -> list[Counter]:
        words = text.lower().replace(",", " ").replace(".", " ").split()
        return [Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)) for n in range(1, 5)]

    def cosine(a: Counter, b: Counter) -> float:
        dot = sum(v * b[k] for k, v in a.items())
        norm = (sum(v * v for v in a.values()) * sum(v * v for v in b.values())) ** 0.5
        return dot / norm if norm else 0.0

    vectors = [grams(c) for c in captions]
    if len(captions) < 2:
        return captions[0]

    def agreement(i: int) -> float:
        return sum(cosine(vectors[i][n], vectors[j][n]) for j in range(len(captions)) if j != i for n in range(4))

    return captions[max(range(len(captions)), key=lambda i: (agreement(i), -i))]


def conversation(sample: dict[str, Any], rng: random.Random | None = None,
                 caption_reference: str = "random") -> tuple[str, str]:
    """(prompt, answer) for a sample. Captioning trains on one of the references: picked by `rng` ("random"),
    the longest ("longest") or the one closest to the others ("consensus", `consensus_caption`); the last two
    are the same reference for an image every time (no draw)."""
    task = sample["task"]
    if task == "caption":
        captions = sample.get("captions") or ([sample["caption"]] if sample.get("caption") else [])
        if not captions:
            raise KeyError(f"caption sample {sample.get('__key__', '?')} has no 'captions'")
        if caption_reference == "longest":
            answer = max(captions, key=lambda c: (len(c.split()), c))
        elif caption_reference == "consensus":
            answer = consensus_caption(captions)
        else:
            answer = captions[(rng or random).randrange(len(captions))] if len(captions) > 1 else captions[0]
        return task_prompt("caption"), answer
    if task in QUESTION_TASKS:
        answer = sample.get("answer") or sample.get("multiple_choice_answer")
        if answer is None:
            raise KeyError(f"{task} sample {sample.get('__key__', '?')} has no 'answer'")
        return task_prompt(task, sample["question"]), str(answer)
    raise ValueError(f"no conversation for task {task!r}")


def turns(sample: dict[str, Any], rng: random.Random | None = None,
          caption_reference: str = "random") -> list[tuple[str, str]]:
    """[(prompt, answer)] of a sample: one turn, or every question of a packed sample (`turns`)."""
    if sample.get("turns"):
        return [(task_prompt(sample["task"], t["question"]), str(t["answer"])) for t in sample["turns"]]
    return [conversation(sample, rng, caption_reference)]


def flatten_rows(per_sample: Sequence[Sequence[Any]], max_length: int) -> tuple[list[Any], list[int]]:
    """(the rows of a batch, which sample each came from: a long sample may give several) of per-sample row lists;
    OverlongBatchError when no sample gave a row."""
    rows = [row for sample_rows in per_sample for row in sample_rows]
    if not rows:
        raise OverlongBatchError(f"every sample of this batch is longer than max_length={max_length} with its "
                                 "image(s) and first answer (image tokens are never truncated): raise data.max_length")
    return rows, [i for i, sample_rows in enumerate(per_sample) for _ in sample_rows]


def _stack(values: Any) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values
    return torch.stack([torch.as_tensor(v) for v in values])


@dataclass
class ClassificationCollator:
    """Batches for a ViT classifier: pixel_values and integer labels."""

    processor: Any

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": preprocess_images(self.processor, [s["image"] for s in samples]),
            "labels": torch.tensor([int(s["label"]) for s in samples], dtype=torch.long),
        }
