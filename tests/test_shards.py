"""prepare_*: official files -> WebDataset shards, with skipped records reported and counted."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from test_shards_fixtures import make_coco, make_gqa, make_imagefolder, make_vqav2

from data.errors import DataError
from data.prepare import prepare_coco, prepare_gqa, prepare_imagefolder, prepare_shapes_shards, prepare_vqav2
from data.shapes import write_shapes_world
from data.shards import MANIFEST_NAME, file_sha256, load_shards


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over all shards of `out`, in manifest order."""
    samples: dict[str, dict[str, bytes]] = {}
    for url in load_shards(out, verify=True).urls:
        with tarfile.open(url) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _reasons(summary: dict) -> list[tuple[str, str]]:
    return [(p["where"], p["reason"]) for p in summary["problems"]]


def test_prepare_coco_groups_captions_and_reports_skips(tmp_path):
    captions, images = make_coco(tmp_path / "coco")
    summary = prepare_coco(captions, images, tmp_path / "out", shard_size=2)
    # images 1-6 are written (6 is truncated: only the reader can tell); 7 is missing, 8 malformed
    assert summary["samples"] == 6 and summary["shards"] == 3
    assert summary["units"] == sum(1 + i % 3 for i in range(1, 7))
    reasons = _reasons(summary)
    n = sum(1 + i % 3 for i in range(1, 8))  # well-formed caption annotations come first
    assert ("captions_val2014.json images[7]", "malformed record: missing field 'file_name'") in reasons
    assert (f"captions_val2014.json annotations[{n}]", "malformed record: missing field 'caption'") in reasons
    assert (f"captions_val2014.json annotations[{n + 1}]", "unknown image_id: 42") in reasons
    assert any(w == "image_id 7" and r.startswith("missing image: COCO_val2014_000000000007.jpg") for w, r in reasons)
    assert summary["skipped"] == 1 + 1 + 1 + (1 + 7 % 3)  # image 7 carried 2 captions
    assert summary["skipped_by_reason"] == {"malformed record": 2, "unknown image_id": 1, "missing image": 2}
    samples = _samples(tmp_path / "out")
    assert set(samples) == {str(i) for i in range(1, 7)}
    meta = json.loads(samples["3"]["json"])
    assert meta["task"] == "caption" and meta["image_id"] == 3 and len(meta["captions"]) == 1 + 3 % 3
    assert samples["1"]["jpg"] == (images / "COCO_val2014_000000000001.jpg").read_bytes(), "original bytes"
    assert set(samples["5"]) == {"png", "json"}, "extension from the real format, not the file name"
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 2] and manifest["skipped"] == summary["skipped"]


def test_prepare_vqav2_keeps_ten_answers_per_question(tmp_path):
    summary = prepare_vqav2(*make_vqav2(tmp_path / "vqa"), tmp_path / "out", shard_size=100)
    assert summary["samples"] == 6 and summary["units"] == 12
    reasons = _reasons(summary)
    assert any(w.endswith("questions[14]") and "missing field 'question'" in r for w, r in reasons)
    assert any(w.endswith("questions[15]") and "no annotation: question_id 1998" in r for w, r in reasons)
    assert any(w == "image_id 7" and r.startswith("missing image") for w, r in reasons)
    assert summary["skipped"] == 1 + 1 + 2
    meta = json.loads(_samples(tmp_path / "out")["2"]["json"])
    assert [q["question_id"] for q in meta["questions"]] == [2000, 2001]
    assert meta["questions"][0]["answers"] == ["yes"] * 9 + ["no"]
    assert meta["questions"][0]["multiple_choice_answer"] == "yes"


def test_prepare_gqa_keeps_types_and_balance(tmp_path):
    summary = prepare_gqa(*make_gqa(tmp_path / "gqa"), tmp_path / "out", shard_size=10)
    assert (summary["samples"], summary["units"], summary["skipped"]) == (1, 2, 2)
    assert ("question '202223768'", "malformed record: missing field 'answer'") in _reasons(summary)
    meta = json.loads(_samples(tmp_path / "out")["2354786"]["json"])
    first = meta["questions"][0]
    assert first["isBalanced"] is True and first["types"]["structural"] == "verify"
    assert first["fullAnswer"] == "Yes, the sky is dark."


def test_prepare_imagefolder_labels(tmp_path):
    summary = prepare_imagefolder(make_imagefolder(tmp_path / "root"), tmp_path / "out", shard_size=4)
    assert (summary["samples"], summary["shards"], summary["skipped"]) == (6, 2, 1)
    assert summary["classes"] == ["cat", "dog"]
    labels = {json.loads(s["json"])["class_name"]: json.loads(s["json"])["label"]
              for s in _samples(tmp_path / "out").values()}
    assert labels == {"cat": 0, "dog": 1}
    with pytest.raises(DataError, match="not in the class list"):
        prepare_imagefolder(tmp_path / "root", tmp_path / "out2", classes=["cat"])


def test_missing_or_malformed_inputs_stop_before_any_work(tmp_path):
    captions, images = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="nope.json"):
        prepare_coco(tmp_path / "nope.json", images, out, 10)
    with pytest.raises(DataError, match="image folder not found: .*missing_dir"):
        prepare_coco(captions, tmp_path / "missing_dir", out, 10)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json is not valid JSON"):
        prepare_coco(bad, images, out, 10)
    bad.write_text(json.dumps({"images": {}, "annotations": []}))
    with pytest.raises(DataError, match="list field 'images'"):
        prepare_coco(bad, images, out, 10)
    questions, annotations, images = make_vqav2(tmp_path / "vqa")
    with pytest.raises(DataError, match="VQAv2 annotations file not found"):
        prepare_vqav2(questions, tmp_path / "none.json", images, out, 10)
    assert not out.exists() and not list(tmp_path.glob(".out*")), "nothing written"


def test_shards_are_deterministic_and_checked(tmp_path):
    captions, images = make_coco(tmp_path / "coco")
    a = prepare_coco(captions, images, tmp_path / "a", shard_size=4)
    prepare_coco(captions, images, tmp_path / "b", shard_size=4)
    manifest = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())
    for shard in manifest["shards"]:
        assert file_sha256(tmp_path / "a" / shard["name"]) == shard["sha256"]
        assert (tmp_path / "a" / shard["name"]).read_bytes() == (tmp_path / "b" / shard["name"]).read_bytes()
    assert a["shards"] == 2 and not list((tmp_path / "a").glob(".*")), "no temporary files left"
    first = tmp_path / "a" / manifest["shards"][0]["name"]
    data = first.read_bytes()
    first.write_bytes(data[:-1024])  # a half-copied shard
    with pytest.raises(DataError, match="truncated"):
        load_shards(tmp_path / "a")
    first.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, different bytes
    load_shards(tmp_path / "a")
    with pytest.raises(DataError, match="sha256"):
        load_shards(tmp_path / "a", verify=True)


def test_interrupted_prepare_leaves_previous_output_and_resumes(tmp_path, monkeypatch):
    captions, images = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    prepare_coco(captions, images, out, shard_size=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import data.shards

    calls = {"n": 0}
    original = data.shards.ShardWriter.write

    def dying_write(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed in the middle of the second shard
        return original(self, *args, **kwargs)

    monkeypatch.setattr(data.shards.ShardWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_coco(captions, images, out, shard_size=2, workers=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    partial = tmp_path / ".out.partial"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial", "coco", "out"]
    assert not list(partial.glob(".*tmp*")), "the shard being written when killed is not left half-done"
    monkeypatch.setattr(data.shards.ShardWriter, "write", original)
    (partial / "shard-000000.tar").write_bytes(b"damaged")  # a kept shard must pass its sha256
    result = prepare_coco(captions, images, out, shard_size=2, workers=1)
    assert result["resumed_shards"] == 0
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(data.shards.ShardWriter, "write", dying_write)
        calls["n"] = 0
        prepare_coco(captions, images, out, shard_size=2, workers=1)
    monkeypatch.setattr(data.shards.ShardWriter, "write", original)
    result = prepare_coco(captions, images, out, shard_size=2, workers=1)
    assert result["resumed_shards"] == 1  # the first shard was finished before the kill: kept
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # same bytes as an uninterrupted prepare
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "out"]


def test_parallel_prepare_writes_the_same_bytes_as_one_process(tmp_path):
    captions, images = make_coco(tmp_path / "coco")
    one = prepare_coco(captions, images, tmp_path / "one", shard_size=2, workers=1)
    two = prepare_coco(captions, images, tmp_path / "two", shard_size=2, workers=2)
    assert one["workers"] == 1 and two["workers"] == 2 and two["images_per_second"] > 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())
    for path in (tmp_path / "one").iterdir():
        assert path.read_bytes() == (tmp_path / "two" / path.name).read_bytes(), path.name
    assert one["skipped"] == two["skipped"] and one["problems"] == two["problems"]


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    captions, images = make_coco(tmp_path / "coco")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="refusing to overwrite"):
        prepare_coco(captions, images, tmp_path / "out", 10)
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_shards_are_written_by_webdataset_and_read_back_by_it(tmp_path):
    import webdataset as wds

    captions, images = make_coco(tmp_path / "coco")
    prepare_coco(captions, images, tmp_path / "out", 2)
    shards = load_shards(tmp_path / "out")
    keys = [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList(shards.urls), wds.tarfile_to_samples())]
    assert len(keys) == len(shards) and all(k.isdigit() for k in keys)


def test_shapes_world_converts_with_the_same_code(tmp_path):
    world = write_shapes_world(tmp_path / "world", seed=5, num_images=40, size=32)
    index = prepare_shapes_shards(tmp_path / "world", tmp_path / "shards", shard_size=8)
    for split, counts in world["splits"].items():
        tasks = {task: index["tasks"][task][split] for task in index["tasks"]}
        assert tasks["caption"]["samples"] == counts["images"] and tasks["caption"]["units"] == counts["captions"]
        assert tasks["vqav2"]["units"] == counts["vqav2_questions"]
        assert tasks["gqa"]["units"] == counts["gqa_questions"]
        assert tasks["classification"]["samples"] == counts["classification_images"]
        assert all(t["skipped"] == 0 for t in tasks.values())
        assert len(load_shards(tmp_path / "shards" / "caption" / split)) == counts["images"]
    assert json.loads((tmp_path / "shards" / "index.json").read_text())["tasks"] == index["tasks"]


def test_the_shapes_world_honours_prepare_workers_with_the_same_bytes(tmp_path, monkeypatch):
    import data.prepare as prepare
    from data.shapes import write_shapes_world
    from pipeline.context import StageContext
    from pipeline.schema import RunConfig
    from pipeline.stages.prepare import stage_prepare

    write_shapes_world(tmp_path / "world", seed=1, num_images=40, size=32)
    one = prepare.prepare_shapes_shards(tmp_path / "world", tmp_path / "one", 3, workers=1)
    two = prepare.prepare_shapes_shards(tmp_path / "world", tmp_path / "two", 3, workers=2)
    assert one["tasks"] == two["tasks"]
    for task, splits in one["tasks"].items():
        for split in splits:
            manifests = [json.loads((tmp_path / r / task / split / MANIFEST_NAME).read_text()) for r in ("one", "two")]
            assert [s["sha256"] for s in manifests[0]["shards"]] == [s["sha256"] for s in manifests[1]["shards"]]
    seen = []
    real = prepare.prepare_coco
    monkeypatch.setattr(prepare, "prepare_coco", lambda *a, **k: seen.append(a[4] if len(a) > 4 else k) or real(*a, **k))
    cfg = RunConfig()
    cfg.data.shapes.images, cfg.data.shapes.size, cfg.data.prepare_workers = 40, 32, 2
    stage_prepare(StageContext(cfg=cfg, run_dir=tmp_path / "run"))
    assert seen and set(seen) == {2}, "data.prepare_workers reaches the shapes world's writers"
