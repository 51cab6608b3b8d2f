"""bf16 / fp16 and module-wide dtype casts, as users run them on GPUs, exercised on CPU.

- bf16 autocast through the CLI: the smoke world, StructLoRA with the full coordinator (hybrid
  edges, a semantic refresh at step 0 and every 5 steps), killed with SIGKILL, resumed to the
  same adapter as an uninterrupted run, then evaluated and merged.
- fp16: accelerate runs fp16 only on GPUs (on CPU it would silently train in float32, so the
  recipe refuses it); the fp16 path (autocast + GradScaler, an overflowing step skipped) is
  covered at unit level on the tiny LLaVA with torch's CPU autocast and grad scaler.
- DeepSpeed-style casts (`model.to(bfloat16)`: parameters, buffers, everything): sketch bases
  and EMA sketches stay exact float32, training runs, the saved state loads.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from _procs import cpu_env, kill_train_after_checkpoints, prepare_only, run_command
from _tiny_models import llava_batch, llava_config, tiny_llava
from safetensors.torch import load_file

from structlora import apply_structlora

ROOT = Path(__file__).resolve().parents[1]
MICRO = [
    "data.shapes.images=120", "data.shard_size=10", "base.enabled=false", "eval.compare_base=false",
    "model.tiny.vision_layers=2", "model.tiny.text_layers=2", "adapter.rank=4", "adapter.alpha=8",
    "train.batch_size=4", "train.lr=0.002", "train.log_every=5", "train.eval_every=10", "train.precision=bf16",
    "adapter.structlora={coordinator: {edges: hybrid, refresh_every: 5}}",
    "eval.max_samples=8", "eval.batch_size=8", "eval.long_context_samples=4",
]


def _env() -> dict[str, str]:
    return cpu_env()


def _cli(run_dir: Path, *args: str) -> list[str]:
    return run_command("smoke.yaml", run_dir, MICRO, *args)


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "train" / "final" / "trainable.safetensors"))


def test_bf16_train_killed_resumed_evaluated_merged(tmp_path):
    import shutil

    prepared = prepare_only(tmp_path / "prepared", MICRO)
    steps = ["--stages", "train", "--set", "train.max_steps=30", "--set", "train.save_every=5",
             "--set", "train.keep_last=3"]
    reference = tmp_path / "reference"
    shutil.copytree(prepared, reference)
    subprocess.run(_cli(reference, *steps), check=True, env=_env(), capture_output=True, timeout=900)
    log = [json.loads(line) for line in (reference / "train" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("diag/semantic_edges", 0) for r in log) > 0, "no semantic edges were built"

    killed = tmp_path / "killed"
    shutil.copytree(prepared, killed)
    kill_train_after_checkpoints(_cli(killed, *steps), killed, timeout=600)
    resumed = subprocess.run(_cli(killed, *steps), env=_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((killed / "train" / "final" / "summary.json").read_text())
    assert summary["resumed_from"] is not None and 0 < summary["resumed_from"] < 30
    expected, got = _final(reference), _final(killed)
    assert expected.keys() == got.keys()
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert worst < 1e-6, f"the resumed bf16 adapter differs by {worst}"

    done = subprocess.run(_cli(killed, "--stages", "eval,merge"), env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((killed / "eval" / "metrics.json").read_text())
    assert {"caption", "vqav2", "gqa", "long_context"} <= set(metrics["metrics"])
    check = json.loads((killed / "merge" / "merge_check.json").read_text())
    assert check["max_abs_diff"] <= check["tolerance"]
    assert (killed / "merge" / "peft_adapter" / "adapter_config.json").is_file()


def _sm(**extra):
    model = tiny_llava()
    sm = apply_structlora(model, llava_config(model, coordinator={"edges": "hybrid", "refresh_every": 1}, **extra))
    model.train()
    return model, sm


def test_fp16_autocast_with_grad_scaler_trains_and_skips_overflow():
    model, sm = _sm()
    params = [p for group in sm.trainable_parameter_groups().values() for p in group]
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batch = llava_batch(batch=2)
    before = {id(p): p.detach().clone() for p in params}
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**batch).loss + sum(sm.regularization().values())
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sm.step(step + 1)
    assert sm.coordinator.refreshes >= 2, "gradient sketches were not captured under fp16 autocast"
    assert any(not torch.equal(before[id(p)], p) for p in params)
    # an overflowing step is skipped by the scaler, and training goes on
    snapshot = {id(p): p.detach().clone() for p in params}
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(**batch).loss * 1e30
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    assert all(torch.equal(snapshot[id(p)], p) for p in params), "the overflowing step was applied"


def test_recipe_refuses_fp16_on_cpu(tmp_path):
    from pipeline.errors import UserError
    from pipeline.stages.sharding import make_accelerator, resolve_precision

    assert resolve_precision("auto") in ("fp32", "bf16")
    from pipeline.stages.sharding import plan_sharding

    acc = make_accelerator("fp32", 1)
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        plan_sharding(acc, "auto", "structlora", [], "fp16")


def test_bf16_autocast_step_with_gradient_sketches_and_the_plan_in_float32():
    model, sm = _sm()
    batch = llava_batch(batch=2)
    sm.set_capture(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss + sum(sm.regularization().values())
    loss.backward()
    sketches = sm.gradient_sketches()
    assert sketches is not None and sketches.dtype == torch.float32 and torch.isfinite(sketches).all()
    plan = sm.compute_plans(training=False)
    mask, delta = next(iter(next(iter(plan.values())).values()))
    assert mask.dtype == torch.float32 and delta.dtype == torch.float32


def test_module_wide_bf16_cast_keeps_exact_buffers_and_trains(tmp_path):
    model, sm = _sm()
    bases = {s: sm.coordinator.basis[s].clone() for s in sm.coordinator.basis.spaces()}
    model.to(torch.bfloat16)  # what DeepSpeed's bf16 engine does to the whole module
    assert next(iter(sm.layers.values())).lora_A["default"].dtype == torch.bfloat16
    for space, basis in bases.items():
        assert sm.coordinator.basis[space].dtype == torch.float32
        assert torch.equal(sm.coordinator.basis[space], basis)
    assert sm.coordinator.ema_sketch.dtype == torch.float32
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in llava_batch(batch=2).items()}
    sm.set_capture(True)
    loss = model(**batch).loss + sum(sm.regularization().values())
    loss.backward()
    sm.step(1)
    assert sm.coordinator.refreshes == 1
    sm.save_training_state(tmp_path / "state")
    fresh_model, fresh = _sm()
    fresh_model.to(torch.bfloat16)
    fresh.load_training_state(tmp_path / "state")
    assert torch.equal(fresh.coordinator.ema_sketch, sm.coordinator.ema_sketch)


def test_saved_basis_is_used_within_rounding_and_a_real_difference_is_refused(tmp_path):
    _, sm = _sm()
    sm.save_training_state(tmp_path / "state")
    from safetensors.torch import load_file as load
    from safetensors.torch import save_file

    tensors = load(str(tmp_path / "state" / "structlora_state.safetensors"))
    key = next(k for k in tensors if k.startswith("basis/"))
    space = key.split("/", 1)[1]
    tensors[key] = tensors[key] + 1e-7  # another BLAS build: rounding-level differences
    save_file(tensors, str(tmp_path / "state" / "structlora_state.safetensors"))
    _, other = _sm()
    other.load_training_state(tmp_path / "state")
    assert torch.equal(other.coordinator.basis[space], tensors[key]), "the saved basis was not used"
    tensors[key] = tensors[key] + 1e-2  # another seed or width: refused
    save_file(tensors, str(tmp_path / "state" / "structlora_state.safetensors"))
    _, third = _sm()
    with pytest.raises(ValueError, match="differs from the saved one"):
        third.load_training_state(tmp_path / "state")
