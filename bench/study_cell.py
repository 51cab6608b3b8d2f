"""One cell of the study, run in its own process: the pipeline's train + eval stages, then the
update diagnostics every method shares (from merged minus base weights).

The result JSON holds the cell's config, scores (CIDEr, VQA, GQA on the cell's split),
trainable parameters, step time, peak memory, and adjacent-layer cosine and drift energy of
the learned updates dW = W_merged - W_base along every depth chain (same tower, same module
kind, consecutive layers), measured alike for every method.
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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def chain_diagnostics(deltas: dict[str, Any]) -> dict[str, float]:
    """Mean adjacent-layer cosine and total drift energy over depth chains of {module: dW}.

    A chain is the modules whose names differ only in the layer index (same tower, same kind);
    consecutive indices with equal shapes form its edges, as in structlora.diagnostics.
    """
    import torch

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
    return {"adjacent_cosine": sum(cosines) / len(cosines) if cosines else float("nan"),
            "drift_energy": energy, "depth_edges": len(cosines),
            "update_norm": float(torch.sqrt(sum((d.double() ** 2).sum() for d in deltas.values())))}


def update_deltas(ctx) -> dict[str, Any]:
    """{target module: W_merged - W_base} for the cell's trained method."""
    import torch

    from pipeline.stages import load_adapted_handle, load_base
    from pipeline.towers import target_module_names

    base, _ = load_base(ctx)
    names = target_module_names(base, ctx.cfg.model, ctx.cfg.adapter)
    before = {n: base.get_submodule(n).weight.detach().clone() for n in names}
    adapted, _ = load_adapted_handle(ctx)
    if adapted.method == "structlora":
        merged = adapted.handle.merge_and_unload()
    elif adapted.method == "full":
        merged = adapted.model
    else:
        merged = adapted.model.merge_and_unload()
    with torch.no_grad():
        return {n: merged.get_submodule(n).weight.detach().float() - w.float() for n, w in before.items()}


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one cell; write its result JSON atomically and return it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for path in (str(ROOT), str(ROOT / "bench")):
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch

    torch.set_num_threads(int(cell["threads"]))
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
        link = run_dir / stage
        if not link.exists():
            link.symlink_to(Path(cell["shared"]) / stage, target_is_directory=True)
    stamp = run_dir / "cell_config.json"  # a killed cell resumes its checkpoints only under the same config
    if not stamp.is_file() or json.loads(stamp.read_text()) != cell["config"]:
        shutil.rmtree(run_dir / "train", ignore_errors=True)
        stamp.write_text(json.dumps(cell["config"], sort_keys=True))
    ctx = StageContext(cfg=cfg, run_dir=run_dir)
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    summary = stage_train(ctx)
    train_seconds = time.perf_counter() - t0
    peak_train = _peak_rss_mb()
    stage_eval(ctx)
    scores = headline_from_file(run_dir / "eval" / "metrics.json")["adapted"]
    diag = chain_diagnostics(update_deltas(ctx))
    result = {
        "id": cell["id"], "group": cell["group"], "name": cell["name"], "rank": cell["rank"],
        "seed": cell["seed"], "fraction": cell["fraction"], "split": cell["split"],
        "scores": {k: float(scores[k]) for k in ("CIDEr", "VQA", "GQA")},
        "trainable_parameters": int(summary["trainable_parameters"]), "steps": int(summary["steps"]),
        "step_seconds": train_seconds / max(1, int(summary["steps"])),
        "train_seconds": round(train_seconds, 2), "resumed_from": summary.get("resumed_from"),
        "peak_rss_mb": round(peak_train, 1), "train_rss_growth_mb": round(peak_train - rss_before, 1),
        "final_train_loss": summary["final_train_loss"], "val_losses": summary["val_losses"],
        **diag, "threads": int(cell["threads"]),
        "torch": torch.__version__, "config": cell["config_saved"],
    }
    out = Path(cell["result"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    tmp.replace(out)
    return result
