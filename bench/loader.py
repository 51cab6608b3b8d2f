"""Loader throughput, the webdataset pipeline against the hand-written loader it replaced.

    python bench/loader.py [--images 1200] [--batches 20] [--rounds 3] [--batch-size 16] [--old-commit 12c1364]

A COCO-format caption set of real-size JPEGs (640 x 480, generated: gradients and shapes with
noise, quality 90) is prepared into shards once; then both loaders stream it through a torch
DataLoader into the LLaVA collator (image transform + tokenisation) at 64 px (the tiny preset's
CLIP processor) and at 336 px (LLaVA-1.5's CLIP ViT-L/14-336 input), with 0 and 2 workers.
The old loader is `data/stream.py` (and the `data/shards.py` it reads with) at `--old-commit`,
loaded from git; both run in resampling mode over the same shards with the same seed. Rows of
one run are interleaved (old, new, old, new), so load from other jobs hits both alike.

Reference consumption: LLaVA-1.5-7B visual instruction tuning (665k samples, 336 px) takes
"around 10 hours on 8x A100" (LLaVA README, haotian-liu/LLaVA, "Train"), i.e. 665,000 /
(10 h x 3600 s x 8) = 2.3 samples/s per A100 in full fine-tuning; a LoRA step still runs the
whole 7B forward and backward, so it consumes about as much (the README's LoRA script uses
the same batch of 16 per GPU). Target: at 336 px, >= 3 x 2.3 = 6.9 samples/s per process.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

A100_SAMPLES_PER_S = 665_000 / (10 * 3600 * 8)


def make_coco_jpegs(root: Path, n: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> tuple[Path, Path]:
    """A COCO captions file and n JPEGs of `size` (gradient, random shapes, noise)."""
    import numpy as np
    from PIL import Image, ImageDraw

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    entries, annotations = [], []
    w, h = size
    for i in range(1, n + 1):
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.array(
            [rng.random(), rng.random(), rng.random()], dtype=np.float32)
        array = np.broadcast_to(base, (h, w, 3)) + noise.normal(0, 12, (h, w, 3))
        image = Image.fromarray(array.clip(0, 255).astype("uint8"))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(20, 120)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        name = f"COCO_train2014_{i:012d}.jpg"
        image.save(images / name, quality=90)
        entries.append({"id": i, "file_name": name, "width": w, "height": h})
        annotations += [{"id": 10 * i + k, "image_id": i, "caption": f"a picture with shapes number {k}"}
                        for k in range(5)]
    captions = root / "captions_train2014.json"
    captions.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return captions, images


def old_stream_module(commit: str):
    """data/stream.py as it was at `commit`, with the data/shards.py it read with."""
    package = types.ModuleType("data_old")
    package.__path__ = []
    sys.modules["data_old"] = package
    modules = {}
    for name in ("shards", "stream"):
        source = subprocess.run(["git", "show", f"{commit}:data/{name}.py"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout
        source = source.replace("from data.shards import", "from data_old.shards import")
        spec = importlib.util.spec_from_loader(f"data_old.{name}", loader=None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"data_old.{name}"] = module
        exec(compile(source, f"{commit}:data/{name}.py", "exec"), module.__dict__)
        modules[name] = module
    return modules["stream"]


def measure(stream, batch_size: int, batches: int, workers: int, collate) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    n = sum(batch["input_ids"].shape[0] for batch in itertools.islice(iterator, batches))
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--old-commit", default="12c1364", help="the last commit with the hand-written loader")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (ratio per round, median)")
    args = parser.parse_args(argv)
    from data.chat_collate import ChatCollator
    from data.prepare import prepare_coco
    from data.prompts import CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT
    from data.stream import ShardSource, TrainStream
    from pipeline.models.presets.words import build_tiny_processor

    old = old_stream_module(args.old_commit)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        captions, images = make_coco_jpegs(root / "coco", args.images)
        prepare_coco(captions, images, root / "shards", shard_size=100)
        print(f"{args.images} JPEGs of 640 x 480 generated and prepared in {time.perf_counter() - t0:.0f} s\n")
        words = "a picture with shapes number 0 1 2 3 4".split()
        length = args.batch_size * (args.batches + 2)
        print(f"| image side | workers | old loader (samples/s, median of {args.rounds}) | webdataset loader "
              "(samples/s) | new / old (median, range) |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for side, patch in ((64, 8), (336, 14)):
            processor = build_tiny_processor(words, side, patch, [CAPTION_PROMPT, SHORT_ANSWER_POSTPROMPT])
            max_length = (side // patch) ** 2 + 64
            for workers in [int(w) for w in args.workers.split(",")]:
                rates: dict[str, list[float]] = {"old": [], "new": []}
                for _ in range(args.rounds):  # interleaved: old, new, old, new, ...
                    for name, module, kwargs in (("old", old, {}), ("new", sys.modules["data.stream"],
                                                                    {"sampling": "resample"})):
                        source = module.ShardSource.from_dir(root / "shards")
                        stream = module.TrainStream([source], epoch_length=length, seed=0, rank=0, world_size=1,
                                                    shuffle_buffer=256, **kwargs)
                        rates[name].append(measure(stream, args.batch_size, args.batches, workers,
                                                   ChatCollator(processor, max_length=max_length)))
                ratios = sorted(n / o for n, o in zip(rates["new"], rates["old"]))
                print(f"| {side} | {workers} | {statistics.median(rates['old']):.1f} | "
                      f"{statistics.median(rates['new']):.1f} | {statistics.median(ratios):.2f} "
                      f"({ratios[0]:.2f}-{ratios[-1]:.2f}) |", flush=True)
        print(f"\nreference: one A100 consumes {A100_SAMPLES_PER_S:.1f} samples/s in LLaVA-1.5-7B tuning at 336 px; "
              f"target >= {3 * A100_SAMPLES_PER_S:.1f} samples/s per process")
    assert ShardSource and TrainStream  # the current module is what "new" measures


if __name__ == "__main__":
    main()
