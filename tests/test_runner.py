"""The staged runner: skips finished stages, re-runs on a changed config slice, invalidates downstream."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import UserError
from pipeline.schema import RunConfig
from pipeline.stages import runner


@pytest.fixture
def fake_stages(monkeypatch):
    calls: list[str] = []

    def make(name):
        def fn(ctx):
            calls.append(name)
            (ctx.stage_dir(name) / "out.txt").write_text(name)
            return {"name": name}
        return fn

    monkeypatch.setattr(runner, "_stage_functions", lambda: {s: make(s) for s in runner.STAGES})
    return calls


def _cfg(**train):
    cfg = RunConfig()
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_runs_in_order_then_skips(fake_stages, tmp_path):
    runner.run_stages(_cfg(), tmp_path)
    assert fake_stages == runner.STAGES
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in runner.STAGES)
    assert manifest["stages"]["train"]["env"]["packages"]["torch"]
    fake_stages.clear()
    runner.run_stages(_cfg(), tmp_path)
    assert fake_stages == []


def test_changed_slice_reruns_that_stage_and_downstream(fake_stages, tmp_path):
    runner.run_stages(_cfg(), tmp_path)
    fake_stages.clear()
    (tmp_path / "train" / "stale.txt").write_text("old checkpoint")
    runner.run_stages(_cfg(lr=0.5), tmp_path)
    assert fake_stages == ["train", "eval", "merge", "publish"]
    assert not (tmp_path / "train" / "stale.txt").exists()


def test_upstream_change_discards_downstream_checkpoints(fake_stages, tmp_path):
    runner.run_stages(_cfg(), tmp_path)
    (tmp_path / "train" / "checkpoints").mkdir()
    (tmp_path / "base" / "checkpoints").mkdir()
    fake_stages.clear()
    cfg = _cfg()
    cfg.data.shard_size = 7  # changes prepare and, through it, every later stage
    runner.run_stages(cfg, tmp_path)
    assert fake_stages == runner.STAGES
    assert not (tmp_path / "train" / "checkpoints").exists() and not (tmp_path / "base" / "checkpoints").exists()


def test_from_stage_forces_a_fresh_rerun(fake_stages, tmp_path):
    runner.run_stages(_cfg(), tmp_path)
    (tmp_path / "train" / "checkpoints").mkdir()
    fake_stages.clear()
    runner.run_stages(_cfg(), tmp_path, from_stage="train")
    assert fake_stages == ["train", "eval", "merge", "publish"]
    assert not (tmp_path / "train" / "checkpoints").exists()


def test_killed_stage_resumes_with_its_checkpoints(fake_stages, tmp_path):
    runner.run_stages(_cfg(), tmp_path, stages=["prepare", "base"])
    manifest = runner.Manifest(tmp_path / "manifest.json")
    manifest.update("train", status="running", hash=runner.config_hash(_cfg(), "train"))
    (tmp_path / "train" / "checkpoints").mkdir(parents=True)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "stale.json").write_text("{}")
    fake_stages.clear()
    runner.run_stages(_cfg(), tmp_path)
    assert fake_stages == ["train", "eval", "merge", "publish"]
    assert (tmp_path / "train" / "checkpoints").is_dir()  # kept: the recipe resumes from it
    assert not (tmp_path / "eval" / "stale.json").exists()


def test_unknown_stage_is_named(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("seed: 1\n")
    with pytest.raises(UserError, match="unknown stage 'trian'"):
        runner.run_config(cfg_path, [], stages=["trian"], run_dir=tmp_path / "run")


def test_corrupt_manifest_is_reported(tmp_path):
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(UserError, match="corrupt manifest"):
        runner.Manifest(tmp_path / "manifest.json")


def test_hash_depends_on_upstream_slices():
    a, b = RunConfig(), RunConfig()
    b.data.shard_size = 7
    assert runner.config_hash(a, "train") != runner.config_hash(b, "train")
    c = RunConfig()
    c.publish.name = "x"
    assert runner.config_hash(a, "train") == runner.config_hash(c, "train")
    # what only the train stage reads (long-context training examples) re-runs train, not prepare and base
    d = RunConfig()
    d.data.long_context.share = 0.5
    d.model.quantization = "nf4"  # the base stage trains the float base; training loads it quantized
    assert all(runner.config_hash(a, s) == runner.config_hash(d, s) for s in ("prepare", "base"))
    assert runner.config_hash(a, "train") != runner.config_hash(d, "train")


def test_keys_added_later_leave_the_hashes_of_older_runs_alone(monkeypatch):
    """A run written before model.quantization / double_quant, merge.quantization_paths, data.long_context.per and
    eval.max_new_tokens existed hashes as it did (an upgrade re-runs nothing), as long as they hold the value that behaves as before."""
    cfg = RunConfig()
    now = {s: runner.config_hash(cfg, s) for s in runner.STAGES}
    original = runner.to_dict

    def as_before(c):
        d = original(c)
        d["model"].pop("quantization"), d["model"].pop("double_quant"), d["merge"].pop("quantization_paths")
        d["data"]["long_context"].pop("per"), d["eval"].pop("max_new_tokens")
        return d

    monkeypatch.setattr(runner, "to_dict", as_before)
    assert {s: runner.config_hash(cfg, s) for s in runner.STAGES} == now
    monkeypatch.setattr(runner, "to_dict", original)
    cfg.model.quantization = "nf4"
    assert runner.config_hash(cfg, "base") == now["base"] and runner.config_hash(cfg, "train") != now["train"]
    cfg = RunConfig()
    cfg.eval.max_new_tokens = {**cfg.eval.max_new_tokens, "conversations": "auto"}  # re-runs eval and what follows
    assert runner.config_hash(cfg, "train") == now["train"] and runner.config_hash(cfg, "eval") != now["eval"]
