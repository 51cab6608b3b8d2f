"""Study v2: StructLoRA against LoRA, DoRA and full fine-tuning, every arm with the same learning-rate candidates (StructLoRA also has a gate phase: its tuning budget is the larger).

    python bench/study_v2.py bench/study_v2.yaml [--jobs 2] [--phases gate,lr,grid,lowdata] [--quick]
                             [--report-only [--partial]] [--update-benchmarks]

Phases, in order; each cell is skipped when its result JSON exists with the same config, so the
study can be spread over several sittings (commit bench/results/study_v2 as cells finish):
1. gate: StructLoRA's gate variants on validation loss (>= 2 seeds), then the winner's gate
   learning rate and IB weight; the best candidate is StructLoRA's setting from then on;
2. lr: every arm (LoRA, DoRA, full fine-tuning, the StructLoRA variants) gets the same learning-rate
   candidates, chosen on validation loss over the seeds;
3. grid: every arm x rank x seed at its rate, scored on the whole test split: teacher-forced test
   loss (primary), CIDEr, VQA, GQA; long-context captioning for the arms that ask for it;
4. lowdata: small shares of the training images for the same steps (where a model can overfit).
The report (bench/study_v2_report.py) gives effect sizes against the reference with bootstrap 95%
intervals, Holm-corrected paired t-tests, and the smallest difference the study could detect.

The machinery (shared prepare + base, cells in fresh processes, atomic result files) is
bench/study.py's.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from study import _finished, base_raw, cell_spec, deep_merge, prepare_shared, run_cells  # noqa: E402

log = logging.getLogger("study_v2")
PHASES = ("gate", "lr", "grid", "lowdata")


def load_spec(path: Path, quick: bool) -> dict[str, Any]:
    """The study file; --quick narrows grid and budget with its `quick` section (same code path)."""
    import yaml

    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or "gate" not in spec or "arms" not in spec:
        raise SystemExit(f"{path}: not a v2 study file (needs base_config, budget, gate, arms, lr, ...)")
    spec["base_overrides"] = {}
    if quick:
        q = spec["quick"]
        spec["work_dir"], spec["results"] = q["work_dir"], q["results"]
        spec["budget"] = deep_merge(spec["budget"], q["budget"])
        spec["base_overrides"] = q.get("base_overrides", {})
        gate = spec["gate"]
        gate["variants"] = {k: gate["variants"][k] for k in q["gate"]["variants"]}
        gate["refine"] = {k: gate["refine"][k] for k in q["gate"]["refine"]}
        gate["seeds"] = q["gate"]["seeds"]
        spec["arms"] = {k: spec["arms"][k] for k in q["arms"]}
        spec["lr"] = {**spec["lr"], **q["lr"]}
        spec["ranks"], spec["seeds"] = q["ranks"], q["seeds"]
        spec["long_context"] = q["long_context"]
        spec["lowdata"] = {**spec["lowdata"], **q["lowdata"]}
        spec["frozen_base"] = q.get("frozen_base")
    spec["gated_arms"] = [a for a in spec.get("gated_arms", []) if a in spec["arms"]]
    spec["ablation_arms"] = [a for a in spec.get("ablation_arms", []) if a in spec["arms"]]
    lr = spec["lr"]
    lr["arms"] = [a for a in lr.get("arms", list(spec["arms"])) if a in spec["arms"]]
    lr["inherit"] = {a: b for a, b in (lr.get("inherit") or {}).items() if a in spec["arms"]}
    orphans = [a for a in spec["arms"] if a not in lr["arms"] and a not in lr["inherit"]]
    if orphans:
        raise SystemExit(f"{path}: arms {orphans} get no learning rate: list them in lr.arms or lr.inherit")
    spec["long_context_arms"] = [a for a in spec.get("long_context_arms", []) if a in spec["arms"]]
    spec["lowdata"]["arms"] = [a for a in spec["lowdata"]["arms"] if a in spec["arms"]]
    return spec


def make_cell(spec: dict[str, Any], group: str, name: str, settings: dict[str, Any], seed: int, split: str,
              evaluate: bool, fraction: float = 1.0) -> dict[str, Any]:
    """bench/study.py's cell (base config + budget + settings, its run folder and result path), plus
    whether it is scored after training (search cells only train)."""
    return {**cell_spec(spec, group, name, settings, seed, split=split, fraction=fraction), "evaluate": evaluate}


# --- the frozen base of the grid ---------------------------------------------------------------------


def prepare_sha256(prepare: Path) -> str:
    """Content hash of a prepared world: every file under world/ and every shard's sha256 (from the
    shard manifests, whose input paths are absolute and so left out)."""
    import hashlib

    from data.shards import file_sha256

    h = hashlib.sha256()
    for path in sorted((prepare / "world").rglob("*")):
        if path.is_file():
            h.update(f"{path.relative_to(prepare)}:{file_sha256(path)}\n".encode())
    for manifest in sorted((prepare / "shards").rglob("manifest.json")):
        for shard in json.loads(manifest.read_text()).get("shards", []):
            h.update(f"{manifest.parent.relative_to(prepare)}/{shard['name']}:{shard['sha256']}\n".encode())
    return h.hexdigest()


def freeze_base(spec) -> dict[str, Any] | None:
    """The base model the grid and the low-data arm adapt, as committed files (`frozen_base` in the
    study file), checked by sha256, beside the prepared world (checked by its content hash).

    Why: CPU training is reproducible on one machine but not across CPU models (study_cell.machine_info),
    and a study spread over sittings meets several machines. A base model retrained on each machine
    would differ per sitting, and arms run in different sittings would adapt different bases. With one
    frozen base and seed-major cell order, a sitting's machine is a block of seeds, which the paired
    (per-seed) comparisons remove."""
    fb = spec.get("frozen_base")
    if not fb:
        return None
    from data.shards import file_sha256

    src, shared = ROOT / fb["dir"], ROOT / spec["work_dir"] / "shared"
    prepared = prepare_sha256(shared / "prepare")
    if prepared != fb["prepare_sha256"]:
        raise SystemExit(f"{shared / 'prepare'}: the prepared world's content hash {prepared} is not "
                         f"frozen_base.prepare_sha256 {fb['prepare_sha256']}: this machine prepared other data than "
                         "the grid's base model was trained on; the grid cannot continue here")
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{weights}: the frozen base model (frozen_base.dir in the study file) is missing")
    digest = file_sha256(weights)
    if digest != fb["sha256"]:
        raise SystemExit(f"{weights}: sha256 {digest} is not frozen_base.sha256 {fb['sha256']}")
    frozen = ROOT / spec["work_dir"] / "shared_frozen"
    (frozen / "base").mkdir(parents=True, exist_ok=True)
    if not (frozen / "prepare").exists():  # relative: the worktree's path changes with the pin
        (frozen / "prepare").symlink_to(Path("..") / "shared" / "prepare", target_is_directory=True)
    model = frozen / "base" / "model"
    if not (model / "model.safetensors").is_file() or file_sha256(model / "model.safetensors") != digest:
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(src, model)
    log.info("frozen base %s (sha256 %s...) for phases %s", fb["dir"], digest[:12], ", ".join(fb["phases"]))
    return {"shared": str(frozen), "sha256": digest}


def on_frozen_base(spec, phase: str, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The phase's cells, on the frozen base (if the study freezes it for this phase): shared folder,
    the base's sha256 as a condition of being done, the kernels' env; seed-major order."""
    fb = spec.get("frozen_base")
    if not fb or phase not in fb["phases"]:
        return cells
    shared = str(ROOT / spec["work_dir"] / "shared_frozen")
    cells = [{**c, "shared": shared, "match": {"base_sha256": fb["sha256"]}, "env": dict(fb.get("env") or {})}
             for c in cells]
    return sorted(cells, key=lambda c: c["seed"])  # stable: arms in file order within a seed


def final_val_loss(result: dict[str, Any]) -> float:
    losses = result.get("val_losses") or []
    return float(losses[-1][1]) if losses else math.nan


def mean_val_loss(results: list[dict[str, Any]]) -> float:
    values = [final_val_loss(r) for r in results]
    return statistics.fmean(values) if values and all(math.isfinite(v) for v in values) else math.inf


# --- phase 1: the gate ------------------------------------------------------------------------------


def gate_stage_cells(spec, stage: str, candidates: dict[str, dict]) -> dict[str, list[dict[str, Any]]]:
    g = spec["gate"]
    rank = {"adapter": {"rank": g["rank"]}}
    return {name: [make_cell(spec, f"gate{stage}", name, deep_merge(rank, settings), seed, "val", False)
                   for seed in g["seeds"]] for name, settings in candidates.items()}


def pick(cells: dict[str, list[dict]], results: dict[str, list[dict]]) -> str:
    """The sparsest candidate among those as good as the best on validation loss (the one-standard-error
    rule of Breiman et al.): the best has the lowest final val loss averaged over seeds; a candidate is
    as good when its mean per-seed difference to the best is at most that difference's standard error
    (paired by seed); among those, the fewest kept rank directions win, then the lower loss.
    """
    loss = {name: mean_val_loss(results[name]) for name in cells}
    best = min(cells, key=loss.__getitem__)

    def by_seed(name: str) -> dict[int, float]:
        return {int(r["seed"]): final_val_loss(r) for r in results[name]}

    def as_good(name: str) -> bool:
        if name == best:
            return True
        mine, ref = by_seed(name), by_seed(best)
        diffs = [mine[s] - ref[s] for s in sorted(mine) if s in ref]
        if len(diffs) < 2 or not all(math.isfinite(d) for d in diffs):
            return False
        return statistics.fmean(diffs) <= statistics.stdev(diffs) / math.sqrt(len(diffs))

    def kept(name: str) -> float:
        values = [r.get("kept_fraction") for r in results[name]]
        return statistics.fmean(values) if values and None not in values else 1.0

    return min((name for name in cells if as_good(name)), key=lambda name: (kept(name), loss[name]))


def gate_phase(spec, runner) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the chosen gate settings, every search row). `runner(cells)` returns results in order.

    Stage 1 compares the variants. Each later stage is one step of coordinate descent: the current
    choice against each `refine` change applied on top of it (settings already trained in an earlier
    stage are reused, not run again); the search stops when a stage keeps its choice, when every
    refinement of the choice has been trained, or after `max_stages` stages."""
    g = spec["gate"]
    stage1 = gate_stage_cells(spec, "1", g["variants"])
    results = _run_named(stage1, runner)
    settings = dict(g["variants"])
    first_stage = {name: "1" for name in stage1}
    chosen = pick(stage1, results)
    winners = {chosen}
    stage = 1
    while stage < int(g.get("max_stages", 2)):
        base = settings[chosen]
        known = {json.dumps(v, sort_keys=True): k for k, v in settings.items()}
        candidates, new = {chosen: base}, {}
        for key, extra in g["refine"].items():
            refined = deep_merge(base, extra)
            name = known.get(json.dumps(refined, sort_keys=True), f"{chosen}+{key}")
            if name == chosen:
                continue
            if name in settings and settings[name] != refined:
                raise SystemExit(f"gate candidate name '{name}' is taken by other settings: rename the variant")
            candidates[name] = refined
            if name not in settings:
                new[name] = refined
        if not new:
            break
        stage += 1
        cells = gate_stage_cells(spec, str(stage), new)
        results.update(_run_named(cells, runner))
        settings.update(new)
        first_stage.update({name: str(stage) for name in new})
        previous, chosen = chosen, pick(candidates, results)
        winners.add(chosen)
        if chosen == previous:
            break
    rows = [{**r, "candidate": name, "stage": first_stage[name], "chosen": name == chosen,
             "stage_winner": name in winners and name != chosen} for name in settings for r in results[name]]
    log.info("gate: chosen %s after %d stage(s)", chosen, stage)
    return settings[chosen], rows


def _run_named(named: dict[str, list[dict]], runner) -> dict[str, list[dict]]:
    flat = [c for cells in named.values() for c in cells]
    results = runner(flat)
    by_id = {r["id"]: r for r in results}
    return {name: [by_id[c["id"]] for c in cells if c["id"] in by_id] for name, cells in named.items()}


# --- phase 2: learning rates --------------------------------------------------------------------


def arm_settings(spec, arm: str, gate: dict[str, Any] | None) -> dict[str, Any]:
    """An arm's settings, with the gate phase's choice where the arm is gated."""
    settings = copy.deepcopy(spec["arms"][arm])
    if gate is not None and arm in spec["gated_arms"]:
        settings = deep_merge(settings, gate)
    return settings


def scaled_lr(spec, settings: dict[str, Any], scale: float) -> dict[str, Any]:
    """`settings` with the learning rates (factors, gates, coordinator) multiplied by `scale`."""
    train = deep_merge(deep_merge(base_raw(spec), spec["budget"]), settings)["train"]
    lr = float(train["lr"])
    out = {"lr": lr * scale}
    for key in ("lr_gate", "lr_coordinator"):
        if train.get(key) is not None:
            out[key] = float(train[key]) * scale
    return deep_merge(settings, {"train": out})


def lr_phase(spec, gate, runner) -> tuple[dict[str, float], list[dict[str, Any]]]:
    lr = spec["lr"]
    named = {}
    for arm in lr["arms"]:
        for scale in lr["scales"]:
            settings = deep_merge(scaled_lr(spec, arm_settings(spec, arm, gate), scale),
                                  {"adapter": {"rank": lr["rank"]}})
            named[(arm, scale)] = [make_cell(spec, "lr", f"{arm}.x{scale:g}", settings, seed, "val", False)
                                   for seed in lr["seeds"]]
    results = _run_named(named, runner)
    complete = [arm for arm in lr["arms"]  # a partial report chooses nothing for an arm still running
                if all(len(results[(arm, s)]) == len(named[(arm, s)]) for s in lr["scales"])]
    chosen = {arm: min(lr["scales"], key=lambda s, a=arm: mean_val_loss(results[(a, s)])) for arm in complete}
    chosen.update({arm: chosen[source] for arm, source in lr["inherit"].items() if source in chosen})
    rows = [{**r, "arm": arm, "scale": scale, "chosen": chosen.get(arm) == scale}
            for (arm, scale), rs in results.items() for r in rs]
    log.info("lr scales: %s", json.dumps(chosen))
    return chosen, rows


# --- phases 3 and 4 --------------------------------------------------------------------------------


def final_settings(spec, arm: str, gate, scales: dict[str, float], rank: int) -> dict[str, Any]:
    settings = scaled_lr(spec, arm_settings(spec, arm, gate), scales[arm])
    settings = deep_merge(settings, {"adapter": {"rank": rank}})
    if arm in spec["long_context_arms"]:
        tasks = [*spec["budget"]["eval"]["tasks"], "long_context"]
        settings = deep_merge(settings, {"eval": {"tasks": tasks, **spec["long_context"]}})
    return settings


def grid_cells(spec, gate, scales) -> list[dict[str, Any]]:
    cells = []
    for arm in spec["arms"]:
        full = spec["arms"][arm].get("adapter", {}).get("method") == "full"
        for rank in spec["ranks"][-1:] if full or arm in spec["ablation_arms"] else spec["ranks"]:
            cells += [make_cell(spec, "grid", arm, final_settings(spec, arm, gate, scales, rank), seed, "test", True)
                      for seed in spec["seeds"]]
    return on_frozen_base(spec, "grid", cells)


def lowdata_cells(spec, gate, scales) -> list[dict[str, Any]]:
    low = spec["lowdata"]
    return on_frozen_base(spec, "lowdata", [
        make_cell(spec, "lowdata", arm, final_settings(spec, arm, gate, scales, low["rank"]), seed, "test", True,
                  fraction=fraction)
        for fraction in low["fractions"] for arm in low["arms"] for seed in spec["seeds"]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="study file, e.g. bench/study_v2.yaml")
    parser.add_argument("--quick", action="store_true", help="the file's quick grid: minutes, same code path")
    parser.add_argument("--jobs", type=int, default=1, help="cells run side by side (each in its own process)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="run cells of these phases only (later phases need the earlier ones' choices)")
    parser.add_argument("--report-only", action="store_true", help="no training: report the finished cells")
    parser.add_argument("--partial", action="store_true", help="with --report-only: report what is finished so far")
    parser.add_argument("--update-benchmarks", action="store_true", help="rewrite the study's BENCHMARKS.md section")
    parser.add_argument("--benchmarks-file", type=Path, default=ROOT / "BENCHMARKS.md", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from study_v2_report import write_report

    spec = load_spec(args.study, args.quick)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise SystemExit(f"--phases: unknown {unknown}; choose from {', '.join(PHASES)}")
    command = "python bench/study_v2.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    if not args.report_only:
        prepare_shared(spec)
        if any(p in phases for p in (spec.get("frozen_base") or {}).get("phases", [])):
            freeze_base(spec)
    missing: list[str] = []

    def runner_for(phase: str):
        if args.report_only or phase not in phases:
            return lambda cells: _finished(cells, missing if (args.partial or phase not in phases) else None)
        return lambda cells: run_cells(cells, args.jobs)

    def finished(phase: str) -> bool:
        """Did `phase` complete? Later phases need its choices: running them on a partial one is refused."""
        if missing and not args.report_only and any(p in phases for p in PHASES[PHASES.index(phase) + 1:]):
            raise SystemExit(f"phase {phase} is not finished ({len(missing)} cells, e.g. {missing[0]}): "
                             f"run --phases {phase} first")
        return not missing

    gate, gate_rows = gate_phase(spec, runner_for("gate"))
    scales, lr_rows, grid, lowdata = {}, [], [], []
    if finished("gate"):
        scales, lr_rows = lr_phase(spec, gate, runner_for("lr"))
        if finished("lr"):
            grid = runner_for("grid")(grid_cells(spec, gate, scales))
            lowdata = runner_for("lowdata")(lowdata_cells(spec, gate, scales))
    out = write_report(spec, gate_rows, gate, lr_rows, scales, grid, lowdata, command=command,
                       benchmarks=args.benchmarks_file if args.update_benchmarks else None, missing=missing)
    log.info("reported in %.0f s: %s", time.time() - t0, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
