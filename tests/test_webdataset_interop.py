"""Our shards are plain WebDataset shards: the webdataset library reads them as written."""

from __future__ import annotations

import webdataset as wds

from data.prepare import prepare_shapes_shards
from data.shapes import write_shapes_world
from data.shards import load_shards


def test_webdataset_reads_our_shards(tmp_path):
    write_shapes_world(tmp_path / "world", seed=1, num_images=40, size=32)
    prepare_shapes_shards(tmp_path / "world", tmp_path / "shards", shard_size=5)
    shard_set = load_shards(tmp_path / "shards" / "vqav2" / "train")
    samples = list(wds.WebDataset(shard_set.urls, shardshuffle=False).decode("pil"))
    assert len(samples) == sum(s["samples"] for s in shard_set.manifest["shards"])
    first = samples[0]
    assert first["json"]["task"] == "vqav2" and first["png"].size == (32, 32)
    assert all(len(q["answers"]) == 10 for s in samples for q in s["json"]["questions"])
