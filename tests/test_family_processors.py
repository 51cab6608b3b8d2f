"""Each VLM family's own processor, built offline: chat prompts, labels on assistant turns only, a train step."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models.families import FAMILIES
from pipeline.models.presets.processors import (
    ASSISTANT_MARKER,
    PROCESSOR_CLASS,
    SUPPORTED,
    TEMPLATE_SOURCE,
    chat_labels,
    multimodal_ids,
    render,
    tiny_processor,
)
from pipeline.models.presets.tiny import VOCAB, build_tiny, image_token_count

# the end-of-turn marker each template writes after an assistant reply
EOT = {"llava": "</s>", "llava_next": "</s>", "llava_onevision": "<|im_end|>", "qwen2_vl": "<|im_end|>",
       "qwen2_5_vl": "<|im_end|>", "qwen3_vl": "<|im_end|>", "idefics3": "<end_of_utterance>",
       "gemma3": "<end_of_turn>", "paligemma": "<eos>", "mistral3": "</s>", "internvl": "<|im_end|>"}
# (question 1, answer 1, question 2, answer 2) of the two conversations of a batch, of different lengths
TURNS = [("What is in the image?", "A red square.", "Which colour?", "Red."),
         ("Describe the picture.", "Two cats sit on the mat, near the old green car.", "How many?", "Two, not three.")]


def _conversation(q1: str, a1: str, q2: str, a2: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1}]},
            {"role": "assistant", "content": [{"type": "text", "text": a1}]},
            {"role": "user", "content": [{"type": "text", "text": q2}]},
            {"role": "assistant", "content": [{"type": "text", "text": a2}]}]


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


@functools.cache
def _processor(family: str):
    return tiny_processor(family)


@functools.cache
def _model(family: str) -> torch.nn.Module:
    return build_tiny(family)


@functools.cache
def _batch(family: str) -> dict[str, torch.Tensor]:
    return chat_labels(_processor(family), [_conversation(*t) for t in TURNS], [[_image(0)], [_image(1)]])


def _image_id(family: str) -> int:
    config = _model(family).config
    return config.image_token_id if getattr(config, "image_token_id", None) is not None else config.image_token_index


def _labelled_runs(processor, ids: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """Decoded runs of consecutive labelled tokens (special tokens kept)."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids.tolist(), labels.tolist()):
        if label != -100:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != -100
    return [processor.tokenizer.decode(run) for run in runs]


def test_every_family_is_supported():
    assert SUPPORTED == FAMILIES
    assert set(PROCESSOR_CLASS) == set(TEMPLATE_SOURCE) == set(ASSISTANT_MARKER) == set(EOT) == set(FAMILIES)


@pytest.mark.parametrize("family", SUPPORTED)
def test_processor_builds_offline(family):
    processor = _processor(family)
    assert type(processor).__name__ == PROCESSOR_CLASS[family]
    tokenizer = processor.tokenizer
    # PaliGemmaProcessor appends its 1024 <locXXXX> + 128 <segXXX> tokens (ids 1000-2151) whatever the tokenizer
    assert len(tokenizer) == VOCAB + (1152 if family == "paligemma" else 0)
    assert tokenizer.added_tokens_decoder[_image_id(family)].special  # one token, never split
    assert _image_id(family) in multimodal_ids(processor)


@pytest.mark.parametrize("family", SUPPORTED)
def test_labels_are_the_assistant_replies(family):
    processor, batch = _processor(family), _batch(family)
    ids, labels = batch["input_ids"], batch["labels"]
    assert labels.shape == ids.shape and int(ids.max()) < VOCAB
    assert bool((labels[batch["attention_mask"] == 0] == -100).all())
    assert not bool(torch.isin(labels, torch.tensor(sorted(multimodal_ids(processor)))).any())
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] != lengths[1]  # padded
    for row, (_, a1, _, a2) in enumerate(TURNS):
        assert _labelled_runs(processor, ids[row], labels[row]) == [a1 + EOT[family], a2 + EOT[family]]
        assert int((ids[row] == _image_id(family)).sum()) == image_token_count(family)
    single = chat_labels(processor, _conversation(*TURNS[0]), [_image(0)])  # one conversation, not a list
    assert _labelled_runs(processor, single["input_ids"][0], single["labels"][0]) == [
        TURNS[0][1] + EOT[family], TURNS[0][3] + EOT[family]]


@pytest.mark.parametrize("family", SUPPORTED)
def test_train_step_and_no_look_ahead(family):
    model, batch = _model(family), _batch(family)
    model.train()
    try:
        loss = model(**batch).loss
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    assert math.isfinite(loss.item())
    # changing the last answer token must not change any earlier logit (PaliGemma: prefix-LM token_type_ids)
    row, last = 1, int((batch["labels"][1] != -100).nonzero()[-1])
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][row, last] = _processor(family).tokenizer.convert_tokens_to_ids("x")
    with torch.no_grad():
        before, after = model(**batch).logits, model(**changed).logits
    assert torch.allclose(before[row, :last], after[row, :last], atol=1e-6)
    assert not torch.allclose(before[row, last], after[row, last])


@pytest.mark.parametrize("family", SUPPORTED)
def test_generation_prompt(family):
    processor = _processor(family)
    question = _conversation(*TURNS[0])[:1]
    prompt = processor.apply_chat_template(question, add_generation_prompt=True)
    ids = processor(text=[prompt], images=[[_image(0)]], return_tensors="pt")["input_ids"][0]
    assert processor.tokenizer.decode(ids).endswith(ASSISTANT_MARKER[family])
    trained = render(processor, [_conversation(*TURNS[0])])[0][0]
    if family == "llava_onevision":  # its template writes "assistant \n{reply}" but prompts "assistant\n"
        assert trained.startswith(prompt.replace("assistant\n", "assistant \n"))
    else:  # the prompt is exactly what the model saw before its first reply in training
        assert trained.startswith(prompt)


@pytest.mark.parametrize("family", [f for f in SUPPORTED if f != "paligemma"])
def test_transformers_assistant_mask_agrees(family):
    """`apply_chat_template(return_assistant_tokens_mask=True)` marks the same tokens (image tokens aside).
    PaliGemma is left out: its processor inserts `<bos>` after the image, which that mask does not follow."""
    processor, batch = _processor(family), _batch(family)
    out = processor.apply_chat_template([_conversation(*t) for t in TURNS], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, return_tensors="pt",
                                        processor_kwargs={"images": [[_image(0)], [_image(1)]], "padding": True})
    assert torch.equal(out["input_ids"], batch["input_ids"])
    mask = torch.as_tensor(out["assistant_masks"]).bool() & ~torch.isin(
        out["input_ids"], torch.tensor(sorted(multimodal_ids(processor))))
    assert torch.equal(mask, batch["labels"] != -100)


def test_llava_template_is_the_project_format():
    """LLaVA-1.5's conversation, written out: "USER: <image>\\n{q} ASSISTANT: {a}</s>USER: {q} ASSISTANT: {a}</s>"."""
    q1, a1, q2, a2 = TURNS[0]
    expected = f"USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
    assert render(_processor("llava"), [_conversation(*TURNS[0])])[0][0] == expected
