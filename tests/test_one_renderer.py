"""One renderer for every family: a conversation is tokenized the same way for training (the collator), for
evaluation (the generation path of `structlora eval` and the eval stage) and for the demo (`app.inference`),
up to the generation prompt. Test ids name the feature and the family.

- a multi-turn conversation: the training row cut before its last reply is the evaluation prompt of the
  conversation up to its last user turn;
- one turn: the training row cut before the reply is the evaluation prompt and the demo's input, for a
  caption (the benchmark wording) and for a question asked in your own conversations' style (no VQA suffix).

"Up to the generation prompt": the evaluation and demo ids are the training row's up to where generation starts;
the training row may hold whitespace after that (a template's " " between "ASSISTANT:" and the reply), which the
label span leaves out as transformers' assistant mask does; the tiny presets' byte-level tokenizers make it a token
of its own (real SentencePiece / BPE tokenizers fold it into the reply's first token: tests/test_real_tokenizers.py
compares them token for token). LLaVA-OneVision is the one exception, and it is the hub template's: llava-hf's
OneVision template renders an assistant turn as "<|im_start|>assistant \n" but its generation prompt as
"<|im_start|>assistant\n" (the tiny preset copies it), so training and generation see one token apart there
whatever renders them; the tests pin that difference (and nothing else) for it.
"""

from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image

from data.chat_collate import ChatCollator
from data.prompts import CAPTION_PROMPT, IMAGE_TOKEN
from pipeline.models.families import FAMILIES
from pipeline.models.presets.processors import tiny_processor

IMAGE = Image.new("RGB", (16, 16), (200, 30, 30))
QUESTION = "What is in the picture?"
CONVERSATION = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{QUESTION}"},
                {"role": "assistant", "content": "A red square."},
                {"role": "user", "content": "And how many are there?"},
                {"role": "assistant", "content": "One."}]


class _Recorder(torch.nn.Module):
    """Stands for a model in `eval.generate`: records the input ids it is asked to continue."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def generate(self, input_ids, attention_mask=None, **_):
        self.seen.append(input_ids[attention_mask.bool()] if attention_mask is not None else input_ids[0])
        return input_ids


def _agree(family: str, trained: list[int], asked: list[int]) -> None:
    tok = tiny_processor(family).tokenizer
    if family == "llava_onevision":  # "assistant \n" in training, "assistant\n" as the generation prompt
        space = tok.convert_tokens_to_ids("Ġ")  # the byte-level BPE's " "
        assert trained[-2] == space and trained[:-2] + trained[-1:] == asked
        return
    assert trained[:len(asked)] == asked, (tok.decode(trained[-8:]), tok.decode(asked[-8:]))
    assert tok.decode(trained[len(asked):]).strip() == ""  # at most the whitespace before the reply


def _before_last_reply(batch) -> list[int]:
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    kept = (labels != -100).nonzero().flatten().tolist()
    k = len(kept) - 1
    while k > 0 and kept[k - 1] == kept[k] - 1:
        k -= 1
    return ids[:kept[k]].tolist()


def _evaluated(processor, task: str, example: dict) -> list[int]:
    from eval.generate import generate_predictions
    from eval.generation_tasks import samples_and_references

    samples, _ = samples_and_references(task, [example])
    recorder = _Recorder()
    generate_predictions(recorder, processor, samples, task, batch_size=1)
    return recorder.seen[0].tolist()


@functools.cache
def _demo_model(family: str, style: str, root: str):
    """The tiny model of `family` saved as a merged model is (with its inference style), loaded by the demo."""
    from pathlib import Path

    from app.inference import LoadedModel
    from app.prompting import style_for_tasks, write_style
    from pipeline.models.presets.tiny import build_tiny

    folder = Path(root) / f"{family}-{style}"
    build_tiny(family).save_pretrained(folder)
    tiny_processor(family).save_pretrained(folder)
    write_style(folder, style_for_tasks({"conversations": 1.0} if style == "chat" else {"caption": 1.0, "vqav2": 1.0}))
    return LoadedModel(folder, device=torch.device("cpu"))


def _demo_ids(demo, prompt_text: str) -> list[int]:
    return demo._inputs(IMAGE, prompt_text, max_new_tokens=4)["input_ids"][0].tolist()


@pytest.mark.parametrize("family", FAMILIES, ids=[f"conversation-train_eval-{f}" for f in FAMILIES])
def test_a_multi_turn_conversation_is_tokenized_alike_for_training_and_evaluation(family):
    processor = tiny_processor(family)
    example = {"id": "c1", "task": "conversations", "messages": CONVERSATION, "images": [IMAGE]}
    trained = _before_last_reply(ChatCollator(processor, max_length=4096)([example]))
    _agree(family, trained, _evaluated(processor, "conversations", example))


@pytest.mark.parametrize("family", FAMILIES, ids=[f"caption-train_eval_demo-{f}" for f in FAMILIES])
def test_a_caption_prompt_is_tokenized_alike_for_training_evaluation_and_the_demo(family, tmp_path_factory):
    processor = tiny_processor(family)
    sample = {"task": "caption", "image": IMAGE, "image_id": 7, "captions": ["a red square."]}
    trained = _before_last_reply(ChatCollator(processor, max_length=4096)([sample]))
    _agree(family, trained, _evaluated(processor, "caption", sample))
    demo = _demo_model(family, "benchmark", str(tmp_path_factory.getbasetemp()))
    assert demo.style.caption_text == CAPTION_PROMPT
    _agree(family, trained, _demo_ids(demo, demo.style.caption_text))


@pytest.mark.parametrize("family", FAMILIES, ids=[f"chat_question-train_demo-{f}" for f in FAMILIES])
def test_a_conversation_trained_model_gets_the_question_as_typed_in_the_demo(family, tmp_path_factory):
    """A model trained on your own conversations is asked through the chat template with no VQA suffix: the demo's
    input is the training row of that question, cut before the answer; a benchmark-trained model gets the
    short-answer wording instead."""
    processor = tiny_processor(family)
    one_turn = {"task": "conversations", "messages": CONVERSATION[:2], "images": [IMAGE]}
    trained = _before_last_reply(ChatCollator(processor, max_length=4096)([one_turn]))
    chat = _demo_model(family, "chat", str(tmp_path_factory.getbasetemp()))
    assert chat.style.question_text(QUESTION) == QUESTION
    _agree(family, trained, _demo_ids(chat, chat.style.question_text(QUESTION)))
    benchmark = _demo_model(family, "benchmark", str(tmp_path_factory.getbasetemp()))
    assert benchmark.style.question_text(QUESTION).endswith("Answer the question using a single word or phrase.")
