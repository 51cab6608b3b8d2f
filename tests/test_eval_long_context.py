"""Long-context captioning: prompts reach their targets, image tokens intact, table and PNG."""

from __future__ import annotations

import shutil

import pytest
from _eval_tiny import NUM_IMAGE_TOKENS, tiny_images, tiny_llava, tiny_processor
from PIL import Image

from data.prompts import CAPTION_PROMPT
from eval.generate import EvalSample
from eval.long_context import (
    PromptLengthMeter,
    buckets_for_model,
    build_context_prompt,
    evaluate_long_context,
    filler_pool,
    long_context_table,
    plot_long_context,
    scale_buckets,
)

REFERENCES = {
    1: ["a red square on the left", "a red square"],
    2: ["two blue circles", "two circles that are blue"],
    3: ["a big green triangle above a small star", "a green triangle and a yellow star"],
    4: ["one yellow star in the picture", "a small yellow star"],
    5: ["a blue square next to a red circle", "red circle and blue square"],
}


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def meter(processor):
    return PromptLengthMeter(processor, tiny_images(1)[0])


def test_scale_buckets():
    assert scale_buckets([256, 512, 1024, 2048], 4096, 64) == [256, 512, 1024, 2048]   # fits: unchanged
    assert scale_buckets([256, 512, 1024, 2048], 512, 64) == [56, 112, 224, 448]        # x 448/2048
    assert scale_buckets([256, 512, 1024, 2048], 512, 64, min_length=100) == [112, 224, 448]
    with pytest.raises(ValueError):
        scale_buckets([256], 64, 64, min_length=10)


def test_buckets_for_model_scale_to_the_tiny_context(processor, meter):
    model = tiny_llava(processor, max_position=256)
    bare = meter(f"USER: <image>\n{CAPTION_PROMPT} ASSISTANT:")
    assert buckets_for_model(model, meter, new_tokens=64) == scale_buckets([256, 512, 1024, 2048], 256, 64, bare)
    assert buckets_for_model(model, meter, new_tokens=64) == [48, 96, 192]  # x 192/2048; 24 < bare prompt
    assert buckets_for_model(tiny_llava(processor, max_position=4096), meter) == [256, 512, 1024, 2048]


def test_filler_pool_excludes_evaluated_images():
    pool = filler_pool(REFERENCES, exclude=[1, "2"])
    assert "a red square" not in pool and "two blue circles" not in pool and len(pool) == 6


@pytest.mark.parametrize("target", [40, 57, 90, 150, 249])
def test_prompts_reach_the_target_and_keep_every_image_token(processor, meter, target):
    pool = filler_pool(REFERENCES, exclude=[1])
    prompt = build_context_prompt(meter, pool, target)
    assert prompt.text.endswith(f"{CAPTION_PROMPT} ASSISTANT:")
    batch = processor(text=[prompt.text], images=[Image.new("RGB", (20, 30))], return_tensors="pt")
    ids = batch["input_ids"][0]
    assert len(ids) == prompt.num_tokens  # the meter agrees with the real processor
    assert target - 1 <= prompt.num_tokens <= target  # word-level tokens: exact up to a one-token word split
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((ids == image_id).sum()) == NUM_IMAGE_TOKENS


def test_target_below_the_bare_prompt_is_an_error(meter):
    with pytest.raises(ValueError, match="without filler"):
        build_context_prompt(meter, ["a red square"], NUM_IMAGE_TOKENS)


@pytest.mark.skipif(shutil.which("java") is None, reason="CIDEr scoring tokenises with Java")
def test_evaluate_long_context_end_to_end(processor, tmp_path):
    model = tiny_llava(processor, max_position=256)
    samples = [EvalSample(i, image) for i, image in zip([1, 2], tiny_images(2))]
    pool = filler_pool(REFERENCES, exclude=[1, 2])
    buckets = scale_buckets([256, 512, 1024, 2048], 256, new_tokens=8, min_length=40)
    result = evaluate_long_context(model, processor, samples, REFERENCES, pool, buckets, batch_size=2, new_tokens=8)
    assert sorted(result["buckets"]) == buckets
    for target, row in result["buckets"].items():
        assert target - 1 <= row["prompt_tokens"] <= target and row["num_images"] == 2
        assert row["CIDEr"] >= 0.0
    with pytest.raises(ValueError, match="scale_buckets"):
        evaluate_long_context(model, processor, samples, REFERENCES, pool, [300], new_tokens=8)

    series = {"base": {b: r["CIDEr"] for b, r in result["buckets"].items()},
              "structlora": {b: r["CIDEr"] + 0.1 for b, r in result["buckets"].items()}}
    table = long_context_table(series)
    assert table.splitlines()[0] == "| run | " + " | ".join(f"{b} tok" for b in buckets) + " |"
    assert table.count("\n") == 4
    png = plot_long_context(series, tmp_path / "long_context.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(png).size[0] > 300
