"""Your own conversation files: the three formats prepared to shards, every good record exactly once, every
bad one counted under its reason; the same conversation gives the same tokens and labels in every format;
labels on assistant turns only; a killed prepare resumes to the same bytes; scoring of the last answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _conversation_files import BAD, GOOD, REUSED, write

from data.chat_collate import ChatCollator
from data.chat_template import IGNORE_INDEX
from data.conversations import Tags, detect_format, split_of
from data.errors import DataError
from data.prepare_conversations import prepare_conversations
from data.stream import EvalStream, ShardSource

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["llava", "sharegpt", "messages"]


def _all(out: Path) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for split in ("train", "val", "test"):
        for e in EvalStream(ShardSource.from_dir(out / "conversations" / split), rank=0, world_size=1):
            assert e["id"] not in found, f"{e['id']} twice"
            found[e["id"]] = {**e, "split": split}
    return found


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out = {}
    for fmt in FORMATS:
        root = tmp_path_factory.mktemp(fmt)
        path = write(root / "files", fmt)
        assert detect_format(path) == fmt
        summary = prepare_conversations(root / "shards", file=path, shard_size=2, workers=1,
                                        val_fraction=0.2, test_fraction=0.2)
        out[fmt] = (root / "shards", summary)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_good_record_once_and_every_bad_one_counted_by_reason(prepared, fmt):
    shards, summary = prepared[fmt]
    found = _all(shards)
    reused = sorted(i for i in found if "#" in i)
    assert sorted(set(found) - set(reused)) == sorted(GOOD)
    assert [i.split("#")[0] for i in reused] == REUSED and summary["ids_reused"] == len(REUSED)
    assert found[reused[0]]["messages"][0]["content"] == "a repeat", "the reused id's own conversation"
    container = {"messages": {"not json": 1}}.get(fmt, {"not an object": 1})
    assert summary["skipped_by_reason"] == {**BAD, **container}
    assert summary["kept"] == len(GOOD) + len(REUSED) and summary["duplicates"] == 1
    written = json.loads((shards / "conversations" / "prepare_summary.json").read_text())
    assert written["skipped_by_reason"] == summary["skipped_by_reason"]
    assert any("line 4" in p["where"] or "record 3" in p["where"] for p in written["problems"]), "the record is named"
    assert [len(found[i]["images"]) for i in ("good1", "text1", "multi1", "abs1")] == [1, 0, 2, 1]
    for i in found:  # red.png and blue.jpg (under two paths) share records: one group, one split
        if not found[i]["images"]:
            assert found[i]["split"] == split_of(i, 0.2, 0.2), "a text-only record splits by its id"
    assert len({found[i]["split"] for i in found if found[i]["images"]}) == 1
    assert summary["images_in_several_splits"] == 0
    assert sum(s["images"] for s in summary["splits"].values()) == 2, "images are counted by content"


def test_the_same_conversation_gives_the_same_tokens_and_labels_in_every_format(prepared):
    from pipeline.models.presets.tiny import build_tiny_llava
    from pipeline.schema_model import ModelConfig

    words = "what colour is it and the shape a square red say yes which blue second you answer in one word".split()
    _, processor = build_tiny_llava(ModelConfig(preset="tiny").tiny, words, [])
    batches = {}
    for fmt in FORMATS:
        found = _all(prepared[fmt][0])
        batches[fmt] = ChatCollator(processor, max_length=400)([found[i] for i in GOOD])
    for fmt in FORMATS[1:]:
        for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
            assert torch.equal(batches[fmt][key], batches["llava"][key]), (fmt, key)
    batch, tok = batches["llava"], processor.tokenizer
    assert batch["pixel_values"].shape[0] == 1 + 0 + 2 + 1 + 1  # text-only rows add no image
    expected = [["red", "a square"], ["yes"], ["the second"], ["blue"], ["red"]]
    for row, answers in zip(range(len(GOOD)), expected):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        want = sum(([*tok(" " + a, add_special_tokens=False)["input_ids"], tok.eos_token_id] for a in answers), [])
        assert labelled == want, "labels on the assistant answers and their end tokens only"
    system_row = batch["input_ids"][GOOD.index("sys1")]
    assert tok.decode(system_row[:4]).startswith("<s> you answer in"), "the system text leads, masked"


def test_a_long_conversation_is_split_between_turns_and_each_row_keeps_its_images(prepared):
    from pipeline.models.presets.tiny import build_tiny_llava
    from pipeline.schema_model import ModelConfig

    _, processor = build_tiny_llava(ModelConfig(preset="tiny").tiny, ["what", "colour", "red", "and", "the", "shape"], [])
    sample = _all(prepared["llava"][0])["good1"]
    one = ChatCollator(processor, max_length=400)([sample])["input_ids"].shape[1]
    collate = ChatCollator(processor, max_length=one - 3)
    batch = collate([sample])
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2  # the image in both rows
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert all(int((row == image).sum()) == 64 for row in batch["input_ids"])
    assert collate.dropped_turns == 0 and collate.overlong_examples == 0


def test_file_level_problems_are_one_line_errors_before_any_work(tmp_path):
    (tmp_path / "trunc.json").write_text('[{"id": "a", "conversations": [{"from": "human", "value": "x"}, ')
    with pytest.raises(DataError, match="truncated or malformed"):
        prepare_conversations(tmp_path / "out", file=tmp_path / "trunc.json", workers=1)
    (tmp_path / "latin.jsonl").write_bytes('{"messages": [], "x": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        prepare_conversations(tmp_path / "out", file=tmp_path / "latin.jsonl", workers=1)
    (tmp_path / "scalar.json").write_text('"just a string"')
    with pytest.raises(DataError, match="expected a JSON array of records or JSON Lines"):
        prepare_conversations(tmp_path / "out", file=tmp_path / "scalar.json", workers=1)
    with pytest.raises(DataError, match="not found"):
        prepare_conversations(tmp_path / "out", file=tmp_path / "nowhere.json", workers=1)


def test_strict_stops_at_the_first_bad_record_and_tags_rename_fields(tmp_path):
    path = write(tmp_path / "files", "sharegpt")
    with pytest.raises(DataError, match=r"record 3: not an object.*--strict"):
        prepare_conversations(tmp_path / "out", file=path, workers=1, strict=True)
    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"id": "c1", "turns": [{"speaker": "me", "text": "say yes"},
                                                        {"speaker": "it", "text": "yes"}]}) + "\n")
    tags = Tags.parse("messages=turns,role=speaker,content=text,user=me,assistant=it")
    summary = prepare_conversations(tmp_path / "out2", file=custom, fmt="messages", tags=tags, workers=1,
                                    val_fraction=0.0, test_fraction=0.0)
    assert summary["kept"] == 1 and summary["skipped"] == 0


def test_a_grown_file_keeps_old_samples_in_their_split(tmp_path):
    rows = [{"id": f"s{i}", "messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(60)]
    small, grown = tmp_path / "small.jsonl", tmp_path / "grown.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    grown.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_conversations(tmp_path / "a", file=small, workers=1, val_fraction=0.2, test_fraction=0.2)
    prepare_conversations(tmp_path / "b", file=grown, workers=1, val_fraction=0.2, test_fraction=0.2)
    before, after = _all(tmp_path / "a"), _all(tmp_path / "b")
    assert all(after[i]["split"] == before[i]["split"] for i in before)


def _many(path: Path, n: int, images: int = 200) -> None:
    """n records over `images` distinct noise images (one image per 30 records: groups that spread over the splits)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(images):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path.parent / f"noise{k}.png")
    with open(path, "w") as handle:
        for i in range(n):
            two = i % 400 == 0  # a few samples with two images, early: the resumed shards hold them
            names = [f"noise{i % images}.png", f"noise{(i + 1) % images}.png"][: 2 if two else 1]
            handle.write(json.dumps({"id": f"r{i}", "images": names, "messages": [
                {"role": "user", "content": "<image>\n" * len(names) + f"number {i}?"},
                {"role": "assistant", "content": str(i)}]}) + "\n")


def test_kill_9_during_prepare_then_rerun_gives_the_same_shards(tmp_path):
    _many(tmp_path / "many.jsonl", 6000)
    args = dict(file=tmp_path / "many.jsonl", shard_size=50, val_fraction=0.1, test_fraction=0.1)
    whole = prepare_conversations(tmp_path / "whole", workers=2, **args)
    code = ("import sys; from pathlib import Path; from data.prepare_conversations import prepare_conversations as p; "
            f"p(Path(sys.argv[1]), file=Path({str(args['file'])!r}), shard_size=50, val_fraction=0.1, "
            "test_fraction=0.1, workers=2)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "killed")], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    journal = tmp_path / "killed" / "conversations" / ".train.partial" / "shards.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_text().count("\n") >= 5:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "conversations" / "train").exists(), "it finished before the kill"
    again = prepare_conversations(tmp_path / "killed", workers=1, **args)
    assert again["resumed_shards"] >= 5
    for split in ("train", "val", "test"):
        a, b = tmp_path / "whole" / "conversations" / split, tmp_path / "killed" / "conversations" / split
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for shard in a.iterdir():
            assert shard.read_bytes() == (b / shard.name).read_bytes(), shard.name
    assert again["splits"] == whole["splits"]
    manifest = json.loads((tmp_path / "killed" / "conversations" / "train" / "manifest.json").read_text())
    assert manifest["max_images"] == 2, "the resumed shards' samples count too"


def test_last_answers_are_scored_with_every_metric_and_a_headline_chosen_by_length():
    from eval.conversation_metrics import score_conversations

    short = score_conversations({"a": "Two", "b": "the red one"}, {"a": "2", "b": "red one"})
    assert short["headline"] == "exact_match" and short["exact_match"] == 100.0
    assert short["per_sample"]["b"]["token_f1"] == 100.0 and "short answers" in short["headline_reason"]
    long = score_conversations({"a": "a big red square on the left of a small circle"},
                               {"a": "a big red square on the left"})
    assert long["headline"] == "cider" and 0 < long["token_f1"] < 100 and long["missing"] == 0
    nothing = score_conversations({"a": "x"}, {}, metric="anls")
    assert nothing["headline"] == "anls" and nothing["coverage"] == 0.0 and nothing["anls"] == 0.0


def test_training_warns_before_it_starts_when_the_most_images_cannot_fit(tmp_path, capsys, monkeypatch):
    import pipeline.stages.train
    from pipeline.context import StageContext
    from pipeline.models.presets.tiny import build_tiny_llava
    from pipeline.schema import RunConfig
    from pipeline.schema_model import ModelConfig
    from pipeline.stages.train import check_image_budget

    monkeypatch.setattr(pipeline.stages.train, "sources", lambda *_, **__: [])  # no shards here: the 32 x 32 default image
    folder = tmp_path / "run" / "prepare" / "shards" / "conversations" / "train"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"max_images": 3}))
    cfg = RunConfig()
    cfg.data.tasks, cfg.data.max_length = {"conversations": 1.0}, 160
    _, processor = build_tiny_llava(ModelConfig(preset="tiny").tiny, ["a"], [])
    check_image_budget(StageContext(cfg=cfg, run_dir=tmp_path / "run"), processor)
    assert "a training sample has 3 images = 192 image tokens" in capsys.readouterr().out
    cfg.data.max_length = 400
    check_image_budget(StageContext(cfg=cfg, run_dir=tmp_path / "run"), processor)
    assert capsys.readouterr().out == ""


def test_generation_takes_text_only_and_multi_image_conversations_in_one_batch(tmp_path):
    """The conversations task through the harness: a text-only sample, a two-image one and a one-image one
    in one generate call; every sample gets a prediction, a per-sample JSONL row and all five scores."""
    from types import SimpleNamespace

    from _eval_tiny import tiny_images, tiny_llava, tiny_processor

    from eval.harness import ModelEntry, evaluate_models

    processor = tiny_processor()
    images = tiny_images(3)

    def conv(sample_id, user, answer, imgs):
        return {"task": "conversations", "id": sample_id, "images": imgs, "num_images": len(imgs),
                "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what?"},
                             {"role": "assistant", "content": "a square"}, {"role": "user", "content": user},
                             {"role": "assistant", "content": answer}]}

    examples = {"conversations": [conv("t", "is it red?", "yes", []),
                                  conv("m", "<image> <image> which is blue?", "the second", images[:2]),
                                  conv("o", "<image>\nwhat colour?", "red", images[2:])]}
    acc = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, device=torch.device("cpu"),
                          wait_for_everyone=lambda: None)
    results = evaluate_models([ModelEntry("m", lambda: (tiny_llava(processor), processor))], ["conversations"],
                              examples, tmp_path, acc, batch_size=3, say=lambda _: None)
    block = results.scores["m"]["conversations"]
    assert block["num_samples"] == 3 and block["missing"] == 0 and block["results_file"]["valid"]
    assert set(block["per_sample"]["m"]) == {"exact_match", "token_f1", "anls", "bleu4_sentence", "cider_sentence"}
    rows = [json.loads(line) for line in (tmp_path / "m" / "conversations_samples.jsonl").open()]
    assert block["budget"]["max_new_tokens"] == 64 and block["budget"]["setting"] == "default"
    assert block["budget"]["answers"] == 3 and block["budget"]["hit"] == sum(r["hit_budget"] for r in rows)
    assert [r["id"] for r in rows] == ["t", "m", "o"] and rows[1]["reference"] == "the second"
    assert rows[0]["prompt"].startswith("be brief USER: what? ASSISTANT: a square</s>USER: is it red? ASSISTANT:")
