"""Peak memory of `prepare conversations` against the size of the file: flat, not proportional.

    python bench/conversations_prepare.py [--sizes 3000,30000,300000] [--workers 1]

For each size, a LLaVA-format JSON array of that many records (three turns of text each, one small
PNG that every record names) is prepared in a fresh process, which reports its peak resident set
(`ru_maxrss`; with workers > 1 the largest worker's too). For comparison, a fresh process that only
`json.load`s the same file (what a non-streaming reader needs before any work).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PREPARE = """
import resource, sys, json, time
from pathlib import Path
from data.prepare_conversations import prepare_conversations
t = time.perf_counter()
s = prepare_conversations(Path(sys.argv[2]), file=Path(sys.argv[1]), shard_size=1000, workers=int(sys.argv[3]))
print(json.dumps({"kept": s["kept"], "seconds": time.perf_counter() - t,
                  "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""
LOAD = """
import resource, sys, json
data = json.load(open(sys.argv[1], encoding="utf-8"))
print(json.dumps({"records": len(data), "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_file(path: Path, n: int) -> int:
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(path.parent / "red.png")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("[\n")
        for i in range(n):
            record = {"id": f"r{i:07d}", "image": "red.png", "conversations": [
                {"from": "human", "value": f"<image>\nDescribe picture number {i} in a few words, please."},
                {"from": "gpt", "value": f"A small red square, number {i}, on a plain background."},
                {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "red"}]}
            handle.write(json.dumps(record) + (",\n" if i < n - 1 else "\n"))
        handle.write("]\n")
    return path.stat().st_size


def run(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3000,30000,300000")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    print("| records | file (MB) | prepare peak RSS (MB) | largest worker (MB) | prepare (s) | json.load peak RSS (MB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "data.json"
            size = write_file(path, n)
            prepared = run(PREPARE, str(path), str(Path(tmp) / "out"), str(args.workers))
            assert prepared["kept"] == n, prepared
            loaded = run(LOAD, str(path))
            workers = f"{prepared['children_mb']:.0f}" if args.workers > 1 else ""
            print(f"| {n:,} | {size / 2**20:.1f} | {prepared['self_mb']:.0f} | {workers} | "
                  f"{prepared['seconds']:.1f} | {loaded['self_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
