"""The demo's model registry and what it reads from a model directory and its run (no model loading)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from app.errors import DemoError
from app.registry import RegistryError, find_model, index_path, load_registry, register_model
from app.sources import RUN_INFO_NAME, ModelSource, metrics_rows


def _entry(name: str, path: str = "/models/m", **extra) -> dict:
    return {"name": name, "base_model": "base", "task": "caption", "metrics": {"adapted": {"CIDEr": 1.0}},
            "path": path, "run_dir": "/runs/r", "created": "2026-01-01T00:00:00+00:00", **extra}


def _model_dir(path: Path, run_info: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if run_info is not None:
        (path / RUN_INFO_NAME).write_text(json.dumps(run_info))
    return path


def test_register_creates_appends_and_replaces_by_name(tmp_path):
    registry = tmp_path / "registry"
    assert load_registry(registry) == []
    register_model(registry, _entry("a"))
    register_model(registry, _entry("b", method="lora"))
    register_model(registry, _entry("a", path="/models/a2"))
    entries = load_registry(registry)
    assert [e["name"] for e in entries] == ["a", "b"]
    assert entries[0]["path"] == "/models/a2"
    assert entries[1]["method"] == "lora"  # extra keys are kept
    assert find_model(entries, "b")["task"] == "caption"
    with pytest.raises(KeyError, match="known: a, b"):
        find_model(entries, "c")
    assert json.loads(index_path(registry).read_text())["models"] == entries
    assert sorted(p.name for p in registry.iterdir() if not p.name.startswith(".index.lock")) == ["index.json"]


def test_concurrent_publishers_lose_no_entry(tmp_path):
    registry = tmp_path / "registry"
    threads = [threading.Thread(target=register_model, args=(registry, _entry(f"m{i}"))) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e["name"] for e in load_registry(registry)) == sorted(f"m{i}" for i in range(16))


def test_failed_write_leaves_the_old_index(tmp_path, monkeypatch):
    registry = tmp_path / "registry"
    register_model(registry, _entry("a"))
    before = index_path(registry).read_text()

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("app.registry.json.dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        register_model(registry, _entry("b"))
    assert index_path(registry).read_text() == before
    assert not list(registry.glob("*.tmp"))


@pytest.mark.parametrize("document, match", [
    ("not json", "not valid JSON"),
    ('{"entries": []}', "field 'models' must be a list"),
    ('{"models": [{"name": "a"}]}', r"models\[0\]: field 'path'"),
    ('{"models": [{"name": "", "path": "/x"}]}', r"models\[0\]: field 'name'"),
])
def test_malformed_index_is_named(tmp_path, document, match):
    index_path(tmp_path).write_text(document)
    with pytest.raises(RegistryError, match=match) as info:
        load_registry(tmp_path)
    assert "index.json" in str(info.value)
    assert isinstance(info.value, DemoError)


def test_register_rejects_entry_without_path(tmp_path):
    with pytest.raises(RegistryError, match="field 'path'"):
        register_model(tmp_path, {"name": "a"})


def test_source_reads_run_info_relative_to_model_dir(tmp_path):
    run = tmp_path / "run"
    _model_dir(run / "base" / "model")
    model = _model_dir(run / "merge" / "model", {"base_model": "../../base/model", "run_dir": "../..",
                                                 "method": "structlora"})
    source = ModelSource.from_model_dir(model)
    assert source.name == "run"  # named after its run
    assert Path(source.base_model).resolve() == (run / "base" / "model").resolve()
    assert source.run_dir.resolve() == run.resolve()
    assert source.info["method"] == "structlora"


def test_source_keeps_hub_ids_and_lets_run_info_win_over_registry(tmp_path):
    model = _model_dir(tmp_path / "m", {"base_model": "llava-hf/llava-1.5-7b-hf", "run_dir": None})
    source = ModelSource.from_registry_entry(_entry("named", path="m", run_dir="runs/r"), tmp_path)
    assert source.model_dir == model and source.name == "named"
    assert source.base_model == "llava-hf/llava-1.5-7b-hf"  # structlora_run.json wins
    assert source.run_dir == tmp_path / "runs" / "r"  # null in the file: the registry fills the gap
    bare = ModelSource.from_model_dir(_model_dir(tmp_path / "bare"))
    assert bare.base_model is None and bare.run_dir is None and bare.plots() == [] and bare.metrics() is None


def test_source_errors_name_the_file(tmp_path):
    with pytest.raises(DemoError, match="no config.json"):
        ModelSource.from_model_dir(tmp_path / "missing")
    model = _model_dir(tmp_path / "m")
    (model / RUN_INFO_NAME).write_text("{oops")
    with pytest.raises(DemoError, match=RUN_INFO_NAME):
        ModelSource.from_model_dir(model)


def test_examples_plots_metrics_and_card(tmp_path):
    run = tmp_path / "run"
    model = _model_dir(run / "merge" / "model", {"run_dir": str(run)})
    (model / "README.md").write_text("---\ntags: [x]\n---\n\n# card\n")
    test_images = run / "prepare" / "world" / "images" / "test"
    test_images.mkdir(parents=True)
    for name in ("b.png", "a.jpg", "notes.txt"):
        (test_images / name).write_bytes(b"")
    (run / "eval").mkdir()
    (run / "eval" / "adjacent_cosine.png").write_bytes(b"")
    (run / "eval" / "metrics.json").write_text(json.dumps({
        "metrics": {"caption": {"metrics": {"CIDEr": 0.9}, "num_images": 5}, "vqav2": {"overall": 60.0}},
        "base": {"caption": {"metrics": {"CIDEr": 0.5}}}}))
    source = ModelSource.from_model_dir(model)
    assert [p.name for p in source.example_images()] == ["a.jpg", "b.png"]
    (model / "examples").mkdir()
    (model / "examples" / "shipped.png").write_bytes(b"")
    assert [p.name for p in source.example_images()] == ["shipped.png"]  # the model's own examples win
    assert [p.name for p in source.plots()] == ["adjacent_cosine.png"]
    assert source.model_card() == "# card"
    assert metrics_rows(source.metrics()) == [["caption.metrics.CIDEr", 0.5, 0.9, 0.4],
                                              ["vqav2.overall", None, 60.0, None]]


def test_metrics_rows_read_registry_headline_layout():
    rows = metrics_rows({"adapted": {"CIDEr": 1.2, "VQA": 70.0}, "base": {"CIDEr": 0.7, "VQA": 50.0}})
    assert rows == [["CIDEr", 0.7, 1.2, 0.5], ["VQA", 50.0, 70.0, 20.0]]
    assert metrics_rows(None) == [] and metrics_rows({}) == []
