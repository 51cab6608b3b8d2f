"""The config system: every YAML loads, and every mistake is named (file and dotted key)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import apply_overrides, from_dict, load_config, save_config, to_dict
from pipeline.errors import ConfigError
from pipeline.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in RUN_CONFIGS}
    assert {"tiny.yaml", "llava15_7b_coco.yaml", "llava15_7b_vqav2.yaml", "llava15_7b_gqa.yaml",
            "vit_b16_cifar100.yaml"} <= names


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(RunConfig, path)
    assert isinstance(cfg, RunConfig)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), f"{path.name} must open with a comment giving its launch command"
    assert "structlora run" in path.read_text() or "pipeline.cli run" in path.read_text()
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(RunConfig, tmp_path / "resolved.yaml")
    assert to_dict(again) == to_dict(cfg)


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_is_named_with_the_file_and_a_suggestion(tmp_path):
    path = _write(tmp_path, {"train": {"max_step": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, path)
    msg = str(err.value)
    assert str(path) in msg and "unknown key 'train.max_step'" in msg and "train.max_steps" in msg
    assert "\n" not in msg


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        load_config(RunConfig, _write(tmp_path, {"trian": {}}))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, _write(tmp_path, {"train": {"max_steps": "ten"}}))
    assert "train.max_steps: expected int, got str 'ten'" in str(err.value)


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match="adapter.rank: expected int"):
        load_config(RunConfig, _write(tmp_path, {"adapter": {"rank": True}}))


def test_literal_choices_are_listed(tmp_path):
    with pytest.raises(ConfigError, match=r"adapter.method: expected one of 'structlora', 'lora'"):
        load_config(RunConfig, _write(tmp_path, {"adapter": {"method": "lroa"}}))


def test_cross_field_validation_names_the_section(tmp_path):
    with pytest.raises(ConfigError, match=r"bad.yaml: model: give exactly one of"):
        load_config(RunConfig, _write(tmp_path, {"model": {"preset": None}}))


def test_missing_required_field():
    from dataclasses import dataclass

    @dataclass
    class Needs:
        path: str
        n: int = 1

    with pytest.raises(ConfigError, match=r"cfg.yaml: missing required key 'path'"):
        from_dict(Needs, {"n": 2}, source="cfg.yaml")


def test_float_fields_accept_yaml_exponent_strings(tmp_path):
    cfg = load_config(RunConfig, _write(tmp_path, {"train": {"lr": "3e-4"}}))
    assert cfg.train.lr == pytest.approx(3e-4)


def test_dotted_overrides(tmp_path):
    path = ROOT / "configs" / "tiny.yaml"
    cfg = load_config(RunConfig, path, ["train.max_steps=7", "adapter.method=lora", "data.tasks.caption=0.5"])
    assert cfg.train.max_steps == 7 and cfg.adapter.method == "lora" and cfg.data.tasks["caption"] == 0.5


def test_override_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"--set train.max_stepz=1: unknown key 'train.max_stepz'"):
        apply_overrides({}, ["train.max_stepz=1"], RunConfig)


def test_override_bad_type_names_the_key():
    path = ROOT / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"train.batch_size: expected int, got str 'big'"):
        load_config(RunConfig, path, ["train.batch_size=big"])


def test_override_needs_equals_sign():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.max_steps"], RunConfig)


def test_not_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML at line"):
        load_config(RunConfig, path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RunConfig, tmp_path / "nope.yaml")


def _save_many(path: str, n: int) -> None:
    cfg = load_config(RunConfig, ROOT / "configs" / "tiny.yaml", [])
    for _ in range(n):
        save_config(cfg, Path(path))


def test_ranks_saving_the_config_at_once_do_not_collide(tmp_path):
    """Every rank of a launch saves the run's config.yaml before the ranks know each other."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    path = tmp_path / "config.yaml"
    procs = [ctx.Process(target=_save_many, args=(str(path), 300)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    assert load_config(RunConfig, path, []) == load_config(RunConfig, ROOT / "configs" / "tiny.yaml", [])
    assert [f.name for f in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left behind
