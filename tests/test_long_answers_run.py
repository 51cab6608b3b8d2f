"""Long answers (20-60 words: the shapes world's captions joined, `data.shapes_conversations.long_answer`) through
the pipeline: trained, evaluated with `eval.max_new_tokens: {conversations: auto}` (no answer hits the budget, the
report says how it was measured), adapted > base on corpus CIDEr with the paired interval above 0, the merged
model's demo budget the same; then `structlora eval --max-new-tokens conversations=8`: answers cut, and counted.
About 70 s on 2 idle CPU cores (minutes on busy ones)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _procs import cpu_env, run_command

SIZE = ["data.shapes.images=400", "data.shard_size=100", "model.tiny.vision_layers=2", "model.tiny.text_layers=2",
        "base.max_steps=100", "base.batch_size=16", "train.max_steps=150", "train.save_every=150",
        "train.eval_every=150", "train.val_batches=2", "eval.max_samples=72"]


@pytest.mark.slow
def test_long_answers_fit_the_auto_budget_and_a_short_budget_cuts_them(tmp_path):
    from data.shapes import write_shapes_world
    from data.shapes_conversations import write_shapes_conversations

    write_shapes_world(tmp_path / "world", seed=5, num_images=600, size=64)
    files = write_shapes_conversations(tmp_path / "world", tmp_path / "long", "messages", answers="long")
    words = [len(json.loads(line)["messages"][-1]["content"].split())
             for f in files.values() for line in open(f["file"])]
    assert 20 <= min(words) and max(words) <= 60
    source = ("data.sources=[{kind: conversations, conversations: {format: messages}, paths: {"
              + ", ".join(f"{s}: {f['file']}" for s, f in files.items()) + "}}]")
    run = tmp_path / "run"
    sets = [*SIZE, "data.shapes.conversations=none", source, "data.tasks={conversations: 1.0}",
            "eval.tasks=[conversations]", "eval.max_new_tokens={conversations: auto}",
            f"publish.registry={tmp_path / 'registry'}"]
    proc = subprocess.run(run_command("conversations_example.yaml", run, sets), env=cpu_env(), capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    adapted, base = metrics["models"]["adapted"]["conversations"], metrics["models"]["base"]["conversations"]
    assert adapted["headline"] == "cider" and adapted["cider"] > base["cider"]
    row = metrics["differences"]["adapted"]["conversations.cider"]
    assert row["items"] == 72 and row["low"] > 0, row
    budget = adapted["budget"]
    assert budget["setting"] == "auto" and budget["answers"] == 72 and budget["hit"] == 0 == base["budget"]["hit"]
    assert budget["auto"]["answers"] == files["train"]["records"] and budget["auto"]["longer_than_budget"] == 0
    report = (run / "eval" / "report.md").read_text()
    assert f"adapted conversations: 0 of 72 answers hit the {budget['max_new_tokens']}-token budget (auto = " in report
    style = json.loads((run / "merge" / "model" / "structlora_inference.json").read_text())
    assert style["questions"] == "chat" and style["answer_max_new_tokens"] == budget["max_new_tokens"]

    out = tmp_path / "eval8"
    cmd = [sys.executable, "-m", "pipeline.cli", "eval", f"base={run / 'base' / 'model'}", f"merged={run}",
           "--data", str(run), "--tasks", "conversations", "--max-samples", "72", "--max-new-tokens",
           "conversations=8", "--out", str(out)]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cut = json.loads((out / "metrics.json").read_text())["models"]["merged"]["conversations"]["budget"]
    assert cut["max_new_tokens"] == 8 and cut["setting"] == "given" and cut["hit"] > 0
    assert f"merged conversations: {cut['hit']} of 72 answers hit the 8-token budget (configured)" in \
        (out / "report.md").read_text()
    rows = [json.loads(line) for line in (out / "merged" / "conversations_samples.jsonl").open()]
    assert sum(r["hit_budget"] for r in rows) == cut["hit"]
