"""One cell of the study, run in its own process: the pipeline's train + eval stages, then the
update diagnostics every method shares (from merged minus base weights).

The result JSON holds the cell's config, scores (CIDEr, VQA, GQA on the cell's split, and the
teacher-forced token loss on all of it, per task and mean), trainable parameters, step time,
peak memory, the validation-loss curve, and update diagnostics measured alike for every method
along every depth chain (same tower, same module kind, consecutive layers): adjacent-layer
cosine of dW = W_merged - W_base and of the loss gradients dL/dW (batch-averaged), drift
energy raw and normalised by ||dW||^2; StructLoRA cells add kept rank, gate mean and the
coordinator's message share. A cell with `evaluate: false` (a search cell) only trains.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    """Resident memory of this process now, MB (Linux /proc)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def code_commit() -> str:
    """The commit the cell's code comes from (+dirty when the tree has uncommitted changes): a
    study is only comparable within one code version, so every cell records its own."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


NUMERICS_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")


def machine_info() -> dict[str, Any]:
    """Where the cell ran, and a fingerprint of this machine's float arithmetic.

    CPU training is deterministic on one machine but not across CPU models: the BLAS and the
    vectorised kernels pick code paths by CPU, and 1,200 steps amplify last-bit differences into
    seed-sized ones (issue 14: the same cell gave val loss 2.496 at step 100 on an earlier machine and
    2.362 on an AMD EPYC family 26). The fingerprint is a hash of a few seeded AdamW steps through the
    kernels a cell uses (matmul, layer norm, GELU, softmax attention, conv, cross-entropy), run with
    this process's threads: cells with equal fingerprints ran with the same arithmetic."""
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
    conv = torch.nn.Conv2d(3, 64, 4, stride=4)  # widths of the tiny default's towers
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
        x = conv(images).flatten(2).transpose(1, 2)  # (8, 64, 64)
        q, k, v = block["qkv"](block["ln"](x)).chunk(3, dim=-1)
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + block["mlp"](block["ln"](x))
        loss = torch.nn.functional.cross_entropy(block["head"](x).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest()
    return {"cpu": cpu, "platform": platform.platform(), "threads": torch.get_num_threads(),
            "env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ},
            "numerics_fingerprint": digest[:16]}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def chain_diagnostics(deltas: dict[str, Any]) -> dict[str, float]:
    """Mean adjacent-layer cosine and total drift energy over depth chains of {module: dW}.

    A chain is the modules whose names differ only in the layer index (same tower, same kind);
    consecutive indices with equal shapes form its edges, as in structlora.diagnostics.
    """

    chains: dict[str, list[tuple[int, str]]] = {}
    for name in deltas:
        m = re.search(r"\.(\d+)\.", name)
        if m:
            key = name[: m.start()] + ".*." + name[m.end():]
            chains.setdefault(key, []).append((int(m.group(1)), name))
    cosines, energy = [], 0.0
    for members in chains.values():
        members.sort()
        for (i, a), (j, b) in zip(members, members[1:]):
            ua, ub = deltas[a].double().flatten(), deltas[b].double().flatten()
            if j != i + 1 or ua.shape != ub.shape:
                continue
            denom = float(ua.norm() * ub.norm())
            cosines.append(float(ua @ ub) / denom if denom > 0 else 0.0)
            energy += float(((ua - ub) ** 2).sum())
    norm_sq = float(sum((d.double() ** 2).sum() for d in deltas.values()))
    return {"adjacent_cosine": sum(cosines) / len(cosines) if cosines else float("nan"),
            "drift_energy": energy, "depth_edges": len(cosines), "update_norm": norm_sq ** 0.5,
            "drift_energy_normalized": energy / norm_sq if norm_sq > 0 else float("nan")}


def merged_model(ctx) -> tuple[Any, Any, dict[str, Any], dict[str, float]]:
    """(merged model, processor, {target module: W_merged - W_base}, StructLoRA's own diagnostics)."""
    import torch

    from pipeline.stages import load_adapted_handle, load_base
    from pipeline.towers import target_module_names

    base, _ = load_base(ctx)
    names = target_module_names(base, ctx.cfg.model, ctx.cfg.adapter)
    before = {n: base.get_submodule(n).weight.detach().clone() for n in names}
    del base
    adapted, processor = load_adapted_handle(ctx)
    method_diag: dict[str, float] = {}
    if adapted.method == "structlora":
        diag = adapted.handle.diagnostics()
        kept = list(diag["kept_rank"].values())
        method_diag["kept_rank_mean"] = sum(kept) / len(kept)
        method_diag["kept_fraction"] = sum(kept) / (len(kept) * adapted.handle.config.rank)
        if diag["message_share"]:
            shares = list(diag["message_share"].values())
            method_diag["message_share_mean"] = sum(shares) / len(shares)
        if diag["gates"] is not None:
            flat = [g for values in diag["gates"].values() for g in values]
            method_diag["gate_mean"] = sum(flat) / len(flat)
        merged = adapted.handle.merge_and_unload()
    elif adapted.method == "full":
        merged = adapted.model
    else:
        merged = adapted.model.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        deltas = {n: merged.get_submodule(n).weight.detach().float() - w.float() for n, w in before.items()}
    return merged, processor, deltas, method_diag


def _batches(ctx, processor, split: str, per_task: int | None, batch_size: int, seed: int = 0):
    """Teacher-forced batches (labels on the answers) of every task's `split`, task by task."""
    from data.collate import LlavaCollator
    from pipeline.evaluate import load_eval_examples

    for task in ("caption", "vqav2", "gqa"):
        examples = load_eval_examples(ctx, task, split, per_task)
        collate = LlavaCollator(processor, max_length=ctx.cfg.data.max_length, seed=seed)
        for i in range(0, len(examples), batch_size):
            yield task, collate(examples[i: i + batch_size])


def test_losses(ctx, model, processor, split: str = "test", batch_size: int = 32) -> dict[str, float]:
    """Teacher-forced token loss on every sample of `split`, per task and their mean (the primary metric)."""
    import torch

    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for task, batch in _batches(ctx, processor, split, None, batch_size):
            tokens = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
            total = sums.setdefault(task, [0.0, 0])
            total[0] += float(model(**batch).loss) * tokens
            total[1] += tokens
    out = {task: total / max(1, n) for task, (total, n) in sums.items()}
    out["mean"] = sum(out.values()) / len(out)
    return out


def gradient_cosines(ctx, model, processor, names: list[str], per_task: int = 48) -> dict[str, float]:
    """Adjacent-layer cosine of the loss gradients dL/dW_l at the final weights, on `per_task` val
    samples per task: of the batch-averaged gradient (the paper's CosAdj on gradients), and the
    mean over batches of the per-batch cosine."""
    import torch

    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    mean = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    per_batch, count = [], 0
    for _, batch in _batches(ctx, processor, "val", per_task, 16):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads = {n: w.grad.detach().float() for n, w in weights.items()}
        for n, g in grads.items():
            mean[n] += g
        per_batch.append(chain_diagnostics(grads)["adjacent_cosine"])
        count += 1
    for w in weights.values():
        w.requires_grad_(False)
        w.grad = None
    return {"grad_adjacent_cosine": chain_diagnostics({n: g / count for n, g in mean.items()})["adjacent_cosine"],
            "grad_adjacent_cosine_per_batch": sum(per_batch) / len(per_batch)}


def _long_context(metrics_path: Path) -> dict[str, float]:
    """{bucket length: CIDEr} of the adapted model's long-context captioning, when it ran."""
    adapted = json.loads(metrics_path.read_text()).get("metrics", {})
    buckets = (adapted.get("long_context") or {}).get("buckets") or {}
    return {str(k): float(v["CIDEr"]) for k, v in buckets.items() if isinstance(v, dict) and "CIDEr" in v}


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one cell; write its result JSON atomically and return it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = {k: str(v) for k, v in (cell.get("env") or {}).items()}
    if env and "torch" in sys.modules and any(os.environ.get(k) != v for k, v in env.items()):
        raise RuntimeError(f"cell {cell['id']}: its env {env} must be set before torch is imported")
    os.environ.update(env)  # the kernels' code paths (cell["env"]): read when torch loads
    for path in (str(ROOT), str(ROOT / "bench")):
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch

    torch.set_num_threads(int(cell["threads"]))
    from data.shards import file_sha256
    from pipeline.config import from_dict
    from pipeline.evaluate import headline_from_file, stage_eval
    from pipeline.runner import StageContext
    from pipeline.schema import RunConfig
    from pipeline.stages import stage_train

    cfg = from_dict(RunConfig, cell["config"], source=cell["id"])
    run_dir = Path(cfg.run_dir)
    shutil.rmtree(run_dir / "eval", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in ("prepare", "base"):  # the shared world and base model
        link, target = run_dir / stage, Path(cell["shared"]) / stage
        if link.is_symlink() and Path(os.readlink(link)) != target:
            link.unlink()  # a cell folder made for another shared base
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    # a killed cell resumes its checkpoints only under the same config and the same shared base
    stamp, stamped = run_dir / "cell_config.json", {"config": cell["config"], "shared": str(cell["shared"])}
    if not stamp.is_file() or json.loads(stamp.read_text()) != stamped:
        shutil.rmtree(run_dir / "train", ignore_errors=True)
        stamp.write_text(json.dumps(stamped, sort_keys=True))
    base_weights = run_dir / "base" / "model" / "model.safetensors"
    base_sha256 = file_sha256(base_weights) if base_weights.is_file() else None
    machine = machine_info()
    ctx = StageContext(cfg=cfg, run_dir=run_dir)
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    summary = stage_train(ctx)
    train_seconds = time.perf_counter() - t0
    peak_train = _peak_rss_mb()
    evaluate = cell.get("evaluate", True)  # search cells: training (val losses) only
    scores: dict[str, float] = {}
    if evaluate:
        stage_eval(ctx)
        headline = headline_from_file(run_dir / "eval" / "metrics.json")["adapted"]
        scores = {k: float(headline[k]) for k in ("CIDEr", "VQA", "GQA")}
        long_context = _long_context(run_dir / "eval" / "metrics.json")
    merged, processor, deltas, method_diag = merged_model(ctx)
    diag = {**chain_diagnostics(deltas), **method_diag}
    if evaluate:
        from pipeline.towers import target_module_names

        losses = test_losses(ctx, merged, processor, cell["split"])
        scores.update({f"loss_{k}": v for k, v in losses.items()})
        diag.update(gradient_cosines(ctx, merged, processor, target_module_names(merged, cfg.model, cfg.adapter)))
        if long_context:
            diag["long_context_cider"] = long_context
    result = {
        "id": cell["id"], "group": cell["group"], "name": cell["name"], "rank": cell["rank"],
        "seed": cell["seed"], "fraction": cell["fraction"], "split": cell["split"],
        "scores": scores,
        "trainable_parameters": int(summary["trainable_parameters"]), "steps": int(summary["steps"]),
        "step_seconds": train_seconds / max(1, int(summary["steps"])),
        "train_seconds": round(train_seconds, 2), "resumed_from": summary.get("resumed_from"),
        "peak_rss_mb": round(peak_train, 1), "train_rss_growth_mb": round(peak_train - rss_before, 1),
        "final_train_loss": summary["final_train_loss"], "val_losses": summary["val_losses"],
        **diag, "threads": int(cell["threads"]),
        "torch": torch.__version__, "code_commit": code_commit(), "base_sha256": base_sha256, "machine": machine,
        "config": cell["config_saved"],
    }
    out = Path(cell["result"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    tmp.replace(out)
    return result
