"""What the shard check at open costs: sha256 of every shard against its manifest, next to one pass of
the evaluation stream over the same shards (what every stage that opens a split then does anyway).

    python bench/shard_check.py [--images 2000] [--shard-size 250] [--rounds 3]

A COCO-format caption set of real-size JPEGs (640 x 480, bench/loader.py's generator) is prepared
into shards; then, interleaved over rounds: `check_shards(verify=True)` (sha256, threads), the
size-only check (`verify=False`), and one pass of `EvalStream` decoding every image. The files are
in the page cache (just written), as they are when a stage re-reads what it prepared; from a cold
disk both the check and the pass pay the read once more.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loader import make_coco_jpegs  # noqa: E402 - after the path set-up


def main(argv: list[str] | None = None) -> None:
    import data.shards as shards
    from data.prepare import prepare_coco
    from data.stream import EvalStream, ShardSource

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        captions, images = make_coco_jpegs(root / "coco", args.images)
        out = root / "shards"
        prepare_coco(captions, images, out, args.shard_size, workers=2)
        size = sum(p.stat().st_size for p in out.glob("*.tar"))
        times: dict[str, list[float]] = {"sha256 check": [], "size check": [], "stream pass": []}
        for _ in range(args.rounds):
            shards._VERIFIED.clear()  # no cache across rounds: each round hashes every byte
            start = time.perf_counter()
            _, damaged = shards.check_shards(out, verify=True)
            times["sha256 check"].append(time.perf_counter() - start)
            assert not damaged
            start = time.perf_counter()
            shards.check_shards(out, verify=False)
            times["size check"].append(time.perf_counter() - start)
            start = time.perf_counter()
            n = sum(1 for _ in EvalStream(ShardSource.from_dir(out, verify=False), rank=0, world_size=1))
            times["stream pass"].append(time.perf_counter() - start)
            assert n == args.images
        print(f"{args.images} JPEGs of 640 x 480 in {len(list(out.glob('*.tar')))} shards, {size / 2**20:.0f} MB; "
              f"{args.rounds} rounds, median\n")
        print("| step | seconds | MB/s | share of one stream pass |")
        print("| --- | ---: | ---: | ---: |")
        passed = statistics.median(times["stream pass"])
        for name, values in times.items():
            t = statistics.median(values)
            print(f"| {name} | {t:.3f} | {size / 2**20 / t:.0f} | {t / passed:.1%} |")


if __name__ == "__main__":
    main()
