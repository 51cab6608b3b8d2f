"""Task prompts and the conversation format, defined once.

Training collation, evaluation and the demo all import from here, so the model is asked
the same way everywhere (LLaVA-1.5 / lmms-eval conventions).
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
SHORT_ANSWER_POSTPROMPT = "Answer the question using a single word or phrase."

CAPTION_MAX_NEW_TOKENS = 64
SHORT_ANSWER_MAX_NEW_TOKENS = 16

# llava-hf/llava-1.5-*-hf chat template (vicuna_v1 without the system line):
#   "USER: <image>\n{prompt} ASSISTANT: {answer}</s>"
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"


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


def render_prompt(prompt: str, with_image: bool = True) -> str:
    """The text up to and including 'ASSISTANT:', ready for generation."""
    image = f"{IMAGE_TOKEN}\n" if with_image else ""
    return f"{USER_ROLE}: {image}{prompt} {ASSISTANT_ROLE}:"


def max_new_tokens(task: str) -> int:
    """Caption and your own conversations' answers (which may be sentences): 64; short answers: 16."""
    return CAPTION_MAX_NEW_TOKENS if task in ("caption", "conversations") else SHORT_ANSWER_MAX_NEW_TOKENS
