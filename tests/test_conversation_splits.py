"""Your own data as real datasets are: many conversations per image and the image id reused as the record id
(LLaVA-Instruct-150K's convention). Splits by image (no image in two splits), reused ids kept, duplicates by
content, --dedupe policies, --strict before any shard is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.prepare_conversations import prepare_conversations
from data.stream import EvalStream, ShardSource

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is in the picture?", "Describe the colours.", "Is there anything unusual?"]


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for k in range(n):
        name = f"{k:012d}.jpg"  # COCO's file names
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def llava_file(root: Path, n_images: int = 30, repeat: int = 1, first: int | None = None, say: str = "answer") -> Path:
    """LLaVA format, 3 different conversations per image, each with the image's id as its `id`."""
    names = _images(root / "imgs", n_images)
    records = []
    for name in names[:first]:
        for q, question in enumerate(QUESTIONS):
            records.append({"id": name[:-4], "image": f"imgs/{name}", "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": f"{say} {q} about image {name[:-4]}"}]})
    path = root / "llava.json"
    path.write_text(json.dumps([r for r in records for _ in range(repeat)]))
    return path


def _found(out: Path) -> dict[str, dict]:
    found = {}
    for split in ("train", "val", "test"):
        for e in EvalStream(ShardSource.from_dir(out / "conversations" / split), rank=0, world_size=1):
            assert e["id"] not in found
            found[e["id"]] = {**e, "split": split}
    return found


def _image_of(record: dict) -> str:
    return record["id"].split("#")[0]


def test_three_conversations_per_image_id_are_all_kept_in_one_split_per_image(tmp_path):
    path = llava_file(tmp_path, 30)
    summary = prepare_conversations(tmp_path / "out", file=path, shard_size=16, workers=1, val_fraction=0.2,
                                    test_fraction=0.2)
    found = _found(tmp_path / "out")
    assert len(found) == 90 and summary["kept"] == 90 and summary["skipped"] == 0
    assert summary["ids_reused"] == 60 and summary["duplicates"] == 0
    splits_of = defaultdict(set)
    for record in found.values():
        splits_of[_image_of(record)].add(record["split"])
    assert all(len(s) == 1 for s in splits_of.values()), "an image's records are in one split"
    assert {next(iter(s)) for s in splits_of.values()} == {"train", "val", "test"}
    assert summary["images_in_several_splits"] == 0 and summary["split_by"] == "image"
    per_split = summary["splits"]
    assert sum(v["images"] for v in per_split.values()) == 30
    for split, v in per_split.items():
        mine = [r for r in found.values() if r["split"] == split]
        assert v["records"] == len(mine) and v["images"] == len({_image_of(r) for r in mine})
        assert v["assistant_turns"] == len(mine)
    answers = {tuple(m["content"] for m in r["messages"]) for r in found.values()}
    assert len(answers) == 90, "every conversation is there, none replaced by another with its id"


def test_exact_repeats_are_duplicates_and_the_policies_differ(tmp_path):
    path = llava_file(tmp_path, 10, repeat=2)
    content = prepare_conversations(tmp_path / "content", file=path, shard_size=16, workers=1)
    assert content["kept"] == 30 and content["duplicates"] == 30 and content["ids_reused"] == 20
    assert content["skipped_by_reason"] == {"duplicate record": 30}
    by_id = prepare_conversations(tmp_path / "id", file=path, shard_size=16, workers=1, dedupe="id")
    assert by_id["kept"] == 10 and by_id["skipped_by_reason"] == {"duplicate id": 50}
    off = prepare_conversations(tmp_path / "off", file=path, shard_size=16, workers=1, dedupe="off")
    assert off["kept"] == 60 and off["skipped"] == 0 and len(_found(tmp_path / "off")) == 60


def test_a_grown_file_keeps_every_old_record_in_its_split(tmp_path):
    small = prepare_conversations(tmp_path / "small", file=llava_file(tmp_path / "a", 30, first=20),
                                  shard_size=16, workers=1, val_fraction=0.2, test_fraction=0.2)
    grown = prepare_conversations(tmp_path / "grown", file=llava_file(tmp_path / "b", 30), shard_size=16,
                                  workers=1, val_fraction=0.2, test_fraction=0.2)
    assert small["kept"] == 60 and grown["kept"] == 90
    before, after = _found(tmp_path / "small"), _found(tmp_path / "grown")
    assert all(after[i]["split"] == before[i]["split"] for i in before)


def test_records_chained_by_shared_images_form_one_group(tmp_path):
    names = _images(tmp_path / "imgs", 12)
    records = [{"id": f"chain{k}", "images": [f"imgs/{names[k]}", f"imgs/{names[k + 1]}"], "messages": [
        {"role": "user", "content": "<image><image>\nsame?"}, {"role": "assistant", "content": "no"}]}
        for k in range(5)]  # 0-1, 1-2, ..., 4-5: one group of six images
    records += [{"id": f"solo{k}", "images": [f"imgs/{names[k]}"], "messages": [
        {"role": "user", "content": "<image>\nwhat?"}, {"role": "assistant", "content": "noise"}]} for k in range(12)]
    path = tmp_path / "chain.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = prepare_conversations(tmp_path / "out", file=path, shard_size=4, workers=1, val_fraction=0.3,
                                    test_fraction=0.3)
    found = _found(tmp_path / "out")
    group = {found[f"chain{k}"]["split"] for k in range(5)} | {found[f"solo{k}"]["split"] for k in range(6)}
    assert len(group) == 1 and summary["images_in_several_splits"] == 0


def test_files_per_split_keep_their_split_and_count_the_images_they_share(tmp_path):
    train = llava_file(tmp_path / "train", 6)
    test = llava_file(tmp_path / "test", 6, say="reply")  # the same images again: a leak the user should hear of
    summary = prepare_conversations(tmp_path / "out", splits={"train": train, "test": test}, shard_size=8, workers=1)
    assert summary["split_by"] == "files" and summary["images_in_several_splits"] == 6
    assert summary["splits"]["train"]["records"] == summary["splits"]["test"]["records"] == 18


@pytest.mark.parametrize("dedupe", ["content"])
def test_strict_stops_at_the_third_record_before_any_shard(tmp_path, dedupe):
    path = llava_file(tmp_path, 3)
    records = json.loads(path.read_text())
    records[2]["image"] = "nowhere.jpg"
    path.write_text(json.dumps(records))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "prepare", "conversations", "--file", str(path),
                           "--out", str(out), "--strict", "--dedupe", dedupe], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode != 0
    assert "record 2" in proc.stderr and "missing image" in proc.stderr and "nowhere.jpg" in proc.stderr
    assert not list(out.rglob("*.tar")), "no shard written"


def test_the_readme_example_of_a_reused_id(tmp_path):
    """README, "Many conversations per image": both records kept, the second under a derived id; a third, word
    for word the first, a duplicate."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("**Many conversations per image"):]
    records = json.loads(block[block.index("```json") + 7:block.index("```", block.index("```json") + 7)])
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    Image.new("RGB", (32, 24), (200, 20, 20)).save(tmp_path / records[0]["image"])
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([*records, records[0]]))
    summary = prepare_conversations(tmp_path / "out", file=path, shard_size=8, workers=1)
    ids = sorted(_found(tmp_path / "out"))
    assert ids[0] == "000000033471" and ids[1].startswith("000000033471#") and len(ids[1]) == len(ids[0]) + 9
    assert summary["ids_reused"] == 1 and summary["skipped_by_reason"] == {"duplicate record": 1}
