"""Every measurement only a GPU can make, in one go (under 8 minutes on one H100-class GPU); `scripts/gpu_check.sh`.

Steps (each a real command of the project, run as a subprocess with its own time limit; one failing does not stop
the others, its error is recorded):
  overhead      bench/overhead.py --preset skeleton --device cuda --precisions fp32,bf16: StructLoRA vs LoRA step
                time and memory at LLaVA-1.5-7B widths (the bf16 row a CPU without AVX512-BF16 cannot give)
  memory        bench/qlora_memory.py --device cuda --bases bf16,nf4: a few bf16 training steps of the skeleton with
                LoRA and StructLoRA on a bf16 and on an NF4 base (loss, CUDA peak memory)
  smoke_bf16    structlora run configs/smoke.yaml, bf16 on the GPU: every stage, the merge check
  smoke_nf4     the same on an NF4 base (bitsandbytes' CUDA kernels): every stage, the merge check
  smoke_vlm_nf4 configs/smoke_vlm.yaml (tiny Qwen2.5-VL, `model.arch: vlm`) on an NF4 base: every stage, the merge check
  eval          bench/eval_throughput.py --presets tiny,skeleton --ranks 1: `structlora eval` samples/s on the GPU

Writes one JSON (--out) and a Markdown section (--markdown) ready for BENCHMARKS.md. `--dry-run` runs the same
steps at CPU sizes (tiny preset, a few rounds; the GPU-only steps marked as such), to check the arguments, the
commands and the output format on a machine without a GPU (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("overhead", "memory", "smoke_bf16", "smoke_nf4", "smoke_vlm_nf4", "eval")


def commands(work: Path, dry_run: bool) -> dict[str, tuple[list[str], int]]:
    """step -> (command, time limit in seconds). Dry run: CPU sizes, the same scripts and options."""
    py = sys.executable
    device = "cpu" if dry_run else "cuda"
    smoke = [py, "-m", "pipeline.cli", "run", "configs/smoke.yaml", "--set", f"publish.registry={work}/registry"]
    vlm = [py, "-m", "pipeline.cli", "run", "configs/smoke_vlm.yaml", "--set", f"publish.registry={work}/registry",
           "--set", "model.quantization=nf4", "--set", "eval.tasks=[caption,test_loss]"]
    if dry_run:
        return {
            "overhead": ([py, "bench/overhead.py", "--preset", "tiny", "--rounds", "2", "--warmup", "1",
                          "--batch-size", "2", "--text-tokens", "8", "--precisions", "fp32", "--device", device], 300),
            "memory": ([py, "bench/qlora_memory.py", "--device", device, "--bases", "fp32", "--methods", "lora",
                        "--vision-layers", "1", "--text-layers", "1", "--steps", "1", "--text-tokens", "4",
                        "--json", str(work / "memory.json")], 600),
            "smoke_bf16": ([*smoke, "--run-dir", str(work / "smoke_fp32"), "--set", "train.max_steps=4",
                            "--set", "base.max_steps=4", "--set", "eval.tasks=[caption]"], 600),
            "smoke_nf4": ([*smoke, "--run-dir", str(work / "smoke_nf4"), "--set", "model.quantization=nf4",
                           "--set", "train.max_steps=4", "--set", "base.max_steps=4", "--set", "eval.tasks=[caption]"],
                          600),
            "smoke_vlm_nf4": ([*vlm, "--run-dir", str(work / "smoke_vlm_nf4"), "--set", "train.max_steps=4",
                               "--set", "base.max_steps=4", "--set", "eval.max_samples=4"], 600),
            "eval": ([py, "bench/eval_throughput.py", "--presets", "tiny", "--ranks", "1", "--samples", "2",
                      "--work", str(work / "eval"), "--out", str(work / "eval.json")], 600),
        }
    return {
        "overhead": ([py, "bench/overhead.py", "--preset", "skeleton", "--rounds", "8", "--warmup", "2",
                      "--batch-size", "4", "--text-tokens", "64", "--precisions", "fp32,bf16", "--device", device], 120),
        "memory": ([py, "bench/qlora_memory.py", "--device", device, "--bases", "bf16,nf4", "--steps", "6",
                    "--json", str(work / "memory.json")], 120),
        "smoke_bf16": ([*smoke, "--run-dir", str(work / "smoke_bf16"), "--set", "train.precision=bf16",
                        "--set", "model.dtype=bfloat16"], 60),
        "smoke_nf4": ([*smoke, "--run-dir", str(work / "smoke_nf4"), "--set", "model.quantization=nf4",
                       "--set", "train.precision=bf16"], 60),
        "smoke_vlm_nf4": ([*vlm, "--run-dir", str(work / "smoke_vlm_nf4"), "--set", "train.precision=bf16"], 60),
        "eval": ([py, "bench/eval_throughput.py", "--presets", "tiny,skeleton", "--ranks", "1", "--samples", "32",
                  "--skeleton-samples", "8", "--work", str(work / "eval"), "--out", str(work / "eval.json")], 60),
    }


def device_info(dry_run: bool) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu": platform.processor() or platform.machine(), "dry_run": dry_run}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "bf16": torch.cuda.is_bf16_supported()}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def run_step(name: str, command: list[str], limit: int, work: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as timeout:
        rc, out, err = 124, (timeout.stdout or b"").decode(errors="replace") if isinstance(timeout.stdout, bytes) \
            else (timeout.stdout or ""), f"timed out after {limit} s"
    result = {"step": name, "command": " ".join(command), "rc": rc, "seconds": round(time.perf_counter() - start, 1),
              "stdout_tail": out[-4000:]}
    if rc != 0:
        result["error"] = err[-2000:]
    for key, path in (("memory", work / "memory.json"), ("eval", work / "eval.json")):
        if name == key and path.is_file():
            result["data"] = json.loads(path.read_text())
    if name.startswith("smoke_"):
        run = Path(command[command.index("--run-dir") + 1])
        check = run / "merge" / "merge_check.json"
        if check.is_file():
            result["merge_check"] = json.loads(check.read_text())
        metrics = run / "train" / "metrics.jsonl"
        if metrics.is_file():
            losses = [json.loads(line)["train/loss"] for line in metrics.read_text().splitlines() if "train/loss" in line]
            result["train_loss_first_last"] = [losses[0], losses[-1]] if losses else None
    return result


def markdown(report: dict) -> str:
    """The BENCHMARKS.md section: where it ran, each step's status and its numbers."""
    info = report["device"]
    where = info.get("gpu") or f"CPU ({info['cpu']}), dry run: the format only, no GPU number"
    lines = [f"## GPU check ({report['date']}, {where})", "",
             f"`scripts/gpu_check.sh{' --dry-run' if info['dry_run'] else ''}`: torch {info['torch']}, CUDA "
             f"{info['cuda']}, bitsandbytes {info['bitsandbytes']}; {report['seconds']:.0f} s in all.", "",
             "| step | status | seconds | result |", "|---|---|---:|---|"]
    for step in report["steps"]:
        status = "ok" if step["rc"] == 0 else ("timed out" if step["rc"] == 124 else f"failed (rc {step['rc']})")
        lines.append(f"| {step['step']} | {status} | {step['seconds']:.0f} | {summary(step)} |")
    for step in report["steps"]:
        if step["step"] == "overhead" and step["rc"] == 0:
            tables = [x for x in step["stdout_tail"].splitlines() if x.startswith(("|", "LLaVA", "tiny"))]
            lines += ["", "Overhead (bench/overhead.py):", "", *tables]
    return "\n".join(lines) + "\n"


def summary(step: dict) -> str:
    if step["rc"] != 0:
        return (step.get("error") or "").strip().splitlines()[-1][:160] if step.get("error") else ""
    if "merge_check" in step:
        m = step["merge_check"]
        loss = step.get("train_loss_first_last")
        return (f"merge max abs diff {m['max_abs_diff']:.2e} (tolerance {m['tolerance']:g})"
                + (f", train loss {loss[0]:.3f} -> {loss[1]:.3f}" if loss else ""))
    if step["step"] == "memory" and "data" in step:
        return "; ".join(f"{r['base']} {r['method']}: peak {r['peak_mb']:.0f} MiB, {r['step_seconds']:.2f} s/step, "
                         f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}" for r in step["data"]["rows"])
    if step["step"] == "eval" and "data" in step:
        rows = step["data"] if isinstance(step["data"], list) else step["data"].get("rows", [])
        return "; ".join(f"{r.get('preset')} {r.get('task')}: {r.get('samples_per_second')} samples/s"
                         for r in rows[:8] if isinstance(r, dict))
    return "see the table below" if step["step"] == "overhead" else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU sizes: check arguments, commands and outputs")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    parser.add_argument("--markdown", type=Path, help="also write the BENCHMARKS.md section here")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        parser.error(f"--steps: unknown {unknown}; choose from {', '.join(STEPS)}")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        plan = commands(work, args.dry_run)
        results = []
        for name in steps:
            command, limit = plan[name]
            print(f"[gpu_check] {name}: {' '.join(command)}", flush=True)
            results.append(run_step(name, command, limit, work))
            print(f"[gpu_check] {name}: rc {results[-1]['rc']} in {results[-1]['seconds']} s", flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "device": device_info(args.dry_run), "steps": results,
              "seconds": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    text = markdown(report)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
