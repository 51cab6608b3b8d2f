"""The plan of `structlora compare`: which arms, which tuning, which cells.

A plan comes from the command line (`--methods lora,structlora --ranks 8 --seeds 3 --lr-grid 0.5,1,2`)
or from a plan file (`--plan FILE`, e.g. bench/study_v2.yaml: a gate search for StructLoRA, ablation
arms, a low-data phase, a frozen base). Both become the same dictionary:

    base_config, overrides      the CONFIG and its --set overrides (every cell shares data, model, base)
    work_dir, results           run directories (cells/, shared/) and result records (cells/*.json)
    budget                      config changes every cell gets (e.g. train.max_steps, eval.max_samples)
    arms, reference             {name: config changes}; the arm every other is compared with
    gate (optional)             StructLoRA's gate search on validation loss, before the lr phase
    lr                          {rank, seeds, scales, arms, inherit}: every arm gets the same candidates
    ranks, seeds                the grid, scored on the test split
    reuse_tune_seeds            allow tuning seeds (gate, lr) among the grid's seeds (default: refused; the
                                command line's tuning seeds are 1000, 1001, ...: disjoint from the grid's)
    families, primary_arms      the test families, declared before the data (eval.compare_tests; default:
                                the primary metric of every arm against the reference at each rank, ...)
    ablation_arms, long_context_arms, lowdata, frozen_base, diagnostics (optional)
    score_base                  score the base model as the grid cells are scored (a row of its own)
    forgetting                  a split the base learned from, scored before and after adaptation
    metric                      the primary metric (default: the teacher-forced test loss)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.compare.cells import base_raw, cell_spec, deep_merge
from pipeline.errors import UserError

log = logging.getLogger("structlora.compare")

PHASES = ("gate", "lr", "grid", "lowdata")
TUNE_SEED_BASE = 1000  # the command line's tuning seeds: 1000, 1001, ... (the grid's are 0, 1, ...)
METHODS = ("structlora", "lora", "dora", "adalora", "vera", "full")


def plan_from_flags(config: Path, methods: list[str], ranks: list[int], seeds: int, lr_grid: list[float],
                    tune_seeds: int, metric: str, out: Path, threads: int, overrides: list[str] | None = None,
                    diagnostics: bool = False, forgetting: str | None = None, results: Path | None = None,
                    primary_arms: list[str] | None = None, reuse_tune_seeds: bool = False) -> dict[str, Any]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods) or len(methods) < 2:
        raise UserError(f"--methods {','.join(methods)}: name two or more different methods from {', '.join(METHODS)}")
    if len(set(ranks)) != len(ranks) or len({f"{x:g}" for x in lr_grid}) != len(lr_grid):
        raise UserError(f"--ranks {ranks} / --lr-grid {lr_grid}: a value listed twice would run the same cells twice")
    if not ranks or any(r < 1 for r in ranks) or seeds < 2 or tune_seeds < 1 or not lr_grid or min(lr_grid) <= 0:
        raise UserError("--ranks, --lr-grid: positive numbers; --seeds: at least 2 (differences are paired by "
                        "seed, an interval needs two); --tune-seeds: at least 1")
    first = 0 if reuse_tune_seeds else TUNE_SEED_BASE  # the lr search's seeds, disjoint from the grid's by default
    return normalize({
        "base_config": str(config), "overrides": list(overrides or []), "work_dir": str(out),
        "results": str(results or Path(out) / "results"), "threads": threads, "budget": {},
        "arms": {m: {"adapter": {"method": m}} for m in methods}, "reference": methods[0],
        "lr": {"rank": ranks[0], "seeds": list(range(first, first + tune_seeds)), "scales": list(lr_grid),
               "arms": list(methods)},
        "ranks": list(ranks), "seeds": list(range(seeds)), "metric": metric, "diagnostics": diagnostics,
        "score_base": True, "forgetting": forgetting, "primary_arms": primary_arms,
        "reuse_tune_seeds": reuse_tune_seeds}, "command line")


def load_plan(path: Path, out: Path | None, quick: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """A plan file; `quick` narrows it with its `quick` section (same code path, minutes)."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict) or "arms" not in spec or "lr" not in spec:
        raise UserError(f"{path}: not a plan file (needs base_config, arms, lr, ranks, seeds; see bench/study_v2.yaml)")
    spec.setdefault("base_overrides", {})
    spec["overrides"] = list(overrides or [])
    if quick:
        q = spec["quick"]
        spec["work_dir"], spec["results"] = q["work_dir"], q["results"]
        spec["budget"] = deep_merge(spec.get("budget") or {}, q.get("budget") or {})
        spec["base_overrides"] = q.get("base_overrides", {})
        if "gate" in spec:
            gate = spec["gate"]
            gate["variants"] = {k: gate["variants"][k] for k in q["gate"]["variants"]}
            gate["refine"] = {k: gate["refine"][k] for k in q["gate"]["refine"]}
            gate["seeds"] = q["gate"]["seeds"]
        spec["arms"] = {k: spec["arms"][k] for k in q["arms"]}
        spec["lr"] = {**spec["lr"], **q["lr"]}
        spec["ranks"], spec["seeds"] = q["ranks"], q["seeds"]
        for key in ("long_context", "frozen_base"):
            spec[key] = q.get(key)
        if "lowdata" in spec:
            spec["lowdata"] = {**spec["lowdata"], **q.get("lowdata", {})}
    if out is not None:
        spec["work_dir"], spec["results"] = str(out), str(Path(out) / "results")
    return normalize(spec, str(path))


def normalize(spec: dict[str, Any], source: str) -> dict[str, Any]:
    """Defaults for what a plan leaves out; arms no phase gives a learning rate are an error."""
    arms = spec["arms"]
    spec.setdefault("budget", {})
    spec.setdefault("reference", next(iter(arms)))
    spec.setdefault("metric", "test_loss")
    if spec["reference"] not in arms:
        raise UserError(f"{source}: the reference arm '{spec['reference']}' is not among the arms {list(arms)}")
    for key in ("gated_arms", "ablation_arms", "long_context_arms"):
        spec[key] = [a for a in spec.get(key, []) if a in arms]
    lr = spec["lr"]
    lr.setdefault("seeds", [0])
    lr["arms"] = [a for a in lr.get("arms", list(arms)) if a in arms]
    lr["inherit"] = {a: b for a, b in (lr.get("inherit") or {}).items() if a in arms}
    orphans = [a for a in arms if a not in lr["arms"] and a not in lr["inherit"]]
    if orphans:
        raise UserError(f"{source}: arms {orphans} get no learning rate: list them in lr.arms or lr.inherit")
    if spec.get("lowdata"):
        spec["lowdata"]["arms"] = [a for a in spec["lowdata"]["arms"] if a in arms]
    spec.setdefault("score_base", False)
    spec.setdefault("forgetting", None)
    check_statistics(spec, source)
    spec["phases"] = [p for p in PHASES if p in ("lr", "grid") or spec.get(p)]
    return spec


def check_statistics(spec: dict[str, Any], source: str) -> None:
    """The plan's test families (declared before the data), its primary arms, and tuning seeds kept apart from
    the grid's: a grid cell trained with a tuning seed inherits the selection made on that seed's validation
    loss (its arm's rate was chosen because that seed did well), unless the plan says `reuse_tune_seeds`."""
    from eval.compare_tests import declared_families, reused_tuning_seeds
    from eval.errors import EvalInputError

    try:
        spec["families"] = declared_families(spec.get("families"), source)
    except EvalInputError as err:
        raise UserError(str(err)) from None
    primary = spec.get("primary_arms")
    if isinstance(primary, str):
        primary = [a.strip() for a in primary.split(",") if a.strip()]
    if primary is not None and (not primary or any(a not in spec["arms"] or a == spec["reference"] for a in primary)):
        raise UserError(f"{source}: primary arms {primary}: name arms other than the reference "
                        f"'{spec['reference']}' among {list(spec['arms'])}")
    spec["primary_arms"] = primary
    spec["reuse_tune_seeds"] = bool(spec.get("reuse_tune_seeds"))
    shared = reused_tuning_seeds(spec)
    if shared and not spec["reuse_tune_seeds"]:
        raise UserError(f"{source}: seeds {shared} are both tuning seeds (gate / lr) and grid seeds: their grid "
                        "cells would inherit the selection made on them. Use other tuning seeds, or allow it with "
                        "`reuse_tune_seeds: true` (--reuse-tune-seeds); the report then repeats the primary family "
                        "without them")


def make_cell(plan: dict[str, Any], group: str, name: str, settings: dict[str, Any], seed: int, split: str,
              evaluate: bool, fraction: float = 1.0) -> dict[str, Any]:
    return cell_spec(plan, group, name, settings, seed, split=split, fraction=fraction, evaluate=evaluate)


def arm_settings(plan: dict[str, Any], arm: str, gate: dict[str, Any] | None) -> dict[str, Any]:
    """An arm's settings, with the gate phase's choice where the arm is gated."""
    settings = copy.deepcopy(plan["arms"][arm])
    if gate is not None and arm in plan["gated_arms"]:
        settings = deep_merge(settings, gate)
    return settings


def scaled_lr(plan: dict[str, Any], settings: dict[str, Any], scale: float) -> dict[str, Any]:
    """`settings` with the learning rates (factors, gates, coordinator) multiplied by `scale`."""
    from pipeline.config import from_dict
    from pipeline.schema import RunConfig

    raw = deep_merge(deep_merge(base_raw(plan), plan["budget"]), settings)
    train = raw.get("train") or {}
    lr = train["lr"] if "lr" in train else from_dict(RunConfig, raw, source=plan["base_config"]).train.lr  # default
    out = {"lr": float(lr) * scale}
    for key in ("lr_gate", "lr_coordinator"):
        if train.get(key) is not None:
            out[key] = float(train[key]) * scale
    return deep_merge(settings, {"train": out})


def final_settings(plan: dict[str, Any], arm: str, gate, scales: dict[str, float], rank: int) -> dict[str, Any]:
    settings = scaled_lr(plan, arm_settings(plan, arm, gate), scales[arm])
    settings = deep_merge(settings, {"adapter": {"rank": rank}})
    if arm in plan["long_context_arms"] and plan.get("long_context"):
        tasks = [*plan["budget"]["eval"]["tasks"], "long_context"]
        settings = deep_merge(settings, {"eval": {"tasks": tasks, **plan["long_context"]}})
    return settings


def grid_cells(plan: dict[str, Any], gate, scales: dict[str, float]) -> list[dict[str, Any]]:
    """Every arm x rank x seed at its chosen rate (full fine-tuning and ablations at the largest rank), seed-major
    (a sitting's machine is then a block of seeds, which the paired comparisons remove), then the base model's
    own scores (`score_base`); every scored cell also scores the `forgetting` split when the plan names one."""
    cells = []
    for arm in plan["arms"]:
        full = plan["arms"][arm].get("adapter", {}).get("method") == "full"
        for rank in [max(plan["ranks"])] if full or arm in plan["ablation_arms"] else plan["ranks"]:
            cells += [make_cell(plan, "grid", arm, final_settings(plan, arm, gate, scales, rank), seed, "test", True)
                      for seed in plan["seeds"]]
    cells.sort(key=lambda c: c["seed"])
    if plan.get("score_base"):
        base = make_cell(plan, "base", "base", {}, 0, "test", True)
        cells.append({**base, "kind": "base", "id": "base/base", "rank": None,
                      "config": {**base["config"], "run_dir": str(Path(plan["work_dir"]) / "cells" / "base" / "base")},
                      "result": str(Path(plan["results"]) / "cells" / "base" / "base.json")})
    if plan.get("forgetting"):
        cells = [{**c, "forgetting": plan["forgetting"]} for c in cells]
    return on_frozen_base(plan, "grid", cells)


def lowdata_cells(plan: dict[str, Any], gate, scales: dict[str, float]) -> list[dict[str, Any]]:
    low = plan.get("lowdata")
    if not low:
        return []
    return on_frozen_base(plan, "lowdata", [
        make_cell(plan, "lowdata", arm, final_settings(plan, arm, gate, scales, low["rank"]), seed, "test", True,
                  fraction=fraction)
        for fraction in low["fractions"] for arm in low["arms"] for seed in plan["seeds"]])


# --- a frozen base model ---------------------------------------------------------------------------


def prepare_sha256(prepare: Path) -> str:
    """Content hash of a prepared world: every file under world/ and every shard's sha256 (from the shard
    manifests, whose input paths are absolute and so left out)."""
    from data.shards import file_sha256

    h = hashlib.sha256()
    for path in sorted((prepare / "world").rglob("*")):
        if path.is_file():
            h.update(f"{path.relative_to(prepare)}:{file_sha256(path)}\n".encode())
    for manifest in sorted((prepare / "shards").rglob("manifest.json")):
        for shard in json.loads(manifest.read_text()).get("shards", []):
            h.update(f"{manifest.parent.relative_to(prepare)}/{shard['name']}:{shard['sha256']}\n".encode())
    return h.hexdigest()


def freeze_base(plan: dict[str, Any]) -> dict[str, Any] | None:
    """The base model the grid (and low-data) cells adapt, as committed files (`frozen_base`: dir, sha256,
    prepare_sha256, phases, env), checked by sha256, beside the prepared data (checked by content hash).

    Why: CPU training is reproducible on one machine but not across CPU models, and a comparison spread
    over sittings meets several machines; a base retrained per sitting would make arms run in different
    sittings adapt different bases. With one frozen base and seed-major cell order, a sitting's machine is
    a block of seeds, which the paired (per-seed) comparisons remove."""
    fb = plan.get("frozen_base")
    if not fb:
        return None
    from data.shards import file_sha256

    shared = Path(plan["work_dir"]) / "shared"
    prepared = prepare_sha256(shared / "prepare")
    if prepared != fb["prepare_sha256"]:
        raise UserError(f"{shared / 'prepare'}: the prepared world's content hash {prepared} is not "
                        f"frozen_base.prepare_sha256 {fb['prepare_sha256']}: this machine prepared other data than "
                        "the frozen base model was trained on; the comparison cannot continue here")
    weights = Path(fb["dir"]) / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{weights}: the frozen base model (frozen_base.dir) is missing")
    digest = file_sha256(weights)
    if digest != fb["sha256"]:
        raise UserError(f"{weights}: sha256 {digest} is not frozen_base.sha256 {fb['sha256']}")
    frozen = Path(plan["work_dir"]) / "shared_frozen"
    (frozen / "base").mkdir(parents=True, exist_ok=True)
    if not (frozen / "prepare").exists():  # relative: the folder may move
        (frozen / "prepare").symlink_to(Path("..") / "shared" / "prepare", target_is_directory=True)
    model = frozen / "base" / "model"
    if not (model / "model.safetensors").is_file() or file_sha256(model / "model.safetensors") != digest:
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(Path(fb["dir"]), model)
    tmp = frozen / "manifest.json.tmp"  # the shared run's records: the cells skip prepare and base here too
    tmp.write_text((shared / "manifest.json").read_text())
    os.replace(tmp, frozen / "manifest.json")
    log.info("frozen base %s (sha256 %s...) for phases %s", fb["dir"], digest[:12], ", ".join(fb["phases"]))
    return {"shared": str(frozen), "sha256": digest}


def on_frozen_base(plan: dict[str, Any], phase: str, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The phase's cells on the frozen base (if the plan freezes it for this phase): its shared folder, the
    base's sha256 as a condition of being done, the kernels' env; seed-major order."""
    fb = plan.get("frozen_base")
    if not fb or phase not in fb["phases"]:
        return cells
    shared = str(Path(plan["work_dir"]) / "shared_frozen")
    cells = [{**c, "shared": shared, "match": {"base_sha256": fb["sha256"]}, "env": dict(fb.get("env") or {})}
             for c in cells]
    return sorted(cells, key=lambda c: c["seed"])  # stable: arms in plan order within a seed
