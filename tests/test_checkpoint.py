"""Checkpoints: atomic, verified, pruned; a broken newest one falls back to the previous."""

from __future__ import annotations

import pytest

from pipeline.stages import checkpoint as ckpt


def _writer(payload: bytes):
    def write(tmp):
        (tmp / "a.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text("{}")
    return write


def test_write_verify_and_keep_last(tmp_path):
    for step in (10, 20, 30):
        ckpt.write_checkpoint(tmp_path, step, _writer(b"x" * step), keep_last=2)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-0000020", "step-0000030"]
    assert ckpt.latest_valid(tmp_path).name == "step-0000030"
    assert ckpt.is_valid(tmp_path / "step-0000030") == (True, "ok")
    assert not list(tmp_path.glob(".tmp-*"))


def test_half_written_newest_is_skipped_with_a_warning(tmp_path):
    ckpt.write_checkpoint(tmp_path, 10, _writer(b"ok"), keep_last=3)
    half = tmp_path / "step-0000020"
    half.mkdir()
    (half / "a.bin").write_bytes(b"partial")  # killed before COMPLETE was written
    with pytest.warns(UserWarning, match="half-written"):
        assert ckpt.latest_valid(tmp_path).name == "step-0000010"


def test_corrupt_file_is_detected(tmp_path):
    ckpt.write_checkpoint(tmp_path, 10, _writer(b"ok"), keep_last=3)
    ckpt.write_checkpoint(tmp_path, 20, _writer(b"good"), keep_last=3)
    (tmp_path / "step-0000020" / "sub" / "b.json").write_text("{broken")
    with pytest.warns(UserWarning, match="checksum mismatch in sub/b.json"):
        assert ckpt.latest_valid(tmp_path).name == "step-0000010"


def test_no_checkpoint(tmp_path):
    assert ckpt.latest_valid(tmp_path / "none") is None
