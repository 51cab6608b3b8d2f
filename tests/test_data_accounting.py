"""Nothing lost silently: damaged shards are found before they are read (sha256 and size against the
manifest), every skip of a stream or a collator is counted per split and per epoch, and what an
evaluation split lost reaches metrics.json and the report's first lines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from data.accounting import TrainAccount, describe_loss, eval_account, merge_train_accounts
from data.errors import DataError
from data.examples import StreamStats
from data.prepare import prepare_shapes_shards
from data.shapes import write_shapes_world
from data.shards import check_shards
from data.stream import EvalStream, ShardSource, TrainStream, collate_with_stats, without_markers


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("accounting")
    write_shapes_world(root / "world", seed=3, num_images=160, size=32)
    prepare_shapes_shards(root / "world", root / "shards", shard_size=6)
    return root / "shards"


@pytest.fixture
def shards(prepared, tmp_path) -> Path:
    shutil.copytree(prepared, tmp_path / "shards")
    return tmp_path / "shards"


def same_size_damage(path: Path, offset: int | None = None) -> None:
    """Overwrite bytes inside a member's data (the size stays; the tar still parses)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at:at + 64] = bytes(b ^ 0x5A for b in data[at:at + 64])
    path.write_bytes(bytes(data))


def damage_member(path: Path, suffix: str) -> None:
    """Same-size damage inside the data of the first member named *suffix (found with tarfile)."""
    import tarfile

    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
    same_size_damage(path, member.offset_data + min(40, member.size // 2))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _shard(folder: Path, index: int) -> Path:
    manifest = json.loads((folder / "manifest.json").read_text())
    return folder / manifest["shards"][index]["name"]


def test_check_finds_same_size_damage_by_sha256_and_truncation_by_size(shards):
    folder = shards / "vqav2" / "test"
    same_size_damage(_shard(folder, 0))
    truncate(_shard(folder, 1))
    _, damaged = check_shards(folder)
    assert [Path(d.path).name for d in damaged] == [_shard(folder, 0).name, _shard(folder, 1).name]
    assert "sha256" in damaged[0].reason and "truncated" in damaged[1].reason
    assert damaged[0].samples == 6 and damaged[0].units > 6  # images and their questions
    _, by_size = check_shards(folder, verify=False)
    assert [Path(d.path).name for d in by_size] == [_shard(folder, 1).name], "size alone misses in-place damage"


def test_a_damaged_shard_stops_with_its_name_or_is_left_out_and_listed(shards):
    folder = shards / "caption" / "test"
    bad = _shard(folder, 1)
    same_size_damage(bad)
    with pytest.raises(DataError, match=rf"{bad.name}: sha256 does not match.*damaged_shards: skip"):
        ShardSource.from_dir(folder)
    source = ShardSource.from_dir(folder, on_damaged="skip")
    assert str(bad) not in source.urls and len(source.urls) == len(json.loads(
        (folder / "manifest.json").read_text())["shards"]) - 1
    assert [d.path for d in source.excluded] == [str(bad)]
    assert source.images == source.samples + 6


@pytest.mark.parametrize("damage", [same_size_damage, truncate])
def test_an_eval_split_reports_how_many_examples_it_lost_and_why(shards, damage):
    from pipeline.stages.evaluate import load_split

    folder = shards / "vqav2" / "test"
    whole, account = load_split(shards, "vqav2", "test")
    assert not account["lost_anything"] and account["scored"] == account["holds"] == len(whole)
    lost_questions = json.loads((folder / "manifest.json").read_text())["shards"][0]["units"]
    damage(_shard(folder, 0))
    with pytest.raises(DataError, match=_shard(folder, 0).name):
        load_split(shards, "vqav2", "test")
    examples, account = load_split(shards, "vqav2", "test", on_damaged="skip")
    assert account["holds"] == len(whole) and account["scored"] == len(examples) == len(whole) - lost_questions
    assert account["lost"] == lost_questions and account["skipped"]["shards_left_out"] == 1
    line = describe_loss(account)
    assert f"{len(examples)} of {len(whole)} test examples scored, {lost_questions} lost" in line
    assert _shard(folder, 0).name in line


def test_a_cap_below_what_is_left_is_not_a_loss_but_the_damage_is_still_said(shards):
    from pipeline.stages.evaluate import load_split

    same_size_damage(_shard(shards / "gqa" / "test", 0))
    examples, account = load_split(shards, "gqa", "test", max_samples=5, on_damaged="skip")
    assert len(examples) == 5 and account["lost"] == 0 and account["lost_anything"]
    assert "but 1 damaged shard left out" in describe_loss(account)


@pytest.mark.parametrize("damage", ["same_size", "truncated"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_training_streams_leave_out_and_count_damaged_shards_on_every_rank(shards, damage, world_size):
    folder = shards / "vqav2" / "train"
    (same_size_damage if damage == "same_size" else truncate)(_shard(folder, 2))
    source = ShardSource.from_dir(folder, on_damaged="skip")
    seen: set[str] = set()
    parts = []
    for rank in range(world_size):
        stream = TrainStream([source], seed=0, rank=rank, world_size=world_size, questions="packed")
        account = TrainAccount("train", [source])
        loader = DataLoader(stream, batch_size=4, num_workers=0, collate_fn=collate_with_stats(
            lambda examples: {"keys": [e["__key__"] for e in examples]}))
        for batch in loader:
            account.record(0, batch)
            seen.update(batch["keys"])
        parts.append(account.as_dict())
    total = merge_train_accounts(parts)
    assert total["total"]["shards_left_out"] == 1 and total["images_left_out"] == 6, "counted once, not per rank"
    assert len(seen) == source.images - 6 and total["lost_anything"]


def test_stream_time_damage_is_counted_per_epoch_through_dataloader_workers(shards):
    """With the sha256 check off, a damaged member is found while read: counted in the epoch that read it."""
    folder = shards / "caption" / "train"
    damage_member(_shard(folder, 0), ".png")  # an image that no longer decodes
    truncate(_shard(folder, 3))
    # the manifest still lists the truncated shard's old size: make the size check pass to reach the stream
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][3]["bytes"] = _shard(folder, 3).stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    source = ShardSource.from_dir(folder, verify=False)
    account = TrainAccount("train", [source])
    stream = TrainStream([source], seed=0, rank=0, world_size=1)
    for epoch in range(2):
        stream.set_epoch(epoch)
        loader = DataLoader(stream, batch_size=5, num_workers=2,
                            collate_fn=collate_with_stats(lambda examples: {"n": len(examples)}))
        for batch in loader:
            account.record(epoch, batch)
    result = account.as_dict()
    assert [row["epoch"] for row in result["per_epoch"]] == [0, 1]
    for row in result["per_epoch"]:
        assert row["damaged_shards_read"] == 1 and row["corrupt_images"] == 1
    assert result["total"]["damaged_shards_read"] == 2


def test_a_stream_that_yields_nothing_still_reports_its_skips(shards):
    folder = shards / "caption" / "test"
    only = _shard(folder, 0)
    only.write_bytes(bytes(range(256)) * (only.stat().st_size // 256))  # not a tar at all
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"] = [dict(manifest["shards"][0], bytes=only.stat().st_size)]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    stream = EvalStream(ShardSource.from_dir(folder, verify=False), rank=0, world_size=1)
    items = list(stream)
    assert without_markers(items) == [] and len(items) == 1, "one marker carries the counts"
    batch = collate_with_stats(lambda examples: {"n": len(examples)})(items)
    assert "n" not in batch, "a batch of markers has no data"
    assert [s["shard_errors"] for s in batch["__skipped__"].values()] == [1]


def test_eval_account_without_loss():
    class Source:
        name, units, images, samples, excluded, prepare_skipped = "caption", 50, 10, 10, (), 2

    account = eval_account("caption", "test", Source(), StreamStats(), read=10)
    assert account == {**account, "holds": 10, "wanted": 10, "scored": 10, "lost": 0, "lost_anything": False,
                       "skipped_at_prepare": 2}
    assert describe_loss(account) == ""


def test_a_val_split_whose_every_shard_is_damaged_is_left_out_and_still_accounted(prepared, tmp_path):
    from pipeline.context import StageContext
    from pipeline.errors import UserError
    from pipeline.schema import RunConfig
    from pipeline.stages.common import sources

    run = tmp_path / "run"
    shutil.copytree(prepared, run / "prepare" / "shards")
    folder = run / "prepare" / "shards" / "gqa" / "val"
    names = [s["name"] for s in json.loads((folder / "manifest.json").read_text())["shards"]]
    for name in names:
        truncate(folder / name)
    cfg = RunConfig()
    cfg.data.damaged_shards = "skip"
    ctx = StageContext(cfg=cfg, run_dir=run)
    lost: list = []
    kept = sources(ctx, "val", {"caption": 1.0, "gqa": 1.0}, lost)
    assert [s.name for s in kept] == ["caption"] and [s.name for s in lost] == ["gqa"]
    account = TrainAccount("val", kept + lost).as_dict()
    assert account["total"]["shards_left_out"] == len(names) and account["lost_anything"]
    shutil.copytree(folder, run / "prepare" / "shards" / "gqa" / "train", dirs_exist_ok=True)
    with pytest.raises(UserError, match="every shard was left out as damaged"):
        sources(ctx, "train", {"gqa": 1.0})


def test_an_empty_eval_split_says_so(tmp_path):
    from data.shards import write_manifest
    from pipeline.errors import UserError
    from pipeline.stages.evaluate import load_split

    folder = tmp_path / "conversations" / "test"
    folder.mkdir(parents=True)
    write_manifest(folder, [], task="conversations")
    with pytest.raises(UserError, match="holds no records.*--test-fraction"):
        load_split(tmp_path, "conversations", "test")
