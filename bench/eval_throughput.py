"""Throughput of `structlora eval` (samples/s per task), on 1 and on 2 ranks, per preset.

    python bench/eval_throughput.py [--presets tiny,skeleton] [--ranks 1,2] [--samples 16] [--skeleton-samples 4]
                                    [--work /tmp/eval_bench] [--out bench/results/eval_throughput.json]

Each preset's model is built from its config (configs/tiny.yaml: the tiny LLaVA; configs/
llava15_7b_skeleton.yaml: LLaVA-1.5-7B widths, 3 CLIP + 2 Llama layers) with random weights
and saved as a model directory; the data are the shapes world's test shards. Then the real
command runs: `structlora eval MODEL --data SHARDS --tasks caption,vqav2,gqa,long_context`,
as one process, and under torchrun with 2 ranks (CPU: gloo). The cores are split between the
ranks (OMP_NUM_THREADS = cores / ranks), so 1 vs 2 ranks compares two ways of using the same
machine. Throughput is what the harness records: samples over the wall time of generation on
all ranks up to the barrier (scoring excluded), `metrics.json` "timings".

A model with random weights never emits EOS early, so every sample decodes its full budget
(64 new tokens for captions, 16 for short answers): a worst case for a trained model.
Long-context: the same images at two prompt lengths (samples = images x buckets).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"tiny": "configs/tiny.yaml", "skeleton": "configs/llava15_7b_skeleton.yaml"}
TASKS = ("caption", "vqav2", "gqa", "long_context")
# prompt lengths (tokens, image included) of the long-context task: both fit either preset's context
LENGTHS = {"tiny": "160,384", "skeleton": "1024,2048"}


def build_data(work: Path) -> Path:
    """The shapes world's shards (the smoke config's world size), built once."""
    from data.prepare import prepare_shapes_shards
    from data.shapes import write_shapes_world

    shards = work / "shards"
    if not (shards / "index.json").is_file():
        write_shapes_world(work / "world", seed=0, num_images=240, size=64)
        prepare_shapes_shards(work / "world", shards, 100)
    return shards


def build_model(preset: str, work: Path) -> Path:
    """A random-weight model of the preset with its processor, saved once."""
    from pipeline.config import load_config
    from pipeline.models.door import open_model
    from pipeline.schema import RunConfig

    out = work / f"model-{preset}"
    if not (out / "config.json").is_file():
        cfg = load_config(RunConfig, ROOT / CONFIGS[preset], [])
        model, processor = open_model(cfg.model, seed=0)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return out


def run(preset: str, model: Path, shards: Path, ranks: int, samples: int, out: Path, cores: int) -> dict:
    args = ["-m", "pipeline.cli", "eval", f"{preset}={model}", "--data", str(shards), "--tasks", ",".join(TASKS),
            "--max-samples", str(samples), "--long-context-samples", str(samples), "--lengths", LENGTHS[preset],
            "--batch-size", "8", "--out", str(out)]
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
               "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS=str(max(1, cores // ranks)), TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    timings = json.loads((out / "metrics.json").read_text())["timings"][preset]
    return {"preset": preset, "ranks": ranks, "threads_per_rank": max(1, cores // ranks), "samples": samples,
            "wall_seconds": round(time.perf_counter() - start, 1), "tasks": timings}


def table(rows: list[dict]) -> str:
    lines = ["| preset | samples | ranks x threads | " + " | ".join(TASKS) + " | command wall time |",
             "|---|---:|---|" + "---:|" * len(TASKS) + "---:|"]
    for row in rows:
        cells = [f"{row['tasks'][t]['samples_per_second']:.3f}" if t in row["tasks"] else "" for t in TASKS]
        lines.append(f"| {row['preset']} | {row['samples']} | {row['ranks']} x {row['threads_per_rank']} | " + " | ".join(cells)
                     + f" | {row['wall_seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,skeleton")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--samples", type=int, default=16, help="samples per task (and long-context images)")
    parser.add_argument("--skeleton-samples", type=int, default=4, help="the same for the skeleton preset")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", default="/tmp/eval_bench", help="models, shards and eval outputs (reused)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = build_data(work)
    rows = []
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        model = build_model(preset, work)
        for ranks in [int(r) for r in args.ranks.split(",")]:
            samples = args.skeleton_samples if preset == "skeleton" else args.samples
            rows.append(run(preset, model, shards, ranks, samples, work / f"eval-{preset}-{ranks}", args.cores))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nstructlora eval throughput (samples/s, generation on all ranks), {args.cores} cores\n")
    print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows}, indent=2)
                                  + "\n")


if __name__ == "__main__":
    main()
