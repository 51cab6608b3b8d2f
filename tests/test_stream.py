"""Streaming loaders: exactly-once evaluation over ranks x workers, reproducible training,
corrupt data skipped and counted, no pickle, no pipe: unless allowed."""

from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from test_shards_fixtures import make_coco, make_vqav2
from torch.utils.data import DataLoader

from data.errors import DataError
from data.prepare import prepare_coco, prepare_shapes_shards, prepare_vqav2
from data.shapes import write_shapes_world
from data.shards import MANIFEST_NAME, ShardWriter, write_manifest
from data.stream import EvalStream, ShardSource, SkipCounter, TrainStream, collate_with_stats, shapes_sources


@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    write_shapes_world(root / "world", seed=2, num_images=120, size=32)
    prepare_shapes_shards(root / "world", root / "shards", shard_size=7)
    return root / "shards"


def _keys(dataset, num_workers: int) -> list[str]:
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [example["__key__"] for example in loader]


@pytest.mark.parametrize("task", ["vqav2", "caption"])  # many shards (split by shard) / few (by sample)
def test_eval_stream_yields_every_example_once_over_2_ranks_x_2_workers(shapes_shards, task, tmp_path):
    if task == "vqav2":
        source = ShardSource.from_dir(shapes_shards / "vqav2" / "train")
        assert len(source.urls) >= 4
    else:  # 2 shards for 4 streams
        world = shapes_shards.parent / "world" / "annotations"
        prepare_coco(world / "captions_val.json", shapes_shards.parent / "world" / "images" / "val",
                     tmp_path / "cap", shard_size=9)
        source = ShardSource.from_dir(tmp_path / "cap")
        assert len(source.urls) == 2
    everything = _keys(EvalStream(source, rank=0, world_size=1), num_workers=0)
    seen = [k for rank in range(2) for k in _keys(EvalStream(source, rank=rank, world_size=2), num_workers=2)]
    assert len(everything) == len(set(everything))
    assert sorted(seen) == sorted(everything)
    units = json.loads((Path(source.urls[0]).parent / MANIFEST_NAME).read_text())["units"]
    assert len(everything) == (units if task == "vqav2" else source.samples)


def test_eval_examples_carry_question_fields(shapes_shards):
    example = next(iter(EvalStream(ShardSource.from_dir(shapes_shards / "vqav2" / "val"), rank=0, world_size=1)))
    assert example["task"] == "vqav2" and len(example["answers"]) == 10
    assert example["answer"] == example["multiple_choice_answer"] and example["image"].size == (32, 32)
    gqa = next(iter(EvalStream(ShardSource.from_dir(shapes_shards / "gqa" / "val"), rank=0, world_size=1)))
    assert {"question", "answer", "fullAnswer", "isBalanced", "types", "question_id"} <= set(gqa)


def test_train_stream_is_reproducible_and_differs_across_ranks_and_epochs(shapes_shards):
    sources = shapes_sources(shapes_shards, "train", {"caption": 1.0, "vqav2": 1.0, "gqa": 1.0})

    def run(rank: int, epoch: int = 0, seed: int = 0) -> list[str]:
        stream = TrainStream(sources, epoch_length=41, seed=seed, rank=rank, world_size=2, shuffle_buffer=16,
                             sampling="resample")
        stream.set_epoch(epoch)
        return _keys(stream, num_workers=2)

    first = run(rank=0)
    assert len(first) == 41
    assert run(rank=0) == first
    assert run(rank=1) != first
    assert run(rank=0, epoch=1) != first
    assert run(rank=0, seed=1) != first


def test_train_stream_mixes_tasks_by_weight(shapes_shards):
    sources = shapes_sources(shapes_shards, "train", {"caption": 3.0, "vqav2": 1.0, "gqa": 0.0})
    stream = TrainStream(sources, epoch_length=400, seed=0, rank=0, world_size=1, shuffle_buffer=8,
                         sampling="resample", questions="single")
    counts = Counter(example["task"] for example in stream)
    assert set(counts) == {"caption", "vqav2"}
    assert 2.0 < counts["caption"] / counts["vqav2"] < 4.5
    example = next(e for e in stream if e["task"] == "vqav2")
    assert isinstance(example["question"], str) and example["answer"] == example["multiple_choice_answer"]


def test_awkward_images_decode_and_truncated_jpeg_is_skipped_and_counted(tmp_path, caplog):
    captions, images = make_coco(tmp_path / "coco")
    prepare_coco(captions, images, tmp_path / "out", shard_size=2)
    stream = EvalStream(ShardSource.from_dir(tmp_path / "out"), rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="data.stream"):
        examples = list(stream)
    modes = {e["image_id"]: e["image"].mode for e in examples}
    assert modes == {1: "RGB", 2: "L", 3: "RGBA", 4: "CMYK", 5: "RGB"}
    assert stream.stats.corrupt_images == 1
    assert any("'6'" in r.getMessage() and "corrupt image" in r.getMessage() for r in caplog.records)
    counter = SkipCounter()
    counter.update(examples)
    assert counter.totals == {"corrupt_images": 1, "bad_records": 0, "shard_errors": 0}


def test_skip_counts_survive_dataloader_workers_and_collation(tmp_path):
    questions, annotations, images = make_vqav2(tmp_path / "vqa")
    prepare_vqav2(questions, annotations, images, tmp_path / "out", shard_size=1)
    stream = EvalStream(ShardSource.from_dir(tmp_path / "out"), rank=0, world_size=1)
    loader = DataLoader(stream, batch_size=2, num_workers=2,
                        collate_fn=collate_with_stats(lambda examples: {"n": len(examples)}))
    counter = SkipCounter()
    total = 0
    for batch in loader:
        counter.update(batch)
        total += batch["n"]
    assert total == 10  # images 1-5 x 2 questions; image 6 (truncated) skipped
    assert counter.totals["corrupt_images"] == 1


def _write_raw_shards(out: Path, samples: list[dict[str, bytes]]) -> ShardSource:
    writer = ShardWriter(out, shard_size=100)
    for i, members in enumerate(samples):
        writer.write(f"s{i}", members)
    write_manifest(out, writer.close(), task="caption")
    return ShardSource.from_dir(out)


def test_pickle_members_are_never_decoded_and_bad_records_are_counted(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(png, format="PNG")
    good = {"png": png.getvalue(), "json": json.dumps({"task": "caption", "captions": ["x"]}).encode()}
    source = _write_raw_shards(tmp_path / "raw", [
        {**good, "pyd": pickle.dumps(Exploit()), "pickle": pickle.dumps(Exploit())},
        {"png": png.getvalue(), "json": b"{broken"},
        {"png": png.getvalue(), "json": json.dumps({"task": "dance"}).encode()},
        {"json": good["json"]},
        good,
    ])
    stream = EvalStream(source, rank=0, world_size=1)
    examples = list(stream)
    assert len(examples) == 2 and not marker.exists()
    assert all("pyd" not in e and "pickle" not in e for e in examples)
    assert stream.stats.bad_records == 3


def test_damaged_shard_is_counted_and_the_stream_goes_on(tmp_path):
    captions, images = make_coco(tmp_path / "coco")
    prepare_coco(captions, images, tmp_path / "out", shard_size=2)
    source = ShardSource.from_dir(tmp_path / "out")
    first = Path(source.urls[0])
    first.write_bytes(first.read_bytes()[:700])  # cut inside the first sample's image
    stream = EvalStream(source, rank=0, world_size=1)
    ids = sorted(e["image_id"] for e in stream)
    assert ids == [3, 4, 5] and stream.stats.shard_errors == 1


def test_pipe_urls_need_explicit_permission(tmp_path):
    captions, images = make_coco(tmp_path / "coco")
    prepare_coco(captions, images, tmp_path / "out", shard_size=100)
    url = ShardSource.from_dir(tmp_path / "out").urls[0]
    piped = ShardSource("caption", (f"pipe:cat {url}",))
    with pytest.raises(DataError, match="refusing shard URL 'pipe:cat .*data.allow_remote"):
        list(EvalStream(piped, rank=0, world_size=1))
    assert len(list(EvalStream(piped, rank=0, world_size=1, allow_remote=True))) == 5


def test_train_stream_over_unreadable_shards_fails_instead_of_hanging(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("a.json")
        info.size = 7
        tar.addfile(info, io.BytesIO(b"garbage"))
    stream = TrainStream([ShardSource("caption", (str(path),))], epoch_length=5, rank=0, world_size=1,
                         max_consecutive_skips=50, sampling="resample")
    with pytest.raises(DataError, match="unusable samples in a row"):
        list(stream)


def test_training_partition_only_splits_when_shares_are_fair():
    from data.partition import training_partition

    uneven = [("a", 1000), ("b", 120)]
    assert training_partition(uneven, rank=0, world_size=1, worker=1, num_workers=2) == (["a", "b"], [1000, 120])
    even = [(f"s{i}", 100) for i in range(8)]
    shares = [training_partition(even, r, 2, w, 2)[0] for r in range(2) for w in range(2)]
    assert sorted(u for share in shares for u in share) == sorted(u for u, _ in even)
    assert all(len(share) == 2 for share in shares)


def test_training_fraction_is_a_stable_nested_subset():
    from data.partition import in_fraction

    keys = [f"{i:012d}" for i in range(4000)]
    kept = {f: {k for k in keys if in_fraction(k, f)} for f in (0.1, 0.25, 0.5, 1.0)}
    assert kept[0.1] <= kept[0.25] <= kept[0.5] <= kept[1.0] == set(keys)
    for f in (0.1, 0.25, 0.5):
        assert abs(len(kept[f]) / len(keys) - f) < 0.03


def test_a_fraction_that_keeps_nothing_fails_instead_of_looping():
    from data.errors import DataError
    from data.partition import kept_in_fraction

    raw = ({"__key__": "same-key"} for _ in range(10**9))
    with pytest.raises(DataError, match="keeps no image"):
        next(kept_in_fraction(raw, 1e-9, "caption: train.data_fraction 1e-09", patience=1000))


# --- epoch passes, packing, URLs (issue 15) -----------------------------------------------------------


def _questions(shards: Path, task: str, split: str) -> set[str]:
    """Keys (image/question_id) of every question of a split, from the exactly-once eval stream."""
    return {e["__key__"] for e in EvalStream(ShardSource.from_dir(shards / task / split), rank=0, world_size=1)}


@pytest.mark.parametrize("questions", ["packed", "single"])
def test_one_epoch_sees_every_question_of_the_train_split_once_over_2_ranks_x_2_workers(shapes_shards, questions):
    sources = shapes_sources(shapes_shards, "train", {"caption": 1.0, "vqav2": 1.0, "gqa": 1.0})
    seen: Counter = Counter()
    images: Counter = Counter()
    for rank in range(2):
        stream = TrainStream(sources, seed=3, rank=rank, world_size=2, shuffle_buffer=16, questions=questions)
        stream.set_epoch(1)
        for example in DataLoader(stream, batch_size=None, num_workers=2):
            images[(example["task"], example["__key__"])] += 1
            if example["task"] == "caption":
                continue
            if questions == "packed":
                seen.update((example["task"], f"{example['__key__']}/{t['question_id']}") for t in example["turns"])
            else:
                seen[(example["task"], example["__key__"])] += 1
    expected = {(t, k) for t in ("vqav2", "gqa") for k in _questions(shapes_shards, t, "train")}
    assert set(seen) == expected and set(seen.values()) == {1}  # every question, exactly once
    if questions == "packed":  # one visit per image per epoch, every task
        assert set(images.values()) == {1}
        assert {t for t, _ in images} == {"caption", "vqav2", "gqa"}


def test_epoch_order_is_seeded_and_changes_with_the_epoch(shapes_shards):
    sources = shapes_sources(shapes_shards, "train", {"caption": 1.0, "vqav2": 1.0})

    def keys(epoch: int, seed: int = 0) -> list[str]:
        stream = TrainStream(sources, seed=seed, rank=0, world_size=1, shuffle_buffer=16)
        stream.set_epoch(epoch)
        return [e["__key__"] for e in stream]

    assert keys(0) == keys(0) and keys(0) != keys(1) and keys(0, seed=1) != keys(0)
    assert sorted(keys(0)) == sorted(keys(1))


def test_remote_urls_are_refused_unless_enabled():
    from data.partition import check_urls

    for url in ("https://example.com/shard-000000.tar", "gs://bucket/shard.tar", "pipe:curl -s http://x/a.tar"):
        with pytest.raises(DataError, match="data.allow_remote"):
            check_urls([url], allow_remote=False)
        check_urls([url], allow_remote=True)
    with pytest.raises(DataError, match="webdataset cannot open 'ftp:'"):
        check_urls(["ftp://example.com/a.tar"], allow_remote=True)
    check_urls(["/data/shard.tar", "file:/data/shard.tar", "relative/shard.tar"], allow_remote=False)
    with pytest.raises(DataError, match="data.allow_remote"):
        TrainStream([ShardSource("caption", ("https://example.com/a.tar",))], rank=0, world_size=1)
