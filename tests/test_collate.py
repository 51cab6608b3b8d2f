"""Collation of the tiny LLaVA-1.5 (the chat-template collator every family uses): the conversation format, label
masking, padding, the length limit."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from data.chat_collate import ChatCollator
from data.chat_template import IGNORE_INDEX, chat_prompt
from data.collate import ClassificationCollator, preprocess_images, to_rgb
from data.prompts import CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT
from pipeline.models.presets.tiny import build_tiny_llava
from pipeline.schema_model import ModelConfig

WORDS = "a red blue circle square is there how many shapes two yes left of".split()


@pytest.fixture(scope="module")
def processor():
    _, proc = build_tiny_llava(ModelConfig(preset="tiny").tiny, WORDS, [CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT])
    return proc


def _samples():
    return [
        {"image": Image.new("L", (64, 64), 30), "task": "caption", "captions": ["a red circle"]},
        {"image": Image.new("RGBA", (50, 70), (255, 0, 0, 128)), "task": "vqav2",
         "question": "how many shapes?", "multiple_choice_answer": "two"},
        {"image": Image.new("CMYK", (64, 64)), "task": "gqa", "question": "is there a circle?", "answer": "yes"},
    ]


def test_only_the_answer_and_eos_are_trained(processor):
    batch = ChatCollator(processor, max_length=120)(_samples())
    tok = processor.tokenizer
    for row, answer in zip(range(3), ["a red circle", "two", "yes"]):
        trained = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert trained == tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = int(batch["attention_mask"][row].sum())
        # the unpadded ids are the rendered prompt followed by the trained answer
        prompt_len = n - len(trained)
        assert batch["input_ids"][row, prompt_len:n].tolist() == trained
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()


def test_prompt_is_the_llava_conversation(processor):
    batch = ChatCollator(processor, max_length=120)(_samples()[1:2])
    tok = processor.tokenizer
    expected = processor(images=[to_rgb(_samples()[1]["image"])],
                         text=[chat_prompt(processor, "how many shapes?\n" + SHORT_ANSWER_POSTPROMPT)])["input_ids"][0]
    assert chat_prompt(processor, "q") == "USER: <image>\nq ASSISTANT:"  # LLaVA-1.5's conversation
    assert batch["input_ids"][0, : len(expected)].tolist() == list(expected)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"][0] == image_id).sum()) == 64


def test_pixel_values_match_the_shared_preprocessing(processor):
    samples = _samples()
    batch = ChatCollator(processor, max_length=120)(samples)
    assert torch.allclose(batch["pixel_values"], preprocess_images(processor, [s["image"] for s in samples]))


def test_image_tokens_are_never_truncated(processor):
    collator = ChatCollator(processor, max_length=70)  # 64 image tokens + prompt do not fit
    with pytest.raises(ValueError, match="image tokens are never truncated"):
        collator(_samples()[:1])
    assert collator.overlong_examples == 1 and collator.dropped_turns == 0


def test_long_prompts_are_dropped_and_counted_short_ones_kept(processor):
    long = dict(_samples()[1], question=" ".join(["how many shapes"] * 20) + "?")
    collator = ChatCollator(processor, max_length=95)
    batch = collator([_samples()[0], long])
    assert batch["input_ids"].shape[0] == 1 and collator.overlong_examples == 1


def test_an_answer_that_does_not_fit_is_dropped_and_counted_never_cut(processor):
    sample = dict(_samples()[0], captions=[" ".join(["a red circle"] * 30)])
    collator = ChatCollator(processor, max_length=100)
    batch = collator([sample, _samples()[1]])
    assert batch["input_ids"].shape[0] == 1 and collator.overlong_examples == 1


def test_over_long_examples_and_dropped_turns_are_counted_apart_and_never_stop_a_stream(processor):
    from data.stream import collate_with_stats

    long_q = " ".join(["how many shapes"] * 30) + "?"
    image = Image.new("RGB", (64, 64), "red")
    packed = {"task": "vqav2", "image": image, "__key__": "a",
              "turns": [{"question": "how many shapes?", "answer": "two", "question_id": 1},
                        {"question": long_q, "answer": "two", "question_id": 2}]}
    alone = {"task": "vqav2", "image": image, "__key__": "b", "question": long_q, "answer": "two"}
    collate = collate_with_stats(ChatCollator(processor, max_length=100))
    batch = collate([packed, alone])
    assert batch["input_ids"].shape[0] == 1  # the packed sample's first turn
    assert batch["__dropped__"] == {"overlong_examples": 1, "dropped_turns": 1}
    nothing = collate([alone])  # every sample too long: counted, no data, no exception
    assert "input_ids" not in nothing and nothing["__dropped__"] == {"overlong_examples": 1, "dropped_turns": 0}


def _packed(n: int) -> dict:
    base = _samples()[1]
    return {"task": base["task"], "image": base["image"], "__key__": "7",
            "turns": [{"question": f"what colour is shape {i}?", "answer": f"colour{i}", "question_id": i}
                      for i in range(n)]}


def _answer_spans(labels: torch.Tensor) -> list[list[int]]:
    spans, current = [], []
    for value in labels.tolist():
        if value != IGNORE_INDEX:
            current.append(value)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_a_packed_sample_has_labels_on_every_answer_and_nothing_else(processor):
    tok = processor.tokenizer  # word-level: a word's ids do not depend on what precedes it
    batch = ChatCollator(processor, max_length=400)([_packed(4)])
    assert batch["input_ids"].shape[0] == 1  # one multi-turn conversation
    spans = _answer_spans(batch["labels"][0])
    expected = [tok(f"colour{i}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for i in range(4)]
    assert spans == expected
    labelled = batch["labels"][0] != IGNORE_INDEX
    assert torch.equal(batch["input_ids"][0][labelled], torch.tensor(sum(expected, [])))


def test_a_long_conversation_is_split_between_turns_each_part_with_the_image(processor):
    one = ChatCollator(processor, max_length=400)([_packed(1)])["input_ids"].shape[1]
    batch = ChatCollator(processor, max_length=one + 30)([_packed(6)])
    rows = batch["input_ids"].shape[0]
    assert rows > 1 and batch["pixel_values"].shape[0] == rows
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert all(int((row == image_token).sum()) > 0 for row in batch["input_ids"])
    spans = [s for r in range(rows) for s in _answer_spans(batch["labels"][r])]
    assert len(spans) == 6  # every answer once, none cut


def test_caption_choice_is_seeded(processor):
    sample = dict(_samples()[0], captions=["a red circle", "a blue square", "two shapes", "a circle", "a square"])
    first = [ChatCollator(processor, max_length=120, seed=1)([sample] * 6)["input_ids"] for _ in range(2)]
    assert torch.equal(first[0], first[1])


def test_to_rgb_modes():
    assert to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    for mode in ("L", "CMYK", "P", "1", "I;16"):
        assert to_rgb(Image.new(mode, (3, 3))).mode == "RGB"


def test_classification_collator(processor):
    batch = ClassificationCollator(processor)([{"image": Image.new("RGB", (64, 64)), "label": 3}] * 2)
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["labels"].tolist() == [3, 3]


def test_pad_to_square_pads_with_the_mean_colour_and_travels_with_the_processor(processor, tmp_path):
    import copy

    from transformers import AutoProcessor

    from pipeline.models.door import with_image_fit

    wide = Image.new("RGB", (128, 32), (255, 0, 0))
    padded = with_image_fit(copy.deepcopy(processor), "pad_to_square")
    top = preprocess_images(padded, [wide])[0][:, 0, :]  # first row: padding in the mean colour
    assert float(top.abs().max()) < 0.05  # the mean normalises to 0
    cropped = preprocess_images(processor, [wide])[0][:, 0, :]  # centre crop: red to the edge
    assert float(cropped[0].min()) > 1.0
    padded.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert reloaded.image_processor.do_pad
    assert torch.equal(preprocess_images(reloaded, [wide]), preprocess_images(padded, [wide]))
    assert with_image_fit(reloaded, "center_crop").image_processor.do_pad is False


def test_caption_reference_longest_trains_on_the_same_most_complete_caption(processor):
    sample = {"image": Image.new("RGB", (64, 64)), "task": "caption",
              "captions": ["a red circle", "two shapes", "a red circle left of a blue square"]}
    collate = ChatCollator(processor, max_length=256, seed=0, caption_reference="longest")
    answers = set()
    for _ in range(6):
        batch = collate([sample])
        answers.add(processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]))
    assert len(answers) == 1 and "red circle left of a blue square" in next(iter(answers))


def test_caption_reference_consensus_trains_on_the_reference_the_others_agree_with(processor):
    """consensus: the reference sharing most 1-4-grams with the image's other references (the same every step),
    neither the longest nor the shortest; the collator trains on it."""
    from data.collate import consensus_caption

    captions = ["two shapes on a gray background.",
                "a large red circle is to the left of a small blue square.",
                "the image shows a large red circle and a small blue square.",
                "a large red circle and a small blue square.",
                "a red circle in the top left corner and a blue square in the bottom right corner of the picture."]
    assert consensus_caption(captions) == "a large red circle and a small blue square."
    assert consensus_caption(captions[::-1]) == consensus_caption(captions)  # order does not matter
    assert consensus_caption(["only one"]) == "only one"
    assert consensus_caption(["a b", "c d", "e f"]) == "a b"  # no agreement at all: the first
    sample = {"image": Image.new("RGB", (64, 64)), "task": "caption", "captions": captions}
    collate = ChatCollator(processor, max_length=256, seed=0, caption_reference="consensus")
    answers = {processor.tokenizer.decode(b["labels"][0][b["labels"][0] != IGNORE_INDEX])
               for b in (collate([sample]) for _ in range(4))}
    assert answers == {"a <unk> red circle <unk> a <unk> blue square. </s>"}  # the tiny vocabulary: <unk>s
