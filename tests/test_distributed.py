"""Real processes: two-rank DDP on CPU, and a run killed with SIGKILL that resumes exactly.

Both drive the CLI in subprocesses on a micro shapes world (the prepare stage runs once per
module); they take about a minute together.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _procs import cpu_env, kill_train_after_checkpoints, prepare_only, run_command, torchrun
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
MICRO = [
    "data.shapes.images=120", "data.shard_size=10", "base.enabled=false", "eval.compare_base=false",
    "model.tiny.vision_layers=2", "model.tiny.text_layers=2", "adapter.rank=4", "adapter.alpha=8",
    "train.batch_size=4", "train.lr=0.002", "train.log_every=5", "train.eval_every=1000",
]


def _env() -> dict[str, str]:
    return cpu_env()


def _cli(run_dir: Path, *args: str) -> list[str]:
    return run_command("smoke.yaml", run_dir, MICRO, *args)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_only(tmp_path_factory.mktemp("prepared") / "run", MICRO)


def _copy(prepared: Path, dest: Path) -> Path:
    shutil.copytree(prepared, dest)
    return dest


def _on_two_ranks(run_dir: Path, *args: str) -> None:
    """`structlora run` (the micro smoke config, `args` appended) under torchrun with two gloo ranks."""
    proc = subprocess.run(torchrun(2, "-m", "pipeline.cli", *_cli(run_dir, *args)[3:]), env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _trained_on_two_ranks(run_dir: Path, steps: int) -> dict:
    """The train summary of a two-rank run of `steps` steps; both ranks ended with the same adapter."""
    summary = json.loads((run_dir / "train" / "final" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == steps
    first, second = summary["rank_checksums"]
    assert first == second, "the two ranks ended with different adapters"
    return summary


def test_two_process_ddp_on_cpu(prepared, tmp_path):
    run = _copy(prepared, tmp_path / "ddp")
    _on_two_ranks(run, "--stages", "train", "--set", "train.max_steps=12", "--set", "train.save_every=6")
    _trained_on_two_ranks(run, 12)
    shards = [json.loads((run / "train" / f"shards.rank{r}.json").read_text()) for r in (0, 1)]
    for task in shards[0]["workers"][0]:
        mine, theirs = set(shards[0]["workers"][0][task]), set(shards[1]["workers"][0][task])
        assert mine and theirs and not mine & theirs, f"{task}: ranks share shards"
    markers = [json.loads((p / "COMPLETE").read_text()) for p in (run / "train" / "checkpoints").glob("step-*")]
    assert markers and all(m["writer_rank"] == 0 and m["world_size"] == 2 for m in markers)
    assert not list((run / "train" / "checkpoints").glob(".tmp-*"))

    # eval on the same 2 ranks: generation (long-context captioning too) sharded, scored once on rank 0
    _on_two_ranks(run, "--stages", "eval", "--set", "train.max_steps=12", "--set", "train.save_every=6",
                  "--set", "eval.max_samples=6", "--set", "eval.long_context_samples=5")
    metrics = json.loads((run / "eval" / "metrics.json").read_text())["metrics"]
    buckets = metrics["long_context"]["buckets"]
    assert buckets and all(b["num_images"] == 5 for b in buckets.values()), buckets
    for task in ("caption", "vqav2", "gqa"):
        shards = sorted(p.name for p in (run / "eval" / "adapted" / f"{task}_shards").glob("predictions.rank*"))
        assert shards == ["predictions.rank0.jsonl", "predictions.rank1.jsonl"], shards
    assert len(json.loads((run / "eval" / "adapted" / "caption_predictions.json").read_text())) == 6


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "train" / "final" / "trainable.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted(prepared, tmp_path):
    steps = ["--stages", "train", "--set", "train.max_steps=60", "--set", "train.save_every=10",
             "--set", "train.keep_last=3"]
    reference = _copy(prepared, tmp_path / "reference")
    subprocess.run(_cli(reference, *steps), check=True, env=_env(), capture_output=True, timeout=600)

    killed = _copy(prepared, tmp_path / "killed")
    kill_train_after_checkpoints(_cli(killed, *steps), killed, timeout=300)
    ckpts = killed / "train" / "checkpoints"
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "running"
    # the newest checkpoint is damaged as a kill during its write could leave it: resume must use the previous
    newest = sorted(p for p in ckpts.glob("step-*"))[-1]
    (newest / "trainable.safetensors").write_bytes(b"\0" * 64)

    resumed = subprocess.run(_cli(killed, *steps), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "is unusable (checksum mismatch in trainable.safetensors)" in resumed.stderr
    summary = json.loads((killed / "train" / "final" / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["resumed_from"] < 60
    expected, got = _final(reference), _final(killed)
    assert expected.keys() == got.keys()
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert worst < 1e-6, f"resumed adapter differs by {worst}"


def test_two_process_ddp_on_an_nf4_base(prepared, tmp_path):
    """QLoRA on two gloo ranks (LLaMA-Factory's `quantization_bit: 4` with DDP): the preset (no base stage) is saved
    where the base stage would save it and loaded 4-bit by both ranks, both end with the same adapter, and the merge
    (main process only, while the other rank waits: no collective may hide in loading the base) is exact."""
    pytest.importorskip("bitsandbytes")
    run = _copy(prepared, tmp_path / "ddp_nf4")
    _on_two_ranks(run, "--stages", "train,merge", "--set", "train.max_steps=6", "--set", "train.save_every=3",
                  "--set", "model.quantization=nf4")
    _trained_on_two_ranks(run, 6)
    assert (run / "base" / "model" / "config.json").is_file() and not list((run / "base").glob("model.tmp*"))
    check = json.loads((run / "merge" / "merge_check.json").read_text())
    assert check["quantization"] == "nf4" and check["max_abs_diff"] < 1e-5
    losses = [json.loads(line)["train/loss"] for line in (run / "train" / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert losses and all(loss == loss for loss in losses)
