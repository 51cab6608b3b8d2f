"""The data card: `structlora prepare conversations --config` measures the prepared samples in the model's own
tokens; its counts are checked here against the shards themselves, tokenised independently by the processor."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from _procs import cpu_env
from test_conversation_splits import llava_file

from data.stream import EvalStream, ShardSource

ROOT = Path(__file__).resolve().parents[1]


def test_the_card_counts_what_the_shards_hold(tmp_path):
    path = llava_file(tmp_path, 40)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "prepare", "conversations", "--file", str(path),
                           "--out", str(out), "--workers", "1", "--val-fraction", "0.2", "--test-fraction", "0.2",
                           "--config", str(ROOT / "configs" / "conversations_example.yaml"),
                           "--set", "data.max_length=80"], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Your data (data card)" in proc.stderr and "Suggested: data.max_length" in proc.stderr
    summary = json.loads((out / "conversations" / "prepare_summary.json").read_text())
    card = json.loads((out / "conversations" / "data_card.json").read_text())
    assert (out / "conversations" / "data_card.png").stat().st_size > 0

    from data.chat_template import render_text, to_template_messages
    from pipeline.config import load_config
    from pipeline.models.door import open_processor
    from pipeline.schema import RunConfig

    cfg = load_config(RunConfig, ROOT / "configs" / "conversations_example.yaml")
    processor, context = open_processor(cfg.model)
    assert card["context"] == context == 512
    for split in ("train", "val", "test"):
        samples = list(EvalStream(ShardSource.from_dir(out / "conversations" / split), rank=0, world_size=1))
        images = {hashlib.sha256(im.tobytes()).hexdigest() for s in samples for im in s["images"]}
        turns = sum(m["role"] == "assistant" for s in samples for m in s["messages"])
        counted = summary["splits"][split]
        assert (counted["records"], counted["images"], counted["assistant_turns"]) == (len(samples), len(images),
                                                                                       turns)
        if not samples:
            assert split not in card["splits"]
            continue
        lengths = []
        for s in samples:  # the processor's own count, not the collator's measure
            text = render_text(processor, to_template_messages(s["messages"]))
            lengths.append(len(processor(text=[text], images=[s["images"]])["input_ids"][0]))
        mine = card["splits"][split]
        assert mine["measured"] == mine["records"] == len(samples)
        assert mine["tokens"]["max"] == max(lengths) and mine["over_max_length"] == sum(n > 80 for n in lengths)
        assert 0 < mine["over_max_length"] < len(samples), "the limit cuts through the data: the test can fail"
        assert mine["dropped"] == mine["over_max_length"], "one-turn samples cannot be split: dropped"
    per_image = defaultdict(set)
    for split in ("train", "val", "test"):
        for s in EvalStream(ShardSource.from_dir(out / "conversations" / split), rank=0, world_size=1):
            per_image[hashlib.sha256(s["images"][0].tobytes()).hexdigest()].add(split)
    assert all(len(v) == 1 for v in per_image.values())
