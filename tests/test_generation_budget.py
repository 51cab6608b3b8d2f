"""Generation budgets (eval.max_new_tokens; `auto` from the training answers) and the answers that hit them; the
conversations' corpus BLEU-4 and CIDEr as pycocoevalcap computes them, and a corpus BLEU-4 bootstrap."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from _eval_tiny import tiny_images, tiny_llava, tiny_processor

from data.answer_budget import answer_token_lengths, budget_from_lengths, describe_budget, measure_budget
from eval.budget import budget_lines, check_budgets, default_budgets, parse_budgets, resolve_budget
from eval.generate import EvalSample, generate_batch_hits, generate_predictions, sample_prompt


def _acc():
    return SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, device=torch.device("cpu"),
                           wait_for_everyone=lambda: None)


def test_the_budget_rule_is_a_nearest_rank_percentile_plus_a_margin_capped():
    budget, stats = budget_from_lengths(list(range(1, 101)))  # p99 of 1..100 is 99; margin max(8, ceil(9.9))
    assert budget == 99 + 10 and stats["percentile_tokens"] == 99 and stats["margin"] == 10
    assert stats["answers"] == 100 and stats["longest"] == 100 and stats["longer_than_budget"] == 0
    assert budget_from_lengths([5, 6, 7])[0] == 7 + 8  # the 8-token floor of the margin
    budget, stats = budget_from_lengths([3000, 10], cap=512)
    assert budget == 512 and stats["capped"] and stats["longer_than_budget"] == 1
    assert "capped at 512" in describe_budget(stats) and "1 training answers are longer" in describe_budget(stats)
    with pytest.raises(ValueError, match="no answers"):
        budget_from_lengths([])


def test_budget_settings_are_checked_with_one_line_naming_the_field(tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.schema import RunConfig

    assert default_budgets() == {"caption": 64, "vqav2": 16, "gqa": 16, "conversations": 64}
    assert RunConfig().eval.max_new_tokens == default_budgets()  # the committed default run is unchanged
    assert parse_budgets("conversations=auto, caption=32") == {"conversations": "auto", "caption": 32}
    path = tmp_path / "c.yaml"
    for bad, message in [("{caption: auto}", "max_new_tokens.caption: 'auto' is for conversations"),
                         ("{captions: 8}", "max_new_tokens: unknown task 'captions'"),
                         ("{vqav2: 0}", "max_new_tokens.vqav2: expected a positive whole number"),
                         ("{gqa: many}", "eval.max_new_tokens.gqa: expected int or one of 'auto'")]:
        path.write_text(f"eval: {{max_new_tokens: {bad}}}\n")
        with pytest.raises(ConfigError, match=message) as err:
            load_config(RunConfig, path)
        assert "\n" not in str(err.value)
    path.write_text("eval: {max_new_tokens: {conversations: auto}}\n")
    assert load_config(RunConfig, path).eval.max_new_tokens == {"conversations": "auto"}
    with pytest.raises(ValueError, match="--max-new-tokens: unknown task 'long_context'"):
        parse_budgets("long_context=8")
    with pytest.raises(ValueError, match="expected a positive whole number"):
        check_budgets({"conversations": True})


def test_an_answer_that_takes_every_new_token_without_ending_its_turn_hit_the_budget():
    processor = tiny_processor()
    model = tiny_llava(processor)
    images = tiny_images(3)
    prompts = [sample_prompt("caption", EvalSample(i, image), processor) for i, image in enumerate(images)]
    texts, hits = generate_batch_hits(model, processor, images, prompts, max_new_tokens=5)
    assert hits == [True, True, True], texts  # a random model never says </s>: every answer is cut
    first = texts[0].split()[0]
    model.generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids(first)  # its first word ends it
    texts_after, hits_after = generate_batch_hits(model, processor, images, prompts, max_new_tokens=5)
    assert hits_after[0] is False and texts_after[0] == first  # (a plain word as the stop token is decoded)
    assert hits_after == [first not in t.split() for t in texts]
    records = generate_predictions(model, processor, [EvalSample(0, images[0])], "caption", max_new_tokens=5,
                                   mark_budget=True)
    assert records == [{"image_id": 0, "caption": first, "hit_budget": False}]
    assert "hit_budget" not in generate_predictions(model, processor, [EvalSample(0, images[0])], "caption",
                                                    max_new_tokens=5)[0]  # the official format unless asked


def test_two_ranks_shards_say_which_answers_hit_the_budget(tmp_path):
    from eval.generate import merge_prediction_shards, run_generation, shard_budget_hits

    processor = tiny_processor()
    model = tiny_llava(processor)
    samples = [EvalSample(f"q{i}", image, "what color is it ?") for i, image in enumerate(tiny_images(3))]
    for rank in (0, 1):
        run_generation(model, processor, samples, "gqa", tmp_path, rank=rank, world_size=2, max_new_tokens=2)
    assert json.loads((tmp_path / "predictions.rank1.jsonl").read_text())["hit_budget"] is True
    records = merge_prediction_shards(tmp_path, "gqa", world_size=2)
    assert all(set(r) == {"questionId", "prediction"} for r in records)  # the official file has no extra field
    assert shard_budget_hits(tmp_path, "gqa", world_size=2) == {"q0": True, "q1": True, "q2": True}


def _conversation(sample_id: str, answer: str, image) -> dict:
    return {"task": "conversations", "id": sample_id, "images": [image], "num_images": 1,
            "messages": [{"role": "user", "content": "<image>\nwhat is there?"},
                         {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def answers_split(tmp_path_factory):
    """A prepared conversations file: two training conversations of known answers (and a test one)."""
    from data.prepare_conversations import prepare_conversations

    root = tmp_path_factory.mktemp("answers")
    lines = [{"id": "a", "messages": [{"role": "user", "content": "say it"}, {"role": "assistant", "content": "a red square"},
                                      {"role": "user", "content": "more"},
                                      {"role": "assistant", "content": "a big red square on the left of a blue circle"}]},
             {"id": "b", "messages": [{"role": "user", "content": "say it"}, {"role": "assistant", "content": "yes"}]}]
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / "test.jsonl").write_text(json.dumps(lines[1]) + "\n")
    prepare_conversations(root / "shards", splits={"train": root / "train.jsonl", "test": root / "test.jsonl"},
                          workers=1)
    return root / "shards" / "conversations" / "train"


def test_auto_measures_every_training_answer_in_the_model_s_tokens(answers_split):
    processor = tiny_processor()
    lengths = answer_token_lengths(processor, ["a red square", "yes"])
    assert lengths == [4, 2]  # three words and yes, each + the end-of-turn token
    budget, stats = measure_budget(answers_split, processor)
    assert stats["answers"] == 3 and stats["conversations"] == 2 and stats["percentile_tokens"] == 12
    assert budget == 12 + 8 and stats["tokenizer"] == type(processor.tokenizer).__name__
    resolved = resolve_budget("conversations", {"conversations": "auto"}, processor, tiny_llava(processor, max_position=16),
                              answers_split)
    assert resolved["max_new_tokens"] == 16 and resolved["auto"]["capped"]  # the model's 16 positions cap it
    assert resolve_budget("caption", {"conversations": "auto"}, processor) == {"max_new_tokens": 64,
                                                                               "setting": "default"}


def test_the_report_counts_answers_at_the_budget_and_bleu4_is_pycocoevalcap_s_corpus_value(tmp_path, answers_split):
    """Through the harness: metrics.json's conversations bleu4 is pycocoevalcap's Bleu_4 (x100) of the same
    pairs, cider its CIDEr; every answer of a random model hits a 3-token budget and the report says so."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from eval.caption_metrics import ptb_tokenize
    from eval.harness import ModelEntry, evaluate_models, write_outputs

    processor = tiny_processor()
    images = tiny_images(4)
    refs = ["a red square", "the blue circle is on the left", "two green triangles and a star", "yes"]
    examples = {"conversations": [_conversation(f"c{i}", r, im) for i, (r, im) in enumerate(zip(refs, images))]}
    entries = [ModelEntry(name, lambda s=seed: (tiny_llava(processor, seed=s), processor))
               for name, seed in (("base", 0), ("other", 1))]
    results = evaluate_models(entries, ["conversations"], examples, tmp_path, _acc(), batch_size=4,
                              say=lambda _: None, conversation_metric="bleu4",
                              max_new_tokens={"conversations": 3})
    write_outputs(results, tmp_path, "t", "base")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("base", "other"):
        block = metrics["models"][name]["conversations"]
        predictions = json.loads((tmp_path / name / "conversations_predictions.json").read_text())
        tokens = ptb_tokenize({**{(0, i): [r] for i, r in enumerate(refs)},
                               **{(1, i): [p["prediction"]] for i, p in enumerate(predictions)}})
        gts, res = {i: tokens[(0, i)] for i in range(4)}, {i: tokens[(1, i)] for i in range(4)}
        assert block["bleu4"] == 100.0 * Bleu(4).compute_score(gts, res, verbose=0)[0][3]
        assert block["cider"] == Cider().compute_score(gts, res)[0]
        assert block["budget"] == {"max_new_tokens": 3, "setting": "given", "hit": 4, "answers": 4}
        assert "bleu_counts" not in block and "per_sample" not in block  # per-item tables stay out of metrics.json
    row = metrics["differences"]["other"]["conversations.bleu4"]
    assert row["statistic"] == "corpus" and row["difference"] == pytest.approx(
        metrics["models"]["other"]["conversations"]["bleu4"] - metrics["models"]["base"]["conversations"]["bleu4"])
    report = (tmp_path / "report.md").read_text()
    assert "- other conversations: 4 of 4 answers hit the 3-token budget (configured)" in report
    assert "| conversations.bleu4 (corpus BLEU-4 x100) |" in report and "corpus Bleu_4 x100" in report
    rows = [json.loads(line) for line in (tmp_path / "base" / "conversations_samples.jsonl").open()]
    assert all(r["hit_budget"] for r in rows) and "bleu4_sentence" in rows[0]["scores"]
    assert budget_lines({"m": {"caption": {"budget": {"max_new_tokens": 10, "setting": "auto", "hit": 0, "answers": 2,
                                                      "auto": budget_from_lengths([1, 2])[1]}}}}) == [
        "m caption: 0 of 2 answers hit the 10-token budget (auto = 10 tokens: p99 of 2 training answers is 2 tokens "
        "(end-of-turn included), + 8 margin)"]


def test_a_corpus_bleu4_bootstrap_recomputes_the_corpus_value_of_each_resample():
    from eval.bleu_corpus import corpus_bleu4_of
    from eval.compare import paired_bootstrap_bleu4

    # [testlen, reflen, guess 1-4, correct 1-4]: a perfect 6-word answer and an empty one
    good, empty = [6, 6, 6, 5, 4, 3, 6, 5, 4, 3], [0, 6, 0, 0, 0, 0, 0, 0, 0, 0]
    ours = {"a": good, "b": good, "c": empty}
    same = paired_bootstrap_bleu4(ours, ours, resamples=200)
    assert same["difference"] == 0.0 and same["low"] == same["high"] == 0.0
    better = paired_bootstrap_bleu4({"a": empty, "b": empty, "c": empty}, ours, resamples=500)
    assert better["difference"] == pytest.approx(100 * corpus_bleu4_of([good, good, empty]))
    assert 0 <= better["low"] <= better["difference"] <= better["high"] <= 100
