"""Conversations as turns, and the one rule for splitting a conversation that is too long.

A canonical conversation (`data.conversations`) is a list of {"role", "content"} messages, content a string
with `<image>` tags: an optional system message, then user / assistant pairs. `split_messages` turns it into
(system, [(user, answer), ...]); `split_turns` cuts the turns of one sample into rows that fit `max_length`:
between turns, never inside an answer or an image's tokens (the training collator, `data.chat_collate`, and
through it the test loss, use it for every family).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def split_messages(messages: Sequence[dict[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """(system text or None, [(user, assistant), ...]) of canonical messages."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    body = list(messages[1:] if system is not None else messages)
    return system, [(body[i]["content"], body[i + 1]["content"]) for i in range(0, len(body) - 1, 2)]


def split_turns(turns: int, fits: Callable[[int, int], bool]) -> tuple[list[tuple[int, int]], int]:
    """([(start, end)] turn ranges of the rows, turns dropped) of a sample with `turns` turns, where
    `fits(start, end)` says whether turns start..end-1 fit in one row. Greedy: each row takes as many turns as
    fit; a turn that does not fit even alone is dropped. No range at all: the sample is lost."""
    if turns and fits(0, turns):
        return [(0, turns)], 0
    rows: list[tuple[int, int]] = []
    start, dropped = 0, 0
    while start < turns:
        if not fits(start, start + 1):
            dropped, start = dropped + 1, start + 1
            continue
        end = start + 1
        while end < turns and fits(start, end + 1):
            end += 1
        rows.append((start, end))
        start = end
    return rows, dropped
