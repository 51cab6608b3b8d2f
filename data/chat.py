"""Conversation samples (your own data, `data.conversations`) as token rows: the text, the labels, the images.

A conversation is rendered in the llava-hf format the benchmark tasks use (data.prompts):

    {system} USER: <image>\\n{user 1} ASSISTANT: {answer 1}</s>USER: {user 2} ASSISTANT: {answer 2}</s>...

Labels are on the assistant answers and their end tokens only; the system text, every user turn and
every image token are masked (IGNORE_INDEX). Each `<image>` tag stands where its image goes and
expands to the model's image tokens; several tags, several images; none, a text-only row.

Longer than `max_length`: the conversation is split between turns, never inside an answer or an
image's tokens. A row that continues a conversation starts again with the images of the turns before
it (their tags at the head of its first user turn) and the system text, so every row sees what its
answers are about. A turn that cannot fit even so is dropped and counted (`dropped_turns` when other
turns of the sample are kept, the whole sample as `overlong` when none is).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from data.prompts import IMAGE_TOKEN, render_prompt

IGNORE_INDEX = -100


def split_messages(messages: Sequence[dict[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """(system text or None, [(user, assistant), ...]) of canonical messages."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    body = list(messages[1:] if system is not None else messages)
    return system, [(body[i]["content"], body[i + 1]["content"]) for i in range(0, len(body) - 1, 2)]


def first_piece(system: str | None, user: str, carried_images: int = 0) -> str:
    """The text of a row's first turn: the system text, the carried images' tags, the user turn."""
    head = f"{system.strip()} " if system and system.strip() else ""
    return head + render_prompt(f"{IMAGE_TOKEN}\n" * carried_images + user, with_image=False)


def generation_prompt(messages: Sequence[dict[str, str]], eos: str) -> tuple[str, str]:
    """(prompt up to the last 'ASSISTANT:', the last answer): the earlier turns as context, as in training."""
    system, turns = split_messages(messages)
    text = first_piece(system, turns[0][0])
    for answer, (user, _) in zip([a for _, a in turns[:-1]], turns[1:]):
        text += f" {answer.strip()}{eos}" + render_prompt(user, with_image=False)
    return text, turns[-1][1]


@dataclass
class ChatRows:
    """Token rows of conversation samples for one tokenizer.

    Args:
        tokenizer: the processor's tokenizer (`<image>` is one special token in it).
        image_tokens: how many tokens one image expands to (the processor's count for this model).
        answer_ids: function (tokenizer, answer) -> ids of the answer as the joint text holds them.
        max_length: token limit per row.
    """

    tokenizer: Any
    image_tokens: int
    answer_ids: Any
    max_length: int
    _image_id: int = field(init=False)

    def __post_init__(self) -> None:
        self._image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def _ids(self, text: str, first: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=first)["input_ids"]
        out: list[int] = []
        for i in ids:  # each tag -> the model's image tokens
            out.extend([i] * self.image_tokens if i == self._image_id else [i])
        return out

    def rows(self, messages: Sequence[dict[str, str]]) -> tuple[list[tuple[list[int], list[int], int]], int]:
        """([(ids, labels, number of images the row holds: the first n of the sample's)], turns dropped) of
        one sample; no row at all means the sample is lost (every turn too long)."""
        system, turns = split_messages(messages)
        tags = [user.count(IMAGE_TOKEN) for user, _ in turns]
        before = [sum(tags[:k]) for k in range(len(turns) + 1)]  # images introduced before turn k
        eos = self.tokenizer.eos_token_id
        answers = [list(self.answer_ids(self.tokenizer, a)) + [eos] for _, a in turns]
        later = [self._ids(render_prompt(user, with_image=False), first=False) for user, _ in turns]
        rows: list[tuple[list[int], list[int], int]] = []
        start, dropped = 0, 0
        while start < len(turns):
            head = self._ids(first_piece(system, turns[start][0], before[start] if start else 0), first=True)
            if len(head) + len(answers[start]) > self.max_length:
                dropped, start = dropped + 1, start + 1
                continue
            ids, labels = head + answers[start], [IGNORE_INDEX] * len(head) + answers[start]
            k = start + 1
            while k < len(turns) and len(ids) + len(later[k]) + len(answers[k]) <= self.max_length:
                ids += later[k] + answers[k]
                labels += [IGNORE_INDEX] * len(later[k]) + answers[k]
                k += 1
            rows.append((ids, labels, before[k]))
            start = k
        return rows, dropped
