"""configs/smoke.yaml end to end through the CLI: every stage, every output a user looks for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_config_runs_every_stage(smoke_run):
    run, registry, cmd, env = smoke_run.run, smoke_run.registry, smoke_run.command, smoke_run.env
    assert f"structlora demo --registry {registry}" in smoke_run.stdout
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s for s, r in manifest["stages"].items() if r["status"] == "done"] == sorted(
        ["prepare", "base", "train", "eval", "merge", "publish"])
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"caption", "vqav2", "gqa", "long_context"} <= set(metrics["metrics"]) and metrics["base"]
    assert list(metrics["models"]) == ["adapted", "base"] and metrics["reference"] == "base"
    assert set(metrics["differences"]["adapted"]) >= {"caption.CIDEr", "vqav2.overall", "gqa.accuracy"}
    assert (run / "eval" / "long_context_cider.png").stat().st_size > 1000
    # both filler kinds (eval.long_context_filler: both): scored, compared with the base and drawn, bucket by bucket
    neutral = metrics["metrics"]["long_context_neutral"]
    assert sorted(neutral["buckets"]) == sorted(metrics["metrics"]["long_context"]["buckets"]) == ["160", "96"]
    assert "neutral" in neutral["filler"] and "captions" in metrics["metrics"]["long_context"]["filler"]
    assert {f"long_context{k}.{b}.CIDEr" for k in ("", "_neutral") for b in (96, 160)} <= set(
        metrics["differences"]["adapted"])
    assert (run / "eval" / "adapted" / "long_context_neutral_160_predictions.json").is_file()
    table = (run / "eval" / "long_context.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:] if line] == [
        "adapted", "adapted (neutral)", "base", "base (neutral)"]
    assert (run / "eval" / "adjacent_cosine.png").stat().st_size > 1000
    model = run / "merge" / "model"
    assert (model / "model.safetensors").is_file() and (model / "README.md").is_file()
    adapter = json.loads((run / "merge" / "peft_adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
    check = json.loads((run / "merge" / "merge_check.json").read_text())
    assert check["max_abs_diff"] <= check["tolerance"]
    entries = json.loads((registry / "index.json").read_text())["models"]
    assert [e["name"] for e in entries] == ["run"] and Path(entries[0]["path"]) == model.resolve()
    # a second run with the same config skips every stage
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("skipped") == 6


@pytest.mark.parametrize("impl", ["transformers", "timm"])
def test_vit_classification_runs_every_stage(tmp_path, impl):
    run = tmp_path / "vit"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    sets = ["model.arch=vit", f"model.vit_impl={impl}", "data.tasks={classification: 1.0}",
            "eval.tasks=[classification]", "adapter.projector=frozen", "adapter.language=frozen",
            f"publish.registry={tmp_path / 'reg'}", "base.max_steps=20", "train.max_steps=20"]
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "configs" / "smoke.yaml"), "--run-dir", str(run),
           *[x for s in sets for x in ("--set", s)]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["metrics"]["classification"]["top1"] <= 100 and "classification" in metrics["base"]
    if impl == "timm":  # the merged model is a plain timm model (build metadata + safetensors)
        from pipeline.models.vit import TimmClassifier, TimmImageProcessor

        model = TimmClassifier.from_pretrained(run / "merge" / "model")
        assert type(model.timm).__module__.startswith("timm.")
        assert TimmImageProcessor.from_pretrained(run / "merge" / "model").data_config["input_size"][1:] == (64, 64)
        train = json.loads((run / "train" / "final" / "summary.json").read_text())
        assert train["trainable_parameters"] > 0
    else:
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(run / "merge" / "model")
    assert model.config.num_labels == 5  # the shapes world's classes
    manifest = json.loads((run / "manifest.json").read_text())
    assert "skipped" in manifest["stages"]["publish"]["outputs"]
