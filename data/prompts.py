"""Task prompts, defined once: what a benchmark task asks (LLaVA-1.5 / lmms-eval wording).

Training collation, evaluation and the demo all import from here, so a task is asked the same way everywhere;
the conversation around it (roles, image placeholders, end-of-turn markers) is the processor's chat template
(`data.chat_template`).
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
SHORT_ANSWER_POSTPROMPT = "Answer the question using a single word or phrase."

CAPTION_MAX_NEW_TOKENS = 64
SHORT_ANSWER_MAX_NEW_TOKENS = 16


def question_prompt(question: str) -> str:
    """VQAv2 / GQA prompt: the question, a newline, the short-answer post-prompt."""
    return f"{question.strip()}\n{SHORT_ANSWER_POSTPROMPT}"


def task_prompt(task: str, question: str | None = None) -> str:
    """Prompt for a task name: 'caption' or one of the question tasks ('vqav2', 'gqa')."""
    if task == "caption":
        return CAPTION_PROMPT
    if question is None or not question.strip():
        raise ValueError(f"task {task!r} needs a non-empty question")
    return question_prompt(question)


def max_new_tokens(task: str) -> int:
    """Caption and your own conversations' answers (which may be sentences): 64; short answers: 16."""
    return CAPTION_MAX_NEW_TOKENS if task in ("caption", "conversations") else SHORT_ANSWER_MAX_NEW_TOKENS
