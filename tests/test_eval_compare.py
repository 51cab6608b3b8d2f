"""Paired bootstrap differences, bucket planning with reasons, results schemas, the long-context plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.compare import compare_to_reference, format_difference, item_scores, paired_bootstrap
from eval.errors import EvalInputError
from eval.long_context import plan_buckets, plot_long_context
from eval.schemas import validate_results

ROOT = Path(__file__).resolve().parents[1]


def test_paired_bootstrap_of_a_constant_shift_is_exact():
    a = {str(i): float(i % 7) for i in range(50)}
    b = {k: v + 2.5 for k, v in a.items()}
    row = paired_bootstrap(a, b)
    assert row["difference"] == pytest.approx(2.5) and row["low"] == pytest.approx(2.5)
    assert row["high"] == pytest.approx(2.5) and row["items"] == 50


def test_paired_bootstrap_interval_covers_the_mean_and_shrinks_with_more_items():
    import numpy as np

    rng = np.random.default_rng(1)
    widths = []
    for n in (40, 640):
        a = {str(i): float(x) for i, x in enumerate(rng.normal(size=n))}
        b = {k: v + 0.3 + float(rng.normal()) for k, v in a.items()}
        row = paired_bootstrap(a, b, seed=3)
        assert row["low"] < row["difference"] < row["high"]
        widths.append(row["high"] - row["low"])
    assert widths[1] < widths[0] / 2.5  # ~1/sqrt(16) = 1/4
    assert paired_bootstrap({"1": 1.0}, {"2": 1.0})["difference"] is None
    assert format_difference({"difference": 0.5, "low": -0.25, "high": 1.0}) == "+0.500 [-0.250, +1.000]"


def test_item_scores_average_to_the_headline():
    caption = {"metrics": {"CIDEr": 0.5}, "per_image": {1: {"CIDEr": 0.25}, 2: {"CIDEr": 0.75}}}
    gqa = {"accuracy": 50.0, "perQuestion": {"a": 1, "b": 0}}
    assert item_scores("caption", caption) == {"1": 0.25, "2": 0.75}
    assert item_scores("gqa", gqa) == {"a": 100.0, "b": 0.0}
    scores = {"base": {"caption": caption, "gqa": gqa},
              "ours": {"caption": {"per_image": {1: {"CIDEr": 0.5}, 2: {"CIDEr": 1.0}}},
                       "gqa": {"perQuestion": {"a": 1, "b": 1}}}}
    diffs = compare_to_reference(scores, "base")["ours"]
    assert diffs["caption.CIDEr"]["difference"] == pytest.approx(0.25)
    assert diffs["gqa.accuracy"]["difference"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="reference"):
        compare_to_reference(scores, "missing")


def test_plan_buckets_keeps_what_fits_and_gives_a_reason_for_the_rest():
    kept, skipped = plan_buckets([32, 256, 1024, 2048], 1024, bare=40, new_tokens=64, scale=False)
    assert kept == [256]
    assert "shorter than the prompt without any filler (40 tokens" in skipped[32]
    assert skipped[2048] == "bucket 2048 tokens + 64 new tokens exceed the model's 1024 positions"
    assert set(skipped) == {32, 1024, 2048}
    kept, skipped = plan_buckets([256, 512, 1024, 2048], 512, bare=60, new_tokens=64, scale=True)
    assert kept == [112, 224, 448] and "scaled from 256" in skipped[256]
    assert plan_buckets([256, 2048], 4096, bare=60)[0] == [256, 2048]  # a real context: unchanged


@pytest.mark.parametrize("task, records, message", [
    ("gqa", [{"questionId": 7, "prediction": "no"}], "0/questionId"),
    ("vqav2", [{"question_id": 1, "answer": "2", "score": 1}], "Additional properties"),
    ("caption", [{"image_id": 1}], "'caption' is a required property"),
    ("caption", [{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}], "appears twice"),
    ("vqav2", {"question_id": 1, "answer": "2"}, "is not of type 'array'"),
])
def test_results_schemas_refuse_what_the_servers_refuse(task, records, message):
    with pytest.raises(EvalInputError, match=message):
        validate_results(records, task, source="out.json")
    validate_results([{"questionId": "7", "prediction": "no"}], "gqa")


def test_the_long_context_plot_draws_a_line_per_model(tmp_path, monkeypatch):
    import eval.plots

    drawn = {}
    save = eval.plots.save_figure

    def keep(fig, path):
        drawn["labels"] = [line.get_label() for line in fig.axes[0].get_lines()]
        return save(fig, path)

    monkeypatch.setattr(eval.plots, "save_figure", keep)
    series = {"base": {96: 0.1, 160: 0.2}, "merged": {96: 0.4, 160: 0.3}, "adapter": {96: 0.4, 160: 0.3}}
    path = plot_long_context(series, tmp_path / "lc.png")
    assert drawn["labels"] == ["base", "merged", "adapter"] and path.stat().st_size > 1000


def test_on_main_raises_on_every_rank_under_two_torchrun_ranks():
    """Rank 0's scoring fails: rank 0 re-raises its own error, rank 1 gets a RuntimeError naming it, and
    neither waits forever; `structlora eval`'s process group carries the timeout it was given."""
    import subprocess

    from _procs import cpu_env, torchrun

    proc = subprocess.run(torchrun(2, str(ROOT / "tests" / "on_main_worker.py")), env=cpu_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout  # both ranks write to it: lines may run together, each is whole
    for rank in (0, 1):
        assert f"rank {rank}: world 2 timeout 0:07:00" in lines
    assert "rank 0: result 42" in lines and "rank 1: result None" in lines
    assert "rank 0: raised ZeroDivisionError: division by zero" in lines
    assert "rank 1: raised RuntimeError: scoring failed on the main process: ZeroDivisionError: division by zero" \
        in lines


def test_on_main_in_one_process_and_inputs_are_checked_before_loading():
    from types import SimpleNamespace

    from eval.harness import LongContextSettings, check_inputs, on_main

    acc = SimpleNamespace(is_main_process=True, num_processes=1)
    assert on_main(acc, lambda: 3) == 3
    with pytest.raises(ZeroDivisionError):
        on_main(acc, lambda: 1 / 0)
    assert on_main(SimpleNamespace(is_main_process=False, num_processes=1), lambda: 1 / 0) is None
    with pytest.raises(EvalInputError, match="'gqa' has no samples"):
        check_inputs(["caption", "gqa"], {"caption": [{}], "gqa": []}, None)
    settings = LongContextSettings(samples=0, lengths=[96], pool=["a red circle"])
    with pytest.raises(EvalInputError, match="no images to caption"):
        check_inputs(["long_context"], {"caption": [{}]}, settings)


def test_long_context_tables_pair_arms_by_seed_with_holm_within_the_declared_family():
    from eval.compare_stats import holm, paired_p
    from eval.compare_tables import long_context_tables
    from eval.compare_tests import assign, default_families, long_context_comparisons

    def cell(name, seed, cider):
        return {"name": name, "seed": seed, "rank": 8, "group": "grid", "long_context_cider": cider}

    grid = [cell("lora", s, {"96": 0.30 + 0.01 * s, "384": 0.10 + 0.02 * s}) for s in range(5)]
    grid += [cell("structlora", s, {"96": 0.31 + 0.01 * s + 0.003 * (s % 2), "384": 0.20 + 0.01 * s})
             for s in range(5)]
    grid += [cell("lora_short", s, {"96": 0.25, "384": 0.05 + 0.001 * s}) for s in range(5)]
    arms = ["lora", "structlora", "lora_short"]
    tests = long_context_comparisons(arms, "lora", grid, pairs=[["structlora", "lora"], ["lora", "lora_short"]])
    assign(tests, default_families({"arms": arms, "reference": "lora"}))
    lines = long_context_tables(tests)
    assert lines[0].endswith("| p | family | Holm p |") and "| lora CIDEr x100 | structlora CIDEr x100 |" in lines[0]
    assert any("| lora_short CIDEr x100 | lora CIDEr x100 |" in line for line in lines)
    rows = [line for line in lines if line.startswith("| 8 |")]
    assert len(rows) == 4
    d96 = [100 * (0.31 + 0.01 * s + 0.003 * (s % 2) - 0.30 - 0.01 * s) for s in range(5)]
    d384 = [100 * (0.20 + 0.01 * s - 0.10 - 0.02 * s) for s in range(5)]
    # one family, `long_context`, over both pairs' buckets (4 tests), not a family per pair or rank
    adjusted = holm([paired_p(d96), paired_p(d384), *(c["p"] for c in tests[2:])])
    assert [r.split("|")[-3].strip() for r in rows[:2]] == ["long_context"] * 2
    assert rows[0].split("|")[-2].strip() == f"{adjusted[0]:.3g}" and rows[1].split("|")[-2].strip() == \
        f"{adjusted[1]:.3g}"
    assert rows[0].split("|")[2].strip() == "96" and rows[1].split("|")[2].strip() == "384"
    # without pairs: every arm against the reference (the study plans that name none)
    default = long_context_tables(long_context_comparisons(arms, "lora", grid))
    assert sum(line.startswith("| rank |") for line in default) == 2
