"""Generation budgets per task (`eval.max_new_tokens`, `structlora eval --max-new-tokens`) and how many
answers ran into theirs.

A task's budget is a number of new tokens, or for conversations `auto`: measured on the training split's
reference answers in the evaluated model's own tokens (`data.answer_budget`). A generated answer *hit the
budget* when it took all of its new tokens without producing the end-of-turn token (`eval.generate`):
cut off, not finished. Every generation task's scores carry a `budget` block, and the report says
"N of M answers hit the K-token budget".
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data.prompts import max_new_tokens as default_budget

BUDGET_TASKS = ("caption", "vqav2", "gqa", "conversations")
AUTO = "auto"


def default_budgets() -> dict[str, int]:
    """Today's budgets per task (`data.prompts.max_new_tokens`): caption and conversations 64, short answers 16."""
    return {task: default_budget(task) for task in BUDGET_TASKS}


def check_budgets(settings: Mapping[str, Any], field: str = "eval.max_new_tokens") -> dict[str, int | str]:
    """`settings` checked: known tasks, positive whole numbers, `auto` for conversations only. A bad entry is a
    one-line ValueError naming `field` and the task."""
    out: dict[str, int | str] = {}
    for task, value in dict(settings).items():
        if task not in BUDGET_TASKS:
            raise ValueError(f"{field}: unknown task {task!r}; choose from {', '.join(BUDGET_TASKS)}")
        if value == AUTO:
            if task != "conversations":
                raise ValueError(f"{field}.{task}: 'auto' is for conversations (measured on its training answers); "
                                 "give a number of tokens")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field}.{task}: expected a positive whole number of tokens"
                             + (" or 'auto'" if task == "conversations" else "") + f", got {value!r}")
        out[task] = value
    return out


def parse_budgets(text: str, field: str = "--max-new-tokens") -> dict[str, int | str]:
    """'conversations=auto,caption=32' -> {'conversations': 'auto', 'caption': 32}, checked."""
    out: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        task, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{field} {item}: expected TASK=TOKENS, e.g. conversations=auto or caption=32")
        value = value.strip()
        out[task.strip()] = int(value) if value.lstrip("-").isdigit() else value
    return check_budgets(out, field)


def resolve_budget(task: str, settings: Mapping[str, Any] | None, processor: Any, model: Any = None,
                   answers_dir: Path | None = None) -> dict[str, Any]:
    """{"max_new_tokens", "setting": "default" (the task's own) | "given" | "auto", and for auto "auto": the
    measurement} of `task` for one model. `answers_dir` is the prepared training split of the conversations (for
    `auto`); the cap is the model's context when it is below data.answer_budget's."""
    value = (settings or {}).get(task)
    if value is None or value == default_budget(task):  # (the config spells the defaults out)
        return {"max_new_tokens": default_budget(task), "setting": "default"}
    if value != AUTO:
        return {"max_new_tokens": int(value), "setting": "given"}
    from data.answer_budget import CAP, measure_budget
    from eval.errors import EvalInputError

    if answers_dir is None:
        raise EvalInputError(f"max_new_tokens {task}=auto measures the training answers, and no training split of "
                             f"{task} was given to measure")
    cap = CAP
    if model is not None:
        from eval.long_context import context_length_of

        context = context_length_of(model)
        cap = min(cap, context) if context else cap
    budget, stats = measure_budget(Path(answers_dir), processor, cap=cap)
    return {"max_new_tokens": budget, "setting": AUTO, "auto": stats}


def budget_block(budget: Mapping[str, Any], hits: Mapping[str, bool], ids: list[str]) -> dict[str, Any]:
    """The `budget` block of a task's scores: the budget, how it was set, and how many of the answers of `ids`
    hit it (an id without a record in `hits` did not)."""
    hit = sum(1 for i in ids if hits.get(str(i)))
    return {**budget, "hit": hit, "answers": len(ids)}


def budget_line(model: str, task: str, block: Mapping[str, Any]) -> str:
    """'adapted conversations: 12 of 300 answers hit the 64-token budget (auto = ...)'."""
    from data.answer_budget import describe_budget

    how = {"default": "the task's default", "given": "configured"}.get(block.get("setting"), "")
    if block.get("setting") == AUTO and block.get("auto"):
        how = describe_budget(block["auto"])
    return (f"{model} {task}: {block['hit']} of {block['answers']} answers hit the {block['max_new_tokens']}-token "
            f"budget" + (f" ({how})" if how else ""))


def budget_lines(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A line per model and task that carries a `budget` block (the report's 'Generation budget' section)."""
    return [budget_line(name, task, block["budget"]) for name, tasks in models.items()
            for task, block in tasks.items() if isinstance(block, Mapping) and isinstance(block.get("budget"), Mapping)]
