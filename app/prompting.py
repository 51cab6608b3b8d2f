"""How a published model is asked: its task wording and generation budgets, recorded at merge, read by the demo.

The merge stage writes `structlora_inference.json` beside the merged weights (`write_style`); the demo reads it
(`read_style`), so it asks a model the way the model was trained:
- `questions: short_answer`: a model trained on the benchmarks (VQAv2 / GQA) gets LLaVA-1.5's short-answer
  wording ("{question}\\nAnswer the question using a single word or phrase.", `data.prompts.question_prompt`);
- `questions: chat`: a model trained on your own conversations gets the question as you typed it, through the
  chat template, with no suffix;
- the budgets are the evaluation's (`eval.max_new_tokens` per task as the merge resolved it: for conversations
  `auto` is measured on the training answers, `data.answer_budget`; else `data.prompts.max_new_tokens`), the
  sliders' starting values; `budgets` in the file says where each came from.
A model directory without the file (a hub model, a merge made before the file existed) is asked the
benchmarks' way. Every prompt goes through the processor's chat template either way (`data.chat_template`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from data.prompts import CAPTION_PROMPT, question_prompt
from data.prompts import max_new_tokens as task_budget

INFERENCE_FILE = "structlora_inference.json"
QUESTION_TASKS = ("vqav2", "gqa")


@dataclass(frozen=True)
class PromptStyle:
    """What the demo asks a model and how many tokens it lets it write."""

    questions: Literal["short_answer", "chat"] = "short_answer"
    caption_max_new_tokens: int = task_budget("caption")
    answer_max_new_tokens: int = task_budget("vqav2")
    trained_tasks: tuple[str, ...] = ()

    def question_text(self, question: str) -> str:
        return question_prompt(question) if self.questions == "short_answer" else question.strip()

    @property
    def caption_text(self) -> str:
        return CAPTION_PROMPT


def chat_style(tasks: Mapping[str, float]) -> bool:
    """Whether a model trained on `tasks` (data.tasks: name -> weight) is asked the chat way: it learnt your own
    conversations and no benchmark question task."""
    trained = [t for t, w in tasks.items() if w > 0]
    return "conversations" in trained and not any(t in QUESTION_TASKS for t in trained)


def style_for_tasks(tasks: Mapping[str, float], budgets: Mapping[str, int] | None = None) -> PromptStyle:
    """The style of a model trained on `tasks` (data.tasks: name -> weight): chat wording when it learnt your own
    conversations and no benchmark question task, the benchmarks' short answers otherwise. `budgets` (task ->
    new tokens, the evaluation's) set the caption and answer budgets; a task not in it keeps its default."""
    trained = tuple(sorted(t for t, w in tasks.items() if w > 0))
    chat = chat_style(tasks)
    budgets = dict(budgets or {})
    answers = "conversations" if chat else "vqav2"
    return PromptStyle(questions="chat" if chat else "short_answer",
                       caption_max_new_tokens=int(budgets.get("caption", task_budget("caption"))),
                       answer_max_new_tokens=int(budgets.get(answers, task_budget(answers))),
                       trained_tasks=trained)


def write_style(model_dir: str | Path, style: PromptStyle, budgets: Mapping[str, object] | None = None) -> Path:
    """`structlora_inference.json`: the style, and `budgets` (where each budget came from) when given."""
    path = Path(model_dir) / INFERENCE_FILE
    record = {**asdict(style), "trained_tasks": list(style.trained_tasks)}
    if budgets:
        record["budgets"] = dict(budgets)
    path.write_text(json.dumps(record, indent=2))
    return path


def read_style(model_dir: str | Path) -> PromptStyle:
    """The recorded style of a model directory; the benchmarks' style without the file (or for a hub id)."""
    path = Path(model_dir) / INFERENCE_FILE
    if not path.is_file():
        return PromptStyle()
    raw = json.loads(path.read_text())
    known = {k: raw[k] for k in ("questions", "caption_max_new_tokens", "answer_max_new_tokens") if k in raw}
    return PromptStyle(**known, trained_tasks=tuple(raw.get("trained_tasks", ())))
