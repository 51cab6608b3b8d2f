"""One cell of `structlora compare`, in its own process: `python -m pipeline.compare.cell SPEC`.

The cell is an ordinary run directory: its config.yaml, manifest.json and stages, run by the pipeline's
own runner (train, then eval on the cell's split with the teacher-forced test loss always among the
tasks), with prepare/ and base/ linked to the comparison's shared folder (their manifest records are
copied, so the runner skips them). Killed, it resumes from its last checkpoint the next time; its
result record is written atomically at the end, by the main process of a launch:

- scores: every numeric metric of eval/metrics.json, flattened (`test_loss`, `test_loss.caption`,
  `caption.CIDEr`, `vqav2.overall`, `gqa.accuracy`, `conversations.exact_match`, ...);
- the validation-loss curve and final train loss, trainable parameters, step time, peak memory (RSS,
  and CUDA where there is one), where it ran (CPU, numerics fingerprint, code commit);
- with `diagnostics`, the update-structure measures of pipeline.compare.structure.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

NUMERICS_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")


def code_commit() -> str:
    """The commit the cell's code comes from (+dirty when tracked files differ from it)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """Where the cell ran, and a fingerprint of this machine's float arithmetic.

    CPU training is deterministic on one machine but not across CPU models: the BLAS and the vectorised
    kernels pick code paths by CPU, and a thousand steps amplify last-bit differences into seed-sized ones.
    The fingerprint hashes a few seeded AdamW steps through the kernels a cell uses (matmul, layer norm,
    GELU, attention, conv, cross-entropy): cells with equal fingerprints ran with the same arithmetic."""
    import hashlib
    import platform

    import torch

    cpu: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "model name", "cpu family", "model") and key not in cpu:
                cpu[key] = value.strip()
    except OSError:
        pass
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 64, 4, stride=4)
    block = torch.nn.ModuleDict({"ln": torch.nn.LayerNorm(64), "qkv": torch.nn.Linear(64, 192),
                                 "mlp": torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(),
                                                            torch.nn.Linear(256, 64)), "head": torch.nn.Linear(64, 10)})
    params = [*conv.parameters(), *block.parameters()]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    opt = torch.optim.AdamW(params, lr=1e-2)
    images, labels = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8, 64), generator=gen)
    for _ in range(3):
        x = conv(images).flatten(2).transpose(1, 2)
        q, k, v = block["qkv"](block["ln"](x)).chunk(3, dim=-1)
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + block["mlp"](block["ln"](x))
        loss = torch.nn.functional.cross_entropy(block["head"](x).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest()
    return {"cpu": cpu, "platform": platform.platform(), "threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ}, "numerics_fingerprint": digest[:16]}


def effective_config(cell: dict[str, Any]) -> dict[str, Any]:
    """The cell's config as run: scored cells always compute the teacher-forced test loss, and none scores
    the base model again (the comparison's `base/base` cell does, once)."""
    import copy

    raw = copy.deepcopy(cell["config"])
    raw.setdefault("eval", {})["compare_base"] = False  # the base is scored once, by the comparison's base cell
    if cell.get("evaluate", True):
        tasks = list((raw.get("eval") or {}).get("tasks") or ["caption", "vqav2", "gqa"])
        if "test_loss" not in tasks:
            raw.setdefault("eval", {})["tasks"] = [*tasks, "test_loss"]
    return raw


def link_shared(cell: dict[str, Any], run_dir: Path) -> None:
    """prepare/ and base/ as links to the shared folder, their manifest records copied into the cell's;
    a cell folder made for another shared folder (or another config) starts its training afresh."""
    from pipeline.stages.runner import Manifest

    shared = Path(cell["shared"])
    records = Manifest(shared / "manifest.json")
    for stage in ("prepare", "base"):
        if records.stage(stage).get("status") != "done":
            raise RuntimeError(f"{shared}: stage {stage} is not done; `structlora compare` runs it before any cell")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in ("prepare", "base"):
        link, target = run_dir / stage, (shared / stage).resolve()
        if link.is_symlink() and Path(os.readlink(link)) != target:
            link.unlink()
        if not link.is_symlink() and not link.exists():  # a link to a stage never run (base disabled) stays as is
            link.symlink_to(target, target_is_directory=True)
    stamp = run_dir / "cell_config.json"
    # what the training in this folder was made from: a new base (frozen sha256, base_id) invalidates it too
    stamped = {"config": cell["config"], "shared": str(shared.resolve()), "match": cell.get("match", {})}
    manifest = Manifest(run_dir / "manifest.json")
    if not stamp.is_file() or json.loads(stamp.read_text()) != stamped:
        for stage in ("train", "eval"):
            shutil.rmtree(run_dir / stage, ignore_errors=True)
        manifest.invalidate_from("train")
        stamp.write_text(json.dumps(stamped, sort_keys=True))
    for stage in ("prepare", "base"):
        manifest.data["stages"][stage] = records.stage(stage)
    manifest.save()


def _peak_memory() -> dict[str, float]:
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # Linux: KiB
    import torch

    if torch.cuda.is_available():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _scores(folder: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(flat scores, long-context CIDEr per bucket) of an eval folder's metrics.json."""
    from eval.compare_stats import flatten_scores, long_context_cider

    metrics = json.loads((folder / "metrics.json").read_text()).get("metrics") or {}
    return flatten_scores(metrics), long_context_cider(metrics)


def record(cell: dict[str, Any], ctx, machine: dict[str, Any]) -> dict[str, Any]:
    """The cell's result, from its run directory."""
    import torch

    from data.shards import file_sha256
    from pipeline.stages.common import final_dir

    scores, long_context = _scores(ctx.run_dir / "eval") if cell.get("evaluate", True) else ({}, {})
    weights = ctx.run_dir / "base" / "model" / "model.safetensors"
    out = {
        "id": cell["id"], "group": cell["group"], "name": cell["name"], "rank": cell["rank"], "seed": cell["seed"],
        "fraction": cell["fraction"], "split": cell["split"], "scores": scores, **_peak_memory(),
        "threads": int(cell.get("threads") or torch.get_num_threads()), "torch": torch.__version__,
        "code_commit": code_commit(),
        "machine": machine, "config": cell["config"],
        "base_sha256": file_sha256(weights) if weights.is_file() and (
            "base_sha256" in cell.get("match", {}) or weights.stat().st_size < 2**31) else None,
        **{k: v for k, v in cell.get("match", {}).items() if k != "base_sha256"},
    }
    if cell.get("kind") != "base":
        summary = json.loads((final_dir(ctx) / "summary.json").read_text())
        steps, resumed = int(summary["steps"]), summary.get("resumed_from")
        out.update({"trainable_parameters": int(summary["trainable_parameters"]), "steps": steps,
                    "step_seconds": float(summary["seconds"]) / max(1, steps - int(resumed or 0)),
                    "train_seconds": float(summary["seconds"]), "resumed_from": resumed,
                    "final_train_loss": summary["final_train_loss"], "val_losses": summary["val_losses"],
                    "world_size": summary.get("world_size", 1)})
    if long_context:
        out["long_context_cider"] = long_context
    if cell.get("forgetting"):
        out["forgetting"] = {"split": cell["forgetting"], "scores": _scores(ctx.run_dir / "forgetting")[0]}
    if cell.get("diagnostics") and cell.get("kind") != "base":
        from pipeline.compare.structure import update_structure

        out.update(update_structure(ctx))
    return out


def forgetting_eval(ctx, split: str, models: tuple[str, ...] | None) -> None:
    """The cell's model scored on `split` (what the base learned from) into run_dir/forgetting/: the
    generation tasks and the test loss, without long-context captioning."""
    import dataclasses

    from pipeline.context import StageContext
    from pipeline.stages.evaluate import stage_eval

    cfg = ctx.cfg
    tasks = [t for t in cfg.eval.tasks if t != "long_context"]
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, tasks=tasks, compare_base=False))
    stage_eval(StageContext(cfg=cfg, run_dir=ctx.run_dir), models=models, folder="forgetting", split=split)


def run_cell(spec: Path) -> dict[str, Any] | None:
    """Run (or resume) the cell of spec file `spec`; write and return its result (None on other ranks).

    A `kind: base` cell trains nothing: it scores the shared base model as the other cells are scored."""
    cell = json.loads(Path(spec).read_text())
    env = {k: str(v) for k, v in (cell.get("env") or {}).items()}
    if env and "torch" in sys.modules and any(os.environ.get(k) != v for k, v in env.items()):
        raise RuntimeError(f"cell {cell['id']}: its env {env} must be set before torch is imported")
    os.environ.update(env)
    import torch

    if cell.get("threads"):  # else the launcher's (OMP_NUM_THREADS, SLURM_CPUS_PER_TASK) or torch's default
        torch.set_num_threads(int(cell["threads"]))
    import datetime

    from accelerate import PartialState

    from pipeline.config import from_dict, save_config
    from pipeline.context import StageContext
    from pipeline.schema import RunConfig
    from pipeline.stages.evaluate import stage_eval
    from pipeline.stages.runner import run_stages

    cfg = from_dict(RunConfig, effective_config(cell), source=str(spec))
    run_dir = Path(cfg.run_dir)
    # the runner's timeout: PartialState is one per process, and rank-0-only scoring outlasts NCCL's default
    state = PartialState(cpu=not torch.cuda.is_available(),
                         timeout=datetime.timedelta(minutes=cfg.distributed_timeout_minutes))
    machine = machine_info()
    lock = None
    if state.is_main_process:
        lock = _lock(run_dir, cell["id"])
        link_shared(cell, run_dir)
        save_config(cfg, run_dir / "config.yaml")
    state.wait_for_everyone()
    ctx = StageContext(cfg=cfg, run_dir=run_dir)
    base = cell.get("kind") == "base"
    diverged = None
    if base:
        stage_eval(ctx, models=("base",))
    elif cell.get("evaluate", True):
        run_stages(cfg, run_dir, ["prepare", "base", "train", "eval"])
    else:
        try:  # a search cell whose candidate diverges loses the search; it does not stop the comparison
            run_stages(cfg, run_dir, ["prepare", "base", "train"])
        except FloatingPointError as err:
            diverged = str(err)
    if cell.get("forgetting"):
        forgetting_eval(ctx, cell["forgetting"], ("base",) if base else ("adapted",))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    result = diverged_record(cell, machine, diverged) if diverged else record(cell, ctx, machine)
    out = Path(cell["result"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    tmp.replace(out)
    if lock is not None:
        lock.close()
    return result


def _lock(run_dir: Path, cell_id: str):
    """An exclusive lock on the cell's folder for this process's life: the same cell started twice (a second
    launch while the first still runs) stops with one line instead of training into the same folder."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / "cell.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(f"cell {cell_id} is running in another process ({run_dir}/cell.lock is held)") from None
    return handle


def diverged_record(cell: dict[str, Any], machine: dict[str, Any], reason: str) -> dict[str, Any]:
    """A search cell whose training diverged: done, with an infinite validation loss (it cannot be chosen)."""
    import torch

    return {"id": cell["id"], "group": cell["group"], "name": cell["name"], "rank": cell["rank"], "seed": cell["seed"],
            "fraction": cell["fraction"], "split": cell["split"], "scores": {}, "diverged": reason,
            "val_losses": [[0, float("inf")]], "trainable_parameters": 0, "step_seconds": float("nan"),
            "threads": int(cell.get("threads") or 0), "torch": torch.__version__, "code_commit": code_commit(),
            "machine": machine, "config": cell["config"], **cell.get("match", {})}


def main(argv: list[str] | None = None) -> int:
    import logging

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipeline.compare.cell CELL_SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_cell(Path(args[0]))
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving: nothing to clean up
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
