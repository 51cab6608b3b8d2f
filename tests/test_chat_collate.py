"""Training rows and prompts through the processor's chat template, for every family (LLaVA-1.5 included)."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from PIL import Image

from data.chat_collate import ChatCollator, make_collator
from data.chat_template import (
    LLAVA15_CHAT_TEMPLATE,
    MissingChatTemplateError,
    chat_prompt,
    ensure_chat_template,
    fold_system,
    messages_prompt,
    to_template_messages,
)
from data.prompts import CAPTION_PROMPT, IMAGE_TOKEN
from pipeline.models.families import FAMILIES
from pipeline.models.presets.processors import multimodal_ids, tiny_processor

IMG = Image.new("RGB", (40, 30), (200, 10, 10))
BLUE = Image.new("RGB", (30, 30), (10, 10, 200))
CAPTION = {"task": "caption", "image": IMG, "captions": ["a red square ."]}
PACKED = {"task": "vqav2", "image": IMG, "turns": [{"question": "what colour is it ?", "answer": "red"},
                                                   {"question": "how many shapes ?", "answer": "one"},
                                                   {"question": "is it a circle ?", "answer": "no"}]}
CONVERSATION = {"task": "conversations", "images": [IMG, BLUE], "messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is this?"}, {"role": "assistant", "content": "A red square."},
    {"role": "user", "content": f"And this {IMAGE_TOKEN} one?"}, {"role": "assistant", "content": "A blue one."}]}


@functools.cache
def _processor(family: str):
    return tiny_processor(family)


def _labelled(processor, batch) -> list[str]:
    return [processor.tokenizer.decode(row[row != -100]) for row in batch["labels"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_label_the_answers_only_and_carry_the_familys_extras(family):
    processor = _processor(family)
    collate = make_collator(processor, max_length=4096)
    batch = collate([CAPTION, PACKED, CONVERSATION])
    texts = _labelled(processor, batch)  # each reply ends with the family's end-of-turn marker: "|" here
    assert [re.sub(r"<[^<>]+>", "|", t).replace(" ", "") for t in texts] == ["aredsquare.|", "red|one|no|",
                                                                    "Aredsquare.|Ablueone.|"]
    labels, ids = batch["labels"], batch["input_ids"]
    images = torch.isin(ids, torch.tensor(sorted(multimodal_ids(processor))))
    assert bool(images.any()) and not bool((labels[images] != -100).any())  # image tokens never labelled
    assert collate.last_rows == [0, 1, 2] and collate.overlong_examples == 0 and collate.dropped_turns == 0


def test_llava_15_is_asked_in_its_own_conversation_format_through_its_template():
    """LLaVA-1.5 goes through the chat template like every family; its template renders LLaVA-1.5's text (the
    llava-hf format), in the generation prompt and in a training row, system text first."""
    processor = _processor("llava")
    for text in (CAPTION_PROMPT, "what colour is it ?\nAnswer the question using a single word or phrase."):
        assert chat_prompt(processor, text) == f"USER: <image>\n{text} ASSISTANT:"
    import copy

    tiny = copy.deepcopy(processor)
    tiny.chat_template = LLAVA15_CHAT_TEMPLATE  # the tiny default's (pipeline.models.presets.words), with a system turn
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat?"},
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "And?"}]
    assert messages_prompt(tiny, messages) == "Be brief. USER: <image>\nWhat? ASSISTANT: A cat.</s>USER: And? ASSISTANT:"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3", "llava_next", "gemma3"])
def test_max_length_splits_between_turns_never_inside_an_image_or_an_answer(family):
    processor = _processor(family)
    whole = ChatCollator(processor, max_length=4096)
    full = whole.length(*whole.sample_rows(PACKED)[0])
    one_turn = whole.length(*whole.sample_rows({**PACKED, "turns": PACKED["turns"][:1]})[0])
    collate = ChatCollator(processor, max_length=one_turn + 4)
    assert one_turn + 4 < full
    batch = collate([PACKED])
    assert len(collate.last_rows) == 3 and collate.dropped_turns == 0  # one row per turn
    assert all(int(m.sum()) <= one_turn + 4 for m in batch["attention_mask"])
    image = torch.isin(batch["input_ids"], torch.tensor(sorted(multimodal_ids(processor))))
    counts = image.sum(dim=1)
    assert bool((counts == counts[0]).all()) and int(counts[0]) > 0  # every row starts again with the whole image
    assert [t.replace(" ", "") for t in _labelled(processor, batch)] == [
        t.replace(" ", "") for t in _labelled(processor, whole([{**PACKED, "turns": [x]} for x in PACKED["turns"]]))]
    # too small for even the image and one answer: the sample is lost and counted, the batch refused
    tiny = ChatCollator(processor, max_length=8)
    with pytest.raises(ValueError, match="max_length=8"):
        tiny([PACKED])
    assert tiny.overlong_examples == 1


def test_a_continued_conversation_row_carries_the_earlier_images_and_the_system_text():
    processor = _processor("qwen2_5_vl")
    collate = ChatCollator(processor, max_length=4096)
    (whole, images), = collate.sample_rows(CONVERSATION)
    collate.max_length = collate.length(whole, images) - 1
    rows = collate.sample_rows(CONVERSATION)
    assert len(rows) == 2 and [len(ims) for _, ims in rows] == [1, 2]
    second, _ = rows[1]
    assert second[0]["role"] == "system"
    assert [c["type"] for c in second[1]["content"]] == ["image", "text", "image", "text"]


def test_templates_without_a_system_role_get_it_in_the_user_turn():
    paligemma, qwen = _processor("paligemma"), _processor("qwen2_5_vl")
    messages = to_template_messages(CONVERSATION["messages"][:2])
    folded = fold_system(paligemma, messages)
    assert [m["role"] for m in folded] == ["user"]
    assert [c.get("text") for c in folded[0]["content"]] == [None, "Answer briefly.\n\nWhat is this?"]
    assert fold_system(qwen, messages) == messages
    batch = ChatCollator(paligemma, max_length=4096)([CONVERSATION])
    assert "briefly" not in _labelled(paligemma, batch)[0]


def test_generation_prompts_come_from_the_template():
    qwen = _processor("qwen2_5_vl")
    prompt = chat_prompt(qwen, CAPTION_PROMPT)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|image_pad|>" in prompt and CAPTION_PROMPT in prompt
    assert prompt.index("<|image_pad|>") < prompt.index(CAPTION_PROMPT)
    context = messages_prompt(qwen, CONVERSATION["messages"][:4])
    assert context.count("<|image_pad|>") == 2 and "A red square." in context and "A blue one." not in context
    assert context.startswith("<|im_start|>system\nAnswer briefly.")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llava"])
def test_replies_found_turn_by_turn_equal_the_generation_blocks(family):
    """Replies are found turn by turn (hub templates have no {% generation %} blocks, and llava-hf's OneVision
    template leaves <|im_end|> outside its blocks): on every family they give the labels that blocks around each
    reply and its end-of-turn marker give (up to whitespace tokens), with or without the blocks in the template."""
    import copy

    from data.chat_template import GENERATION_BLOCK, chat_labels, to_template_messages

    marked = _processor(family)
    plain = copy.deepcopy(marked)
    plain.chat_template = GENERATION_BLOCK.sub("", marked.chat_template)
    assert not GENERATION_BLOCK.search(plain.chat_template)
    rows = [(to_template_messages(CONVERSATION["messages"]), CONVERSATION["images"]),
            (to_template_messages([{"role": "user", "content": f"{IMAGE_TOKEN}\nwhat colour is it ?"},
                                   {"role": "assistant", "content": "red"}]), [IMG])]
    rows = [(fold_system(marked, m), ims) for m, ims in rows]
    blocks = chat_labels(marked, [m for m, _ in rows], [i for _, i in rows], spans="blocks")
    for processor in (marked, plain):
        turns = chat_labels(processor, [m for m, _ in rows], [i for _, i in rows])
        assert torch.equal(blocks["input_ids"], turns["input_ids"])
        differ = blocks["labels"] != turns["labels"]
        assert {marked.tokenizer.decode([int(i)]).strip() for i in
                torch.cat([blocks["labels"][differ], turns["labels"][differ]]) if i != -100} <= {""}


# llava-hf/llava-onevision-qwen2-7b-ov-hf's template as published, with its own generation block (reconstructed
# here from its text, not downloaded): <|im_end|> is outside the block
LLAVA_ONEVISION_HUB = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_the_end_of_turn_marker_is_labelled_even_where_the_template_leaves_it_outside_its_block():
    import copy

    processor = copy.deepcopy(_processor("llava_onevision"))
    processor.chat_template = LLAVA_ONEVISION_HUB
    batch = ChatCollator(processor, max_length=4096)([CAPTION])
    assert _labelled(processor, batch)[0].replace(" ", "") == "aredsquare.<|im_end|>"


def test_user_text_keeps_its_spaces_around_images():
    from data.chat_template import user_content

    assert user_content(f"Compare {IMAGE_TOKEN} and {IMAGE_TOKEN} please") == [
        {"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " and "}, {"type": "image"},
        {"type": "text", "text": " please"}]
    assert user_content(f"{IMAGE_TOKEN}\nWhat is it?\n") == [{"type": "image"}, {"type": "text", "text": "What is it?"}]


def test_a_llava_processor_with_another_template_uses_it_and_a_processor_without_one_is_refused():
    import copy

    processor = copy.deepcopy(_processor("llava"))
    processor.chat_template = _processor("qwen2_5_vl").chat_template.replace("<|vision_start|><|image_pad|>"
                                                                            "<|vision_end|>", "<image>")
    assert "<|im_start|>assistant" in chat_prompt(processor, CAPTION_PROMPT)
    processor.chat_template = None  # a LLaVA processor saved without one gets LLaVA-1.5's
    assert ensure_chat_template(processor, "llava").chat_template == LLAVA15_CHAT_TEMPLATE
    qwen = copy.deepcopy(_processor("qwen2_5_vl"))
    qwen.chat_template = None
    with pytest.raises(MissingChatTemplateError, match="qwen: its processor has no chat template"):
        ensure_chat_template(qwen, "qwen")


def test_idefics3_pixel_mask_travels_as_bool_and_the_loss_is_unchanged():
    """SmolVLM's processor gives an int64 mask per pixel; the batch carries it as bool (8x smaller to move from a
    loader worker) and the model's loss is the same as with the processor's own int64 mask."""
    from pipeline.models.presets.tiny import build_tiny

    processor = _processor("idefics3")
    batch = ChatCollator(processor, max_length=4096)([PACKED])
    assert batch["pixel_attention_mask"].dtype == torch.bool
    model = build_tiny("idefics3").eval()
    with torch.no_grad():
        as_bool = model(**batch).loss
        as_long = model(**{**batch, "pixel_attention_mask": batch["pixel_attention_mask"].long()}).loss
    assert torch.equal(as_bool, as_long)
