"""`structlora eval`: several models, the same samples, official results files, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _procs import ROOT, cpu_env, torchrun

from eval.schemas import validate_results_file

TASKS = "caption,vqav2,gqa,long_context"


def eval_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "eval", *args]


def _ids(path: Path, key: str) -> list:
    return [r[key] for r in json.loads(path.read_text())]


@pytest.fixture(scope="module")
def three_models(smoke_run, tmp_path_factory):
    """base, merged and base + PEFT adapter of the smoke run, scored in one call."""
    run, out = smoke_run.run, tmp_path_factory.mktemp("eval") / "three"
    cmd = eval_command(f"base={run / 'base' / 'model'}", f"merged={run}", "--adapter",
                       f"adapter={run / 'merge' / 'peft_adapter'}", "--data", str(run), "--tasks", TASKS,
                       "--max-samples", "8", "--long-context-samples", "4", "--lengths", "96,160,600",
                       "--batch-size", "4", "--out", str(out))
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_models_are_scored_side_by_side_on_the_same_samples(three_models):
    out, proc = three_models
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["models"]) == ["base", "merged", "adapter"] and metrics["reference"] == "base"
    assert metrics["samples"] == {"caption": 8, "vqav2": 8, "gqa": 8, "long_context": 4}
    for task, key in (("caption", "image_id"), ("vqav2", "question_id"), ("gqa", "questionId")):
        ids = [_ids(out / name / f"{task}_predictions.json", key) for name in ("base", "merged", "adapter")]
        assert len(ids[0]) == 8 and ids[0] == ids[1] == ids[2]
    report = (out / "report.md").read_text()
    assert "| metric | base | merged | adapter | merged - base | adapter - base |" in report
    assert "## Differences against base" in report
    for name in ("merged", "adapter"):
        diffs = metrics["differences"][name]
        assert set(diffs) == {"caption.CIDEr", "vqav2.overall", "gqa.accuracy", "long_context.96.CIDEr",
                              "long_context.160.CIDEr"}
        for row in diffs.values():
            assert row["low"] <= row["difference"] <= row["high"]
    assert "# Evaluation: base, merged, adapter" in proc.stdout  # the report is printed
    for name in ("base", "merged", "adapter"):  # generation speed per model and task
        timings = metrics["timings"][name]
        assert set(timings) == {"caption", "vqav2", "gqa", "long_context"}
        assert all(t["samples_per_second"] > 0 for t in timings.values())
        assert timings["long_context"]["samples"] == 4 * 2  # images x buckets that fit
    assert "## Generation speed (samples/s, all ranks)" in report


def test_the_adapter_on_its_base_scores_as_the_merged_model(three_models):
    out, _ = three_models
    for name in ("caption", "vqav2", "gqa", "long_context_96", "long_context_160"):
        merged = json.loads((out / "merged" / f"{name}_predictions.json").read_text())
        adapter = json.loads((out / "adapter" / f"{name}_predictions.json").read_text())
        assert merged == adapter, name
    models = json.loads((out / "metrics.json").read_text())["models"]
    assert models["merged"] == models["adapter"]
    assert models["merged"] != models["base"]


def test_results_files_validate_against_the_official_schemas(three_models):
    out, _ = three_models
    for name in ("base", "merged", "adapter"):
        assert validate_results_file(out / name / "caption_predictions.json", "caption") == 8
        assert validate_results_file(out / name / "vqav2_predictions.json", "vqav2") == 8
        assert validate_results_file(out / name / "gqa_predictions.json", "gqa") == 8
        for bucket in (96, 160):
            assert validate_results_file(out / name / f"long_context_{bucket}_predictions.json", "caption") == 4
    models = json.loads((out / "metrics.json").read_text())["models"]
    for scores in models.values():  # what the harness found, in metrics.json and not marked in the report
        assert all(scores[t]["results_file"]["valid"] for t in ("caption", "vqav2", "gqa"))
        assert all(b["results_file"]["valid"] for b in scores["long_context"]["buckets"].values())
    assert "(invalid file)" not in (out / "report.md").read_text()


def test_long_context_has_a_line_per_model_and_says_why_a_bucket_was_skipped(three_models):
    out, proc = three_models
    assert (out / "long_context_cider.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "long_context.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:] if line] == ["base", "merged", "adapter"]
    assert "| run | 96 tok | 160 tok |" in table
    assert "long-context bucket 600 skipped: bucket 600 tokens + 64 new tokens exceed the model's 512 positions" \
        in proc.stdout
    lc = json.loads((out / "metrics.json").read_text())["models"]["merged"]["long_context"]
    assert sorted(lc["buckets"]) == ["160", "96"] and "600" in lc["skipped"]


def test_two_ranks_write_what_one_rank_writes(smoke_run, three_models, tmp_path):
    out, _ = three_models
    run = smoke_run.run
    cmd = torchrun(2, "-m", "pipeline.cli", "eval", f"merged={run}", "--data", str(run),
                   "--tasks", "caption,vqav2", "--max-samples", "8", "--batch-size", "4", "--out", str(tmp_path))
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "merged" / "caption_shards").iterdir()) == [
        "predictions.rank0.jsonl", "predictions.rank1.jsonl"]
    for task in ("caption", "vqav2"):
        assert json.loads((tmp_path / "merged" / f"{task}_predictions.json").read_text()) == \
            json.loads((out / "merged" / f"{task}_predictions.json").read_text())
    assert json.loads((tmp_path / "eval_config.json").read_text())["world_size"] == 2


def test_a_hub_id_without_network_is_a_one_line_error(smoke_run, tmp_path):
    env = dict(cpu_env(), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(eval_command("llava-hf/llava-1.5-7b-hf", "--data", str(smoke_run.run)), env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load 'llava-hf/llava-1.5-7b-hf'"), proc.stderr


@pytest.mark.parametrize("make, message", [
    (lambda run: [str(run / "merge" / "peft_adapter")], "is a PEFT adapter, not a model"),
    (lambda run: [str(run / "train")], "neither a model directory"),
    (lambda run: [str(run / "merge" / "model"), "--adapter", str(run / "merge" / "model")],
     "no adapter_config.json there"),
    (lambda run: [str(run), "--adapter", str(run / "merge" / "peft_adapter")], "is a run directory"),
    (lambda run: [f"a={run}", f"a={run / 'base' / 'model'}"], "two models are named 'a'"),
    (lambda run: [f"..={run}"], "cannot name a model"),
    (lambda run: [str(run), "--tasks", ","], "--tasks: none given"),
])
def test_what_is_not_a_model_is_named(smoke_run, make, message, capsys):
    from pipeline.cli import main

    assert main(["eval", *make(smoke_run.run), "--data", str(smoke_run.run)]) == 2
    assert message in capsys.readouterr().err


def test_bad_numbers_are_refused_by_the_parser(capsys):
    from pipeline.cli import main

    for flag, value in (("--batch-size", "0"), ("--max-samples", "-1"), ("--lengths", "256,abc")):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "m", "--data", ".", flag, value])
        assert exit_info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


def test_buckets_no_model_can_take_are_skipped_for_every_model(smoke_run, tmp_path, capsys):
    from pipeline.cli import main

    run = smoke_run.run
    assert main(["eval", f"base={run / 'base' / 'model'}", f"merged={run}", "--data", str(run), "--tasks",
                 "long_context", "--lengths", "20", "--long-context-samples", "2", "--out", str(tmp_path)]) == 0
    models = json.loads((tmp_path / "metrics.json").read_text())["models"]
    for name in ("base", "merged"):
        assert models[name]["long_context"]["buckets"] == {}
        assert "shorter than the prompt without any filler" in models[name]["long_context"]["skipped"]["20"]
    assert "long-context bucket 20 skipped" in capsys.readouterr().out
