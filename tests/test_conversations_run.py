"""configs/conversations_example.yaml at smoke size, and a user's own files through `data.sources`: prepare ->
base -> train -> eval -> merge -> publish, then `structlora eval` of base and merged model on the held-out
conversations with the per-sample JSONL and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _procs import cpu_env, run_command

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.shapes.images=200", "data.shard_size=50", "base.max_steps=20", "train.max_steps=16",
         "train.save_every=8", "train.eval_every=8", "train.val_batches=2", "eval.max_samples=12",
         "model.tiny.vision_layers=2", "model.tiny.text_layers=2"]


def test_your_own_files_through_data_sources_run_every_stage_and_score(tmp_path):
    from data.shapes import write_shapes_world
    from data.shapes_conversations import write_shapes_conversations

    write_shapes_world(tmp_path / "world", seed=5, num_images=120, size=64)
    files = write_shapes_conversations(tmp_path / "world", tmp_path / "mine", "messages")
    source = ("data.sources=[{kind: conversations, conversations: {format: messages}, paths: {"
              + ", ".join(f"{s}: {f['file']}" for s, f in files.items()) + "}}]")
    run, registry = tmp_path / "run", tmp_path / "registry"
    cmd = run_command("conversations_example.yaml", run, [*SMALL, "data.shapes.conversations=none", source,
                                                           f"publish.registry={registry}"])
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    prepared = manifest["stages"]["prepare"]["outputs"]["sources"][0]
    assert prepared["task"] == "conversations" and prepared["kept"] == sum(f["records"] for f in files.values())
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    block = metrics["models"]["adapted"]["conversations"]
    assert block["headline"] == "exact_match" and block["num_samples"] == 12 and block["results_file"]["valid"]
    assert block["budget"]["setting"] == "default" and block["budget"]["max_new_tokens"] == 64
    assert "conversations.exact_match" in metrics["differences"]["adapted"]
    assert metrics["data"]["eval"]["conversations"]["scored"] == 12
    report = (run / "eval" / "report.md").read_text()
    assert "| conversations.exact_match |" in report and "the headline is exact_match" in report
    card = metrics["data"]["card"]  # the data card of the train stage, for this model, in the run's report
    assert "## Your data (data card)" in report and (run / "train" / "data_card.png").is_file()
    for split, counted in prepared["splits"].items():
        if counted["records"]:
            assert card["splits"][split]["records"] == counted["records"]
            assert card["splits"][split]["measured"] == min(counted["records"], 1000)
    rows = [json.loads(line) for line in (run / "eval" / "adapted" / "conversations_samples.jsonl").open()]
    assert len(rows) == 12 and set(rows[0]) == {"id", "prompt", "reference", "prediction", "hit_budget", "scores"}
    assert rows[0]["prompt"].rstrip().endswith("ASSISTANT:") and "</s>USER:" in rows[0]["prompt"]
    prompts = json.loads((run / "examples" / "prompts.json").read_text())  # the demo's examples, from test
    assert prompts and all((run / "examples" / name).is_file() for name in prompts)

    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "pipeline.cli", "eval", f"base={run / 'base' / 'model'}", f"merged={run}",
           "--data", str(run), "--tasks", "conversations", "--max-samples", "8", "--out", str(out)]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"base", "merged"}
    assert metrics["differences"]["merged"]["conversations.exact_match"]["items"] == 8
    for name in ("base", "merged"):
        assert len((out / name / "conversations_samples.jsonl").read_text().splitlines()) == 8
        assert len(json.loads((out / name / "conversations_predictions.json").read_text())) == 8
    assert "conversations.exact_match" in (out / "report.md").read_text()


def test_the_example_config_prepares_the_world_as_conversation_files(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(run_command("conversations_example.yaml", run, SMALL, "--stages", "prepare"),
                          env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in (run / "prepare" / "conversation_files").iterdir())
    assert files == ["shapes_test.json", "shapes_train.json", "shapes_val.json"]
    first = json.loads((run / "prepare" / "conversation_files" / "shapes_train.json").read_text())[0]
    assert first["conversations"][0]["from"] == "human" and not Path(first["image"]).is_absolute()
    for split in ("train", "val", "test"):
        assert (run / "prepare" / "shards" / "conversations" / split / "manifest.json").is_file()
        assert (run / "prepare" / "shards" / "vqav2" / split / "manifest.json").is_file()


def test_text_only_conversations_train_on_two_ranks(tmp_path):
    """Most samples text-only, batches of 2, plain LoRA: a rank whose batch has no image leaves the vision
    adapters without gradients, which DDP refuses ("make sure all forward function outputs participate in
    calculating loss", checked with train.find_unused_parameters=false); data with a conversations task turns
    find_unused_parameters on. (StructLoRA trains here either way: its coordinator sends gradients from the
    language tower to every adapted layer.)"""
    from _procs import torchrun

    from data.shapes import write_shapes_world
    from data.shapes_conversations import shapes_turns

    write_shapes_world(tmp_path / "world", seed=7, num_images=80, size=64)
    lines = []
    for i, (sample_id, image, turns) in enumerate(shapes_turns(tmp_path / "world", "train")):
        messages = [{"role": r, "content": t} for user, answer in turns[1:3] for r, t in (("user", user),
                                                                                         ("assistant", answer))]
        if i % 4 == 0:  # one in four sees its image
            messages[0]["content"] = "<image>\n" + messages[0]["content"]
        lines.append(json.dumps({"id": sample_id, "messages": messages, "images": [image] if i % 4 == 0 else []}))
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    sets = ["data.source=conversations", f"data.paths={{file: {data}}}", "data.tasks={conversations: 1.0}",
            "data.conversations.val_fraction=0.2", "data.conversations.test_fraction=0.2", "base.enabled=false",
            "eval.tasks=[conversations]", "eval.compare_base=false", "adapter.method=lora", "train.batch_size=2",
            "train.max_steps=8",
            "train.save_every=8", "train.eval_every=8", "model.tiny.vision_layers=2", "model.tiny.text_layers=2"]
    cli = run_command("smoke.yaml", run, sets, "--stages", "prepare,train")
    proc = subprocess.run(torchrun(2, "-m", "pipeline.cli", *cli[3:]), env=cpu_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "train" / "final" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]
