"""The pipeline's LoRA train step against a plain transformers + PEFT loop, same skeleton model and batch (issue 39).

    python bench/train_step_vs_peft.py [--preset skeleton|qwen2_5_vl_skeleton|tiny] [--rounds 12] [--warmup 2]
                                       [--batch-size 1] [--text-tokens 32] [--precisions fp32,bf16] [--breakdown]

Model and batch: bench/overhead.py's (`build_base`, `make_batch`): LLaVA-1.5-7B widths with 3 CLIP layers (the last
one dead: vision_feature_layer -2) and 2 Llama layers, or Qwen2.5-VL-7B widths with 2 vision and 2 text layers
(one 336 x 336 image, 144 image tokens), random weights, `--text-tokens` labelled text tokens per row.

Targets: the project's plan, `pipeline.models.plan.plan_for(model, None, adapter, probe=batch)` (tower table,
dead layers left out, `adapter.targets` q, v; projector / merger included), for method lora, rank 8, alpha 16.

Arm A, the pipeline: `pipeline.stages.methods.attach_method` (PEFT LoRA underneath) and
`pipeline.stages.recipe.TrainRecipe` (accelerate, AdamW betas (0.9, 0.999), weight decay 0.01, cosine schedule,
`max_grad_norm` 1.0, metrics every `log_every` = 10 steps to TensorBoard and metrics.jsonl), set up once; one
step = `recipe.train(until=step + 1)`: exactly the loop body a run executes (the label count for the loss
normaliser, accelerate's accumulate / autocast / backward, the loss terms read back as floats, the finiteness
check, gradient clipping, optimizer, scheduler, method hooks, zero_grad, the progress bar), plus one tqdm bar
construction per call (a run builds it once; microseconds).

Arm B, plain: `get_peft_model(model, LoraConfig(r, alpha, dropout 0, target_modules=the same names))`,
`torch.optim.AdamW` with the same lr, betas and weight decay; `loss = model(**batch).loss; loss.backward();
opt.step(); opt.zero_grad(set_to_none=True)` (bf16: under `torch.autocast`, as accelerate does).

The two arms are separate PEFT-wrapped copies of the same base (frozen embedding and lm_head tensors shared,
untouched by both). Each round runs one step of each arm, the order alternating (A B, B A, ...); ratio A / B per
round, median and spread (IQR from 4 rounds, else min-max). Memory: torch.profiler's peak of live tensors in one
step plus the resident tensors (parameters, buffers, optimizer state), as bench/overhead.py counts it.

`--breakdown`: the per-step work arm A does beyond arm B, timed alone on arm A's state after its last step
(gradients present): the label count, gradient clipping, the scheduler step, the float read-backs.

bf16 needs a CPU with AVX512-BF16 / AMX (checked in /proc/cpuinfo) or `--device cuda`; elsewhere torch falls
back to a reference GEMM about 250x slower than fp32 and the bf16 rows are skipped with a note.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.overhead import build_base, make_batch  # noqa: E402


def fast_bf16_cpu() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


class PipelineArm:
    """The project's step: attach_method + TrainRecipe, one `train(until=step + 1)` per step."""

    name = "pipeline (attach_method + TrainRecipe)"

    def __init__(self, model, plan, adapter, batch, precision: str, out_dir: Path, lr: float):
        from pipeline.schema import TrainConfig
        from pipeline.stages.methods import attach_method
        from pipeline.stages.recipe import TrainRecipe

        cfg = TrainConfig(max_steps=1_000_000, batch_size=batch["input_ids"].shape[0], lr=lr, precision=precision,
                          save_every=1_000_000, eval_every=0, resume="never")
        self.adapted = attach_method(model, adapter, plan.target_names, plan.full_modules, cfg.max_steps, seed=0,
                                     frozen_modules=plan.frozen_modules)
        self.recipe = TrainRecipe(self.adapted, cfg, out_dir, lambda: itertools.repeat(batch), [])
        self.recipe.setup()
        self.model, self.optimizer = self.adapted.model, self.recipe.optimizer

    def step(self) -> None:
        self.recipe.train(until=self.recipe.step + 1)


class PlainArm:
    """A plain transformers + PEFT loop."""

    name = "plain PEFT loop"

    def __init__(self, model, plan, adapter, batch, precision: str, device: str, lr: float):
        from peft import LoraConfig, get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = get_peft_model(model, LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=0.0,
                                                          target_modules=list(plan.target_names)))
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr,
                                           betas=(0.9, 0.999), weight_decay=0.01)
        self.batch, self.bf16, self.device = batch, precision == "bf16", torch.device(device)
        self.model.train()

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def resident_bytes(arm) -> int:
    tensors = {id(t): t for t in itertools.chain(arm.model.parameters(), arm.model.buffers())}
    tensors.update({id(v): v for s in arm.optimizer.state.values() for v in s.values() if torch.is_tensor(v)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def peak_step_bytes(arm, device: str) -> int:
    if device.startswith("cuda"):
        _sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        arm.step()
        _sync(device)
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        arm.step()
    live = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def spread(values: list[float]) -> str:
    values = sorted(values)
    if len(values) < 4:
        return f"{statistics.median(values):.3f} ({values[0]:.3f}-{values[-1]:.3f})"
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return f"{q2:.3f} ({q1:.3f}-{q3:.3f})"


def breakdown(arm: PipelineArm, repeats: int = 20) -> list[str]:
    """Arm A's per-step extras, timed alone (gradients of its last step recreated by one backward)."""
    recipe = arm.recipe
    batch = next(recipe.make_batches())
    terms = recipe.loss_step(batch, recipe._num_items([batch]))
    recipe.accelerator.backward(terms["loss"])
    params = [p for g in recipe.optimizer.param_groups for p in g["params"]]

    def timed(fn) -> float:  # median of single calls: a stall from another job on the machine does not count
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    rows = [("label count (`_num_items`)", timed(lambda: recipe._num_items([batch]))),
            ("gradient clipping (`clip_grad_norm_`, max_grad_norm 1.0)",
             timed(lambda: recipe.accelerator.clip_grad_norm_(params, 1.0))),
            ("float read-backs + isfinite", timed(lambda: (float(terms["task"].detach()),
                                                           bool(torch.isfinite(terms["loss"].detach()))))),
            ("scheduler step (LambdaLR)", timed(lambda: recipe.scheduler.step()))]
    recipe.optimizer.zero_grad(set_to_none=True)
    n = sum(p.numel() for p in params)
    return [f"| {name} | {ms:.3f} |" for name, ms in rows] + [f"({n:,} trainable values in {len(params)} tensors; median of {repeats} calls each)"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "skeleton", "qwen2_5_vl_skeleton"], default="skeleton")
    parser.add_argument("--vision-layers", type=int, default=None, help="default: 3 (LLaVA: 2 used), 2 (Qwen2.5-VL)")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12, help="0: no timed rounds (e.g. --breakdown alone)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the profiled memory step")
    parser.add_argument("--breakdown", action="store_true", help="time arm A's extra per-step work alone")
    parser.add_argument("--raw", action="store_true", help="print every round's step times")
    args = parser.parse_args(argv)
    from pipeline.models.plan import plan_for
    from pipeline.schema import AdapterConfig

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if "bf16" in precisions and args.device == "cpu" and not fast_bf16_cpu():
        print(f"note: bf16 skipped: {cpu_model()} has no AVX512-BF16 / AMX (torch would use a reference GEMM "
              "~250x slower than fp32)")
        precisions.remove("bf16")
    qwen = args.preset == "qwen2_5_vl_skeleton"
    vision_layers = args.vision_layers if args.vision_layers is not None else (2 if qwen else 3)
    base = build_base(preset=args.preset, vision_layers=vision_layers, text_layers=args.text_layers)
    batch = {k: v.to(args.device) for k, v in make_batch(base, args.batch_size, args.text_tokens).items()}
    base.to(args.device)
    adapter = AdapterConfig(method="lora", rank=args.rank, alpha=2.0 * args.rank)
    plan = plan_for(base, None, adapter, 1_000_000, probe=batch)
    print(f"adapted ({len(plan.target_names)}): {', '.join(plan.target_names)}", *plan.notes, sep="\n", flush=True)
    share = {id(t): t for t in (base.get_input_embeddings().weight, base.get_output_embeddings().weight)}
    name = {"skeleton": f"LLaVA-1.5-7B skeleton ({vision_layers} CLIP + {args.text_layers} Llama layers)",
            "qwen2_5_vl_skeleton": f"Qwen2.5-VL-7B skeleton ({vision_layers} vision + {args.text_layers} text layers)"
            }.get(args.preset, "tiny LLaVA preset")
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{cpu_model()}, torch threads {torch.get_num_threads()}"
    for precision in precisions:
        with tempfile.TemporaryDirectory() as tmp:
            plain = PlainArm(copy.deepcopy(base, dict(share)), plan, adapter, batch, precision, args.device, args.lr)
            pipeline = PipelineArm(base if precision == precisions[-1] else copy.deepcopy(base, dict(share)), plan,
                                   adapter, batch, precision, Path(tmp), args.lr)
            arms = [pipeline, plain]
            for _ in range(args.warmup):
                for arm in arms:
                    arm.step()
            times: dict[str, list[float]] = {a.name: [] for a in arms}
            for r in range(args.rounds):
                for arm in (arms if r % 2 == 0 else arms[::-1]):
                    _sync(args.device)
                    start = time.perf_counter()
                    arm.step()
                    _sync(args.device)
                    times[arm.name].append(time.perf_counter() - start)
            ratios = [a / b for a, b in zip(times[pipeline.name], times[plain.name])] or [float("nan")]
            memory = {} if args.no_memory else {a.name: (peak_step_bytes(a, args.device), resident_bytes(a))
                                                   for a in arms}
            seq = batch["input_ids"].shape[1]
            print(f"\n{name}, {precision}, batch {args.batch_size} x {seq} tokens, rank {args.rank}, "
                  f"{len(plan.target_names)} adapted linears, {args.rounds} rounds, {where}\n")
            if args.rounds:
                print("| arm | step time (ms, median) | min-max (ms) | time ratio to plain (median, spread) | "
                      "peak step memory (MiB) | total memory (MiB) |")
                print("| --- | ---: | ---: | ---: | ---: | ---: |")
                for arm in arms:
                    ts = times[arm.name] or [float("nan")]
                    ratio = spread(ratios) if arm is pipeline else "1"
                    mem = memory.get(arm.name)
                    cells = (f"{mem[0] / 2**20:.1f} | {(mem[0] + mem[1]) / 2**20:.1f}" if mem else " | ")
                    print(f"| {arm.name} | {1e3 * statistics.median(ts):.1f} | {1e3 * min(ts):.0f}-{1e3 * max(ts):.0f} | "
                          f"{ratio} | {cells} |")
            if args.raw:
                for arm in arms:
                    print(f"{arm.name}: {', '.join(f'{1e3 * t:.0f}' for t in times[arm.name])} ms")
            if args.breakdown:
                print("\n| arm A's extra work per step, timed alone | ms |\n| --- | ---: |")
                print("\n".join(breakdown(pipeline)))
            print(flush=True)
            pipeline.recipe.cleanup()
            del arms, plain, pipeline


if __name__ == "__main__":
    main()
