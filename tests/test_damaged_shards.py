"""A damaged shard at the stage level, as a user meets it: the train and eval stages and `structlora eval`
stop with one line naming it, or (data.damaged_shards: skip / --damaged-shards skip) run without it and
say what was lost in the stage summary, manifest.json, metrics.json and the report's first lines; on one
process and on two ranks launched through configs/accelerate/cpu_ddp.yaml."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _procs import cpu_env, free_port, prepare_only, run_command

ROOT = Path(__file__).resolve().parents[1]
MICRO = [
    "data.shapes.images=120", "data.shard_size=10", "base.enabled=false", "eval.compare_base=false",
    "model.tiny.vision_layers=2", "model.tiny.text_layers=2", "adapter.rank=4", "adapter.alpha=8",
    "train.batch_size=4", "train.max_steps=8", "train.save_every=4", "train.eval_every=1000",
    "eval.tasks=[caption]", "eval.max_samples=1000",
]


def _cli(run_dir: Path, *args: str) -> list[str]:
    return run_command("smoke.yaml", run_dir, MICRO, *args)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_only(tmp_path_factory.mktemp("damaged") / "run", MICRO)


def _shard(folder: Path, index: int) -> tuple[Path, dict]:
    entry = json.loads((folder / "manifest.json").read_text())["shards"][index]
    return folder / entry["name"], entry


def _damage(run: Path) -> dict:
    """Same-size damage in a training shard, a truncated test shard; what each held."""
    shards = run / "prepare" / "shards"
    train, train_entry = _shard(shards / "vqav2" / "train", 0)
    data = bytearray(train.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    train.write_bytes(bytes(data))
    test, test_entry = _shard(shards / "caption" / "test", 1)
    test.write_bytes(test.read_bytes()[: test_entry["bytes"] // 2])
    held = sum(s["samples"] for s in json.loads((shards / "caption" / "test" / "manifest.json").read_text())["shards"])
    return {"train": train, "train_images": train_entry["samples"], "test": test, "test_images": test_entry["samples"],
            "test_held": held}


def _check_reports(run: Path, damage: dict, ranks: int) -> None:
    summary = json.loads((run / "train" / "final" / "summary.json").read_text())
    train = summary["data"]["train"]
    assert train["total"]["shards_left_out"] == 1 and train["images_left_out"] == damage["train_images"]
    assert [s["shard"] for s in train["shards_left_out"]] == [str(damage["train"])]
    assert "sha256" in train["shards_left_out"][0]["reason"] and train["per_epoch"] and train.get("ranks", 1) == ranks
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["train"]["outputs"]["data"]["train"]["total"] == train["total"]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    caption = metrics["data"]["eval"]["caption"]
    assert caption["holds"] == damage["test_held"] and caption["lost"] == damage["test_images"]
    assert caption["scored"] == damage["test_held"] - damage["test_images"]
    assert metrics["models"]["adapted"]["caption"]["num_images"] == caption["scored"]
    assert metrics["data"]["train"]["train"]["total"] == train["total"]
    first = (run / "eval" / "report.md").read_text().splitlines()[:6]
    said = f"caption: {caption['scored']} of {damage['test_held']} test examples scored, {damage['test_images']} lost"
    assert any(line.startswith("**Data lost") and said in line and damage["test"].name in line for line in first)
    assert any(line.startswith("**Training data lost (train stage):**") for line in first)


def test_one_process_stops_naming_the_shard_or_reports_what_skipping_it_lost(prepared, tmp_path):
    run = shutil.copytree(prepared, tmp_path / "run")
    damage = _damage(run)
    proc = subprocess.run(_cli(run, "--stages", "train,eval"), env=cpu_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: shard {damage['train']}: sha256 does not match")
    # the check is not part of any stage's config hash: skipping re-runs only what stopped
    proc = subprocess.run(_cli(run, "--stages", "train,eval,merge", "--set", "data.damaged_shards=skip"),
                          env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[prepare]" not in proc.stdout and "warning: data lost: train split" in proc.stdout
    _check_reports(run, damage, ranks=1)

    # structlora eval on the same data: stops naming the shard, or scores the rest and says what it lost
    cmd = [sys.executable, "-m", "pipeline.cli", "eval", str(run), "--data", str(run), "--tasks", "caption",
           "--out", str(tmp_path / "eval")]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.strip() .count("\n") == 0, proc.stderr[-2000:]
    assert str(damage["test"]) in proc.stderr and "truncated" in proc.stderr
    proc = subprocess.run([*cmd, "--damaged-shards", "skip"], env=cpu_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["data"]["eval"]["caption"]["lost"] == damage["test_images"]
    assert (tmp_path / "eval" / "report.md").read_text().splitlines()[2].startswith("**Data lost")


def test_two_ranks_launched_by_the_cpu_ddp_config_count_each_loss_once(prepared, tmp_path):
    run = shutil.copytree(prepared, tmp_path / "run")
    damage = _damage(run)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()),
           "-m", "pipeline.cli", *_cli(run, "--stages", "train,eval", "--set", "data.damaged_shards=skip")[3:]]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "train" / "final" / "summary.json").read_text())
    assert summary["world_size"] == 2
    _check_reports(run, damage, ranks=2)
