"""Streaming throughput: shapes shards -> TrainStream -> LLaVA collation, with 0, 1 and 2 workers.

    python bench/loader.py [--images 2000] [--batches 40] [--batch-size 16]

Prints samples per second for the stream alone (decode) and with collation (processor:
image transform + tokenisation), so a user can see whether data loading can keep up with
a training step. Numbers depend on the machine: compare rows of one run, not across runs.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from data.collate import LlavaCollator
from data.prepare import prepare_shapes_shards
from data.prompts import CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT
from data.shapes import world_vocabulary, write_shapes_world
from data.stream import TrainStream, shapes_sources
from pipeline.schema import TinyPreset
from pipeline.tokenizer import build_tiny_processor


def measure(stream, batch_size: int, batches: int, workers: int, collate) -> float:
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=collate or list)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    n = sum(1 for _ in itertools.islice(iterator, batches))
    return n * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shapes_world(root / "world", seed=0, num_images=args.images, size=64)
        prepare_shapes_shards(root / "world", root / "shards", shard_size=250)
        preset = TinyPreset()
        processor = build_tiny_processor(world_vocabulary(), preset.image_size, preset.patch_size,
                                         [CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT])
        srcs = shapes_sources(root / "shards", "train", {"caption": 1.0, "vqav2": 1.0, "gqa": 1.0})
        length = args.batch_size * (args.batches + 2)
        print("| workers | stream only (samples/s) | stream + collate (samples/s) |")
        print("| --- | --- | --- |")
        for workers in (0, 1, 2):
            raw = measure(TrainStream(srcs, epoch_length=length, seed=0, rank=0, world_size=1),
                          args.batch_size, args.batches, workers, None)
            full = measure(TrainStream(srcs, epoch_length=length, seed=0, rank=0, world_size=1),
                           args.batch_size, args.batches, workers, LlavaCollator(processor, max_length=160))
            print(f"| {workers} | {raw:.0f} | {full:.0f} |")


if __name__ == "__main__":
    main()
