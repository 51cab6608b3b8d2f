"""`prepare coco` throughput with 1 and 2 worker processes, and the time a killed prepare takes to resume.

    python bench/prepare.py [--images 5000] [--shard-size 250]

A COCO-format caption set of real-size JPEGs (640 x 480, bench/loader.py's generator) is
converted to shards with `structlora prepare coco --workers 1` and `--workers 2` (images/s,
same bytes either way); then a prepare is SIGKILLed when about half of its shards are written
and run again: the second run keeps the finished shards (each verified by its sha256) and
writes the rest. Reported: the resumed run's wall time against a full prepare.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loader import make_coco_jpegs  # noqa: E402 - after the path set-up


def prepare(captions: Path, images: Path, out: Path, shard_size: int, workers: int) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "pipeline.cli", "prepare", "coco", "--captions", str(captions), "--images",
           str(images), "--out", str(out), "--shard-size", str(shard_size), "--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return json.loads(proc.stdout[proc.stdout.index("{"):]), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--shard-size", type=int, default=250)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        captions, images = make_coco_jpegs(root / "coco", args.images)
        megabytes = sum(p.stat().st_size for p in images.iterdir()) / 2**20
        print(f"{args.images} JPEGs of 640 x 480 ({megabytes:.0f} MB) generated in {time.perf_counter() - t0:.0f} s\n")
        print("| workers | wall time (s, incl. start-up) | images/s (writing) | shards |")
        print("| ---: | ---: | ---: | ---: |")
        full = {}
        for workers in (1, 2):
            result, wall = prepare(captions, images, root / f"out{workers}", args.shard_size, workers)
            full[workers] = wall
            print(f"| {workers} | {wall:.1f} | {result['images_per_second']:.0f} | {result['shards']} |", flush=True)
        same = all((root / "out1" / p.name).read_bytes() == p.read_bytes() for p in (root / "out2").iterdir())
        print(f"\n1 and 2 workers wrote the same bytes: {same}")
        # kill a 2-worker prepare half-way, then resume it
        out = root / "killed"
        cmd = [sys.executable, "-m", "pipeline.cli", "prepare", "coco", "--captions", str(captions), "--images",
               str(images), "--out", str(out), "--shard-size", str(args.shard_size), "--workers", "2"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
        journal = root / ".killed.partial" / "shards.jsonl"
        total = -(-args.images // args.shard_size)
        while proc.poll() is None:
            done = len(journal.read_text().splitlines()) if journal.is_file() else 0
            if done >= total // 2:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
        result, wall = prepare(captions, images, out, args.shard_size, 2)
        print(f"killed at {result['resumed_shards']} of {result['shards']} shards; the resumed run took {wall:.1f} s "
              f"against {full[2]:.1f} s for a full prepare with 2 workers")


if __name__ == "__main__":
    main()
