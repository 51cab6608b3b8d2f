"""Teacher-forced test loss as an evaluation task: the training collator's labels, the token-weighted
mean the method study reports, per-item losses for the paired bootstrap, and its place in the report."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _eval_tiny import tiny_images, tiny_llava, tiny_processor

from data.chat_collate import ChatCollator
from eval.errors import EvalInputError
from eval.harness import ModelEntry, check_inputs, evaluate_models, write_outputs

ACC = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, device=torch.device("cpu"),
                      wait_for_everyone=lambda: None)


def _examples() -> dict[str, list[dict]]:
    images = tiny_images(5)
    caption = [{"task": "caption", "image_id": i, "image": im, "captions": ["a red square", "a blue circle"]}
               for i, im in enumerate(images)]
    vqa = [{"task": "vqav2", "question_id": 100 + i, "image": im, "question": "what color is the square?",
            "answer": "red", "answers": [{"answer": "red"}] * 10, "question_type": "what color",
            "answer_type": "other"} for i, im in enumerate(images[:4])]
    return {"caption": caption, "vqav2": vqa}


def _study_loss(model, processor, examples, batch_size=2, max_length=4096) -> float:
    """Study v2's definition (its cells, bench/study_cell.py, now retired): model(**batch).loss weighted by
    each batch's label tokens."""
    collate = ChatCollator(processor, max_length=max_length, seed=0)
    total = tokens = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            tokens += n
    return total / tokens


def test_the_loss_is_the_studys_token_weighted_mean_and_each_item_has_its_own(tmp_path):
    processor = tiny_processor()
    examples = _examples()
    model = tiny_llava(processor, seed=3)
    results = evaluate_models([ModelEntry("m", lambda: (model, processor))], ["vqav2", "test_loss"],
                              {"vqav2": examples["vqav2"]}, tmp_path, ACC, batch_size=2, say=lambda _: None)
    block = results.scores["m"]["test_loss"]
    assert block["vqav2"]["loss"] == pytest.approx(_study_loss(model, processor, examples["vqav2"]), rel=1e-5)
    assert block["vqav2"]["num_examples"] == 4 and block["vqav2"]["dropped"] == 0 and block["vqav2"]["tokens"] > 0
    assert sorted(block["vqav2"]["per_item"]) == ["100", "101", "102", "103"]
    assert block["mean"] == pytest.approx(block["vqav2"]["loss"])


def test_two_models_are_compared_item_by_item_and_the_report_shows_the_loss(tmp_path):
    processor = tiny_processor()
    examples = _examples()
    models = [ModelEntry(name, lambda seed=seed: (tiny_llava(processor, seed=seed), processor))
              for name, seed in (("a", 1), ("b", 2))]
    results = evaluate_models(models, ["caption", "vqav2", "test_loss"], examples, tmp_path, ACC, batch_size=3,
                              say=lambda _: None)
    a, b = results.scores["a"]["test_loss"], results.scores["b"]["test_loss"]
    assert set(a) == {"caption", "vqav2", "mean"} and a["caption"]["loss"] != b["caption"]["loss"]
    paths = write_outputs(results, tmp_path, "loss", reference="a")
    report = paths["report"].read_text()
    assert "| test_loss.mean |" in report and "| test_loss.caption.loss |" in report
    import json

    row = json.loads(paths["metrics"].read_text())["differences"]["b"]["test_loss.item_mean"]
    assert row["items"] == 9 and row["low"] <= row["difference"] <= row["high"]
    mean_a = sum(a[t]["per_item"][k] for t in ("caption", "vqav2") for k in a[t]["per_item"]) / 9
    mean_b = sum(b[t]["per_item"][k] for t in ("caption", "vqav2") for k in b[t]["per_item"]) / 9
    assert row["difference"] == pytest.approx(mean_b - mean_a)


def test_test_loss_needs_a_task_whose_answers_it_scores():
    from eval.harness import loss_tasks

    with pytest.raises(EvalInputError, match="'test_loss' scores the answers of other tasks"):
        check_inputs(["test_loss"], {}, None)
    # alone, it scores every task whose samples were loaded (a loss-only eval: the eval stage loads the
    # trained tasks); with generation tasks, exactly theirs (long-context's captions are not among them)
    loaded = {"caption": [{"id": 1}], "vqav2": [{"id": 2}], "gqa": []}
    check_inputs(["test_loss"], loaded, None)
    assert loss_tasks(["test_loss"], loaded) == ["caption", "vqav2"]
    assert loss_tasks(["vqav2", "long_context", "test_loss"], loaded) == ["vqav2"]
