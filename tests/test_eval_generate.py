"""Generation: batched == one-by-one, 2 ranks == 1 rank, shard merging, official record format."""

from __future__ import annotations

import json

import pytest
import torch
from _eval_tiny import tiny_images, tiny_llava, tiny_processor

from data.prompts import CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT
from eval.errors import EvalInputError
from eval.generate import (
    EvalSample,
    build_prompt,
    generate_predictions,
    merge_prediction_shards,
    postprocess_answer,
    run_generation,
    shard_samples,
    write_prediction_shard,
)


@pytest.fixture(scope="module")
def tiny():
    processor = tiny_processor()
    return tiny_llava(processor), processor


@pytest.fixture(scope="module")
def samples():
    questions = ["what color is the square ?", "how many circles are there ?", "is the star red ?",
                 "what shape is on the left ?", "is there a big triangle ?"]
    return [EvalSample(100 + i, image, questions[i]) for i, image in enumerate(tiny_images(5))]


def test_prompts_come_from_data_prompts_through_the_chat_template(tiny):
    """The task wording of data.prompts, in LLaVA-1.5's conversation (the tiny LLaVA's chat template)."""
    processor = tiny[1]
    assert build_prompt("caption", None, processor) == f"USER: <image>\n{CAPTION_PROMPT} ASSISTANT:"
    assert build_prompt("gqa", "is it red?", processor) == \
        f"USER: <image>\nis it red?\n{SHORT_ANSWER_POSTPROMPT} ASSISTANT:"


def test_postprocess_answer():
    assert postprocess_answer("vqav2", " The Two.\n") == "2"
    assert postprocess_answer("gqa", " Yes. ") == "Yes."
    assert postprocess_answer("caption", " a red square. ") == "a red square."


@pytest.mark.parametrize("task", ["caption", "vqav2"])
def test_batched_equals_one_by_one(tiny, samples, task):
    model, processor = tiny
    batched = generate_predictions(model, processor, samples, task, batch_size=3, max_new_tokens=6)
    single = generate_predictions(model, processor, samples, task, batch_size=1, max_new_tokens=6)
    assert batched == single
    keys = {"caption": ("image_id", "caption"), "vqav2": ("question_id", "answer")}[task]
    assert [tuple(r) for r in batched] == [keys] * len(samples)
    assert [r[keys[0]] for r in batched] == [s.sample_id for s in samples]
    assert any(r[keys[1]] for r in batched)  # the random model does say something


def test_generation_leaves_processor_and_mode_alone(tiny, samples):
    model, processor = tiny
    model.train()
    side = processor.tokenizer.padding_side
    generate_predictions(model, processor, samples[:2], "gqa", batch_size=2, max_new_tokens=2)
    assert model.training and processor.tokenizer.padding_side == side
    model.eval()


def test_two_ranks_give_the_same_predictions_as_one(tiny, samples, tmp_path):
    model, processor = tiny
    run_generation(model, processor, samples, "gqa", tmp_path / "one", rank=0, world_size=1, batch_size=2,
                   max_new_tokens=5)
    for rank in range(2):
        run_generation(model, processor, samples, "gqa", tmp_path / "two", rank=rank, world_size=2, batch_size=2,
                       max_new_tokens=5)
    one = merge_prediction_shards(tmp_path / "one", "gqa", world_size=1)
    two = merge_prediction_shards(tmp_path / "two", "gqa", world_size=2)
    assert one == two and len(one) == len(samples)
    assert set(one[0]) == {"questionId", "prediction"}
    assert json.loads((tmp_path / "two" / "predictions.json").read_text()) == two


def test_shard_samples_partition():
    items = list(range(7))
    parts = [shard_samples(items, r, 3) for r in range(3)]
    assert sorted(x for p in parts for x in p) == items
    with pytest.raises(ValueError):
        shard_samples(items, 3, 3)


def test_merge_deduplicates_and_sorts(tmp_path):
    write_prediction_shard([{"question_id": 3, "answer": "b"}, {"question_id": 1, "answer": "a"}], tmp_path, 0)
    write_prediction_shard([{"question_id": 2, "answer": "c"}, {"question_id": 3, "answer": "b2"}], tmp_path, 1)
    write_prediction_shard([], tmp_path, 2)  # a rank with nothing to do
    merged = merge_prediction_shards(tmp_path, "vqav2", world_size=3)
    # id 3 appears on ranks 0 and 1: the first rank's record wins
    assert merged == [{"question_id": 1, "answer": "a"}, {"question_id": 2, "answer": "c"},
                      {"question_id": 3, "answer": "b"}]
    paths = [tmp_path / "predictions.rank1.jsonl", tmp_path / "predictions.rank0.jsonl"]
    assert merge_prediction_shards(paths, "vqav2")[2] == {"question_id": 3, "answer": "b2"}


def test_merge_reports_a_missing_rank_and_ignores_stale_ones(tmp_path):
    write_prediction_shard([{"image_id": 1, "caption": "x"}], tmp_path, 0)
    with pytest.raises(EvalInputError, match=r"rank\(s\) \[1\]"):
        merge_prediction_shards(tmp_path, "caption", world_size=2)
    write_prediction_shard([{"image_id": 2, "caption": "stale"}], tmp_path, 3)  # from an earlier 4-rank run
    assert merge_prediction_shards(tmp_path, "caption", world_size=1) == [{"image_id": 1, "caption": "x"}]


def test_generate_rejects_unknown_task(tiny, samples):
    model, processor = tiny
    with pytest.raises(ValueError, match="unknown task"):
        generate_predictions(model, processor, samples, "coco")


def test_float_model_dtype_is_respected(tiny, samples):
    model, processor = tiny
    half = tiny_llava(processor).to(torch.bfloat16)
    out = generate_predictions(half, processor, samples[:2], "caption", batch_size=2, max_new_tokens=2)
    assert len(out) == 2 and next(half.parameters()).dtype == torch.bfloat16
