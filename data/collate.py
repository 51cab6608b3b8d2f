"""From decoded samples to model batches: conversations, label masking, padding.

A sample is a dict with at least `image` (PIL) and `task`, plus the record fields of its
task (`captions`, `question`, `answer` / `multiple_choice_answer`, `label`), or `turns` (the
packed questions of one image). The text is the llava-hf conversation
"USER: <image>\\n{prompt} ASSISTANT: {answer}</s>" (one turn after another for packed samples)
with prompts from `data.prompts`; only the answers and their end tokens are trained
(IGNORE_INDEX elsewhere).
Image preprocessing is `preprocess_images`, the one function training, evaluation and the
demo share.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from data.chat import ChatRows
from data.errors import OverlongBatchError
from data.long_context import LongContextMaker
from data.prompts import ASSISTANT_ROLE, IMAGE_TOKEN, render_prompt, task_prompt

IGNORE_INDEX = -100
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


@dataclass
class LlavaCollator:
    """Batches for LlavaForConditionalGeneration: input_ids, attention_mask, pixel_values, labels.

    A packed sample (`turns`: all questions of an image) becomes one multi-turn conversation,
    "USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...", with labels on
    every answer and its end token and on nothing else. A conversation longer than `max_length`
    is split between turns into several rows, each starting with the image (so a batch may hold
    more rows than samples); nothing is cut inside an answer: a turn that does not fit even
    alone with the image is dropped and counted, in `dropped_turns` when other turns of its
    sample are kept, in `overlong_examples` when none is (the whole sample is lost). A batch
    whose every sample is too long raises OverlongBatchError (`collate_with_stats` counts it
    and hands on an empty batch, so a stream never dies of it mid-run).

    Args:
        processor: a LlavaProcessor (expands `<image>` into the model's image tokens).
        max_length: token limit per row. Image tokens are never cut.
        seed: seeds the choice of reference caption, so a stream gives the same batches.
    """

    processor: Any
    max_length: int = 256
    seed: int = 0
    long_context: LongContextMaker | None = None
    caption_reference: str = "random"
    dropped_turns: int = 0
    overlong_examples: int = 0
    _rng: random.Random = field(init=False, repr=False)
    _chat: ChatRows | None = field(init=False, repr=False, default=None)
    last_rows: list[int] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def _first_turns(self, images: list[Image.Image], prompts: list[str]) -> tuple[list[list[int]], Any]:
        """Ids of "USER: <image>\n{prompt} ASSISTANT:" (image tokens expanded) and pixel_values, in one call."""
        enc = self.processor(images=images, text=[render_prompt(p) for p in prompts], return_tensors=None)
        return [list(ids) for ids in enc["input_ids"]], enc["pixel_values"]

    def image_tokens(self) -> int:
        """How many tokens one `<image>` tag expands to for this processor (asked of it once)."""
        return self._chat_rows().image_tokens

    def _chat_rows(self) -> ChatRows:
        """The conversation row builder (data.chat), made on first use: it needs the model's image-token count."""
        if self._chat is None:
            enc = self.processor(images=[Image.new("RGB", (32, 32))], text=[IMAGE_TOKEN], return_tensors=None)
            image_id = self.processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            count = sum(1 for i in enc["input_ids"][0] if i == image_id)
            self._chat = ChatRows(self.processor.tokenizer, count, answer_token_ids, self.max_length)
        return self._chat

    @property
    def long_context_examples(self) -> int:
        return self.long_context.made if self.long_context is not None else 0

    @property
    def long_context_no_pool(self) -> int:
        return self.long_context.no_pool if self.long_context is not None else 0

    def _long_contexts(self, samples: Sequence[dict[str, Any]], bench: list[int],
                       conversations: dict[int, list[tuple[str, str]]]) -> None:
        """Make a share of the caption examples long-context ones (data.long_context), in stream order."""
        tok = self.processor.tokenizer
        extra = self._chat_rows().image_tokens - 1  # the <image> tag is one token of the text

        def measure(user_text: str) -> int:
            return len(tok(render_prompt(user_text))["input_ids"]) + extra

        self.long_context.begin_batch()
        for i in bench:
            (prompt, answer), *rest = conversations[i]
            answers = len(answer_token_ids(tok, answer)) + 1
            text = self.long_context.prompt(samples[i], measure, answers, self.max_length) if not rest else None
            if text is not None:
                conversations[i] = [(text, answer)]
            self.long_context.observe(samples[i])

    def _conversation(self, sample: dict[str, Any]) -> list[tuple[list[int], list[int], list[torch.Tensor]]]:
        """Rows of one conversation sample (your own data): several images, or none, per row."""
        rows, dropped = self._chat_rows().rows(sample["messages"])
        if not rows:
            self.overlong_examples += 1
            return []
        self.dropped_turns += dropped
        images = list(sample.get("images") or [])
        pixels = list(preprocess_images(self.processor, images)) if images else []
        return [(ids, labels, pixels[:n]) for ids, labels, n in rows]

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tok = self.processor.tokenizer
        per_sample: list[list[tuple[list[int], list[int], list[torch.Tensor]]]] = [[] for _ in samples]
        for i, sample in enumerate(samples):
            if sample["task"] == "conversations":
                per_sample[i] = self._conversation(sample)
        bench = [i for i, sample in enumerate(samples) if sample["task"] != "conversations"]
        conversations = {i: turns(samples[i], self._rng, self.caption_reference) for i in bench}
        if self.long_context is not None:
            self._long_contexts(samples, bench, conversations)
        images = {i: to_rgb(samples[i]["image"]) for i in bench}
        # One processor call expands <image> to the model's image tokens for every first turn and
        # preprocesses the images (the same transform as `preprocess_images`); answers and later
        # turns are tokenized on their own so that every prompt/answer boundary is exact.
        first_ids, pixels = self._first_turns([images[i] for i in bench], [conversations[i][0][0] for i in bench]) \
            if bench else ([], [])
        first = dict(zip(bench, first_ids))
        pixel = {i: torch.as_tensor(p) for i, p in zip(bench, pixels)}
        for i in bench:
            conv = conversations[i]
            answers = [answer_token_ids(tok, answer) + [tok.eos_token_id] for _, answer in conv]
            later = [tok(render_prompt(prompt, with_image=False), add_special_tokens=False)["input_ids"]
                     for prompt, _ in conv]
            start, ids, labels, dropped, kept = 0, first[i], None, 0, False
            while start < len(conv):
                prompt_ids = ids if labels is None else None
                if prompt_ids is None:  # a split: the next row starts again with the image
                    prompt_ids = self._first_turns([images[i]], [conv[start][0]])[0][0]
                if len(prompt_ids) + len(answers[start]) > self.max_length:
                    dropped += 1  # this turn cannot fit even alone with the image
                    start, labels = start + 1, []
                    continue
                kept = True
                row_ids = list(prompt_ids) + answers[start]
                row_labels = [IGNORE_INDEX] * len(prompt_ids) + answers[start]
                k = start + 1
                while k < len(conv) and len(row_ids) + len(later[k]) + len(answers[k]) <= self.max_length:
                    row_ids += list(later[k]) + answers[k]
                    row_labels += [IGNORE_INDEX] * len(later[k]) + answers[k]
                    k += 1
                per_sample[i].append((row_ids, row_labels, [pixel[i]]))
                start, labels = k, row_labels
            if kept:
                self.dropped_turns += dropped
            else:
                self.overlong_examples += 1
        rows, self.last_rows = flatten_rows(per_sample, self.max_length)
        pad_id = tok.pad_token_id
        width = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, labs, _) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(labs)] = torch.tensor(labs)
            attention[r, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        row_pixels = [p for _, _, ps in rows for p in ps]
        if row_pixels:  # a batch of text-only rows has no images at all
            batch["pixel_values"] = torch.stack(row_pixels)
        return batch


def flatten_rows(per_sample: Sequence[Sequence[Any]], max_length: int) -> tuple[list[Any], list[int]]:
    """(the rows of a batch, which sample each came from: a long sample may give several) of per-sample row lists;
    OverlongBatchError when no sample gave a row."""
    rows = [row for sample_rows in per_sample for row in sample_rows]
    if not rows:
        raise OverlongBatchError(f"every sample of this batch is longer than max_length={max_length} with its "
                                 "image(s) and first answer (image tokens are never truncated): raise data.max_length")
    return rows, [i for i, sample_rows in enumerate(per_sample) for _ in sample_rows]


def answer_token_ids(tokenizer: Any, answer: str) -> list[int]:
    """Ids of `answer` exactly as they appear after "ASSISTANT:" in the joint conversation text.

    Tokenized on its own, " yes" is not always what the joint text holds: SentencePiece (Llama,
    LLaVA-1.5) adds a dummy prefix and gives ['▁', '▁yes'] where the conversation has ['▁yes'].
    So the anchor "ASSISTANT:" is tokenized with and without the answer and the difference is
    taken; if the anchor's ids are not a prefix (a merge across the boundary), fall back.
    """
    anchor = f"{ASSISTANT_ROLE}:"
    with_anchor = tokenizer(f"{anchor} {answer.strip()}", add_special_tokens=False)["input_ids"]
    anchor_ids = tokenizer(anchor, add_special_tokens=False)["input_ids"]
    if with_anchor[: len(anchor_ids)] == anchor_ids and len(with_anchor) > len(anchor_ids):
        return list(with_anchor[len(anchor_ids):])
    return list(tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"])


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
