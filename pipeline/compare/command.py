"""`structlora compare`: does a method help on this model and this data? A fair, powered comparison.

    structlora compare CONFIG --methods lora,structlora [--ranks 8] [--seeds 3] [--lr-grid 0.5,1,2]
                       [--tune-seeds 1] [--metric test_loss] [--jobs N] [--out DIR]
                       [--launcher local|slurm] [--report-only [--partial]] [--plan FILE]

Phases, each a set of cells (pipeline.compare.cells), each cell an ordinary run directory:
0. prepare + base once, in OUT/shared: every cell adapts that one base on that one prepared data;
1. gate (plan files only): StructLoRA's gate variants on validation loss, coordinate descent;
2. lr: every arm gets the same candidates (multiples of its configured rate), chosen on the final
   validation loss averaged over the tuning seeds; never on the test split;
3. grid: every arm x rank x seed at its chosen rate, scored on the test split (the teacher-forced test
   loss always; the config's eval tasks);
4. lowdata (plan files only): a share of the training images for the same steps.
Then the report (eval.compare_report): paired differences against the reference arm with bootstrap
intervals, paired t-tests, Holm over the family, the minimum detectable difference, learning curves and
cost per arm. Every phase skips its finished cells, so an interrupted comparison continues cell by cell.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.compare.cells import (
    base_raw,
    deep_merge,
    finished,
    refuse_replacing,
    run_cells,
    write_slurm,
)
from pipeline.compare.plan import (
    PHASES,
    arm_settings,
    freeze_base,
    grid_cells,
    lowdata_cells,
    make_cell,
    on_frozen_base,
    scaled_lr,
)
from pipeline.errors import UserError

log = logging.getLogger("structlora.compare")
Runner = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def final_val_loss(result: dict[str, Any]) -> float:
    losses = result.get("val_losses") or []
    return float(losses[-1][1]) if losses else math.nan


def mean_val_loss(results: list[dict[str, Any]]) -> float:
    values = [final_val_loss(r) for r in results]
    return statistics.fmean(values) if values and all(math.isfinite(v) for v in values) else math.inf


def _unfinished(named: dict[Any, list[dict]], results: dict[Any, list[dict]]) -> bool:
    return any(len(results.get(name, [])) < len(cells) for name, cells in named.items())


def _run_named(named: dict[Any, list[dict]], runner: Runner) -> dict[Any, list[dict]]:
    flat = [c for cells in named.values() for c in cells]
    by_id = {r["id"]: r for r in runner(flat)}
    return {name: [by_id[c["id"]] for c in cells if c["id"] in by_id] for name, cells in named.items()}


# --- phase 1: the gate --------------------------------------------------------------------------------


def gate_stage_cells(plan, stage: str, candidates: dict[str, dict]) -> dict[str, list[dict[str, Any]]]:
    g = plan["gate"]
    rank = {"adapter": {"rank": g["rank"]}}
    return {name: [make_cell(plan, f"gate{stage}", name, deep_merge(rank, settings), seed, "val", False)
                   for seed in g["seeds"]] for name, settings in candidates.items()}


def pick(cells: dict[str, list[dict]], results: dict[str, list[dict]]) -> str:
    """The sparsest candidate among those as good as the best on validation loss (the one-standard-error
    rule of Breiman et al.): the best has the lowest final val loss averaged over seeds; a candidate is as
    good when its mean per-seed difference to the best is at most that difference's standard error (paired
    by seed); among those, the fewest kept rank directions win, then the lower loss."""
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


def gate_phase(plan, runner: Runner) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(the chosen gate settings, every search row). Stage 1 compares the variants; each later stage is
    one step of coordinate descent: the current choice against each `refine` change on top of it (settings
    trained in an earlier stage are reused); it stops when a stage keeps its choice, when every refinement
    has been trained, or after `max_stages` stages."""
    g = plan.get("gate")
    if not g:
        return None, []
    stage1 = gate_stage_cells(plan, "1", g["variants"])
    results = _run_named(stage1, runner)
    settings = dict(g["variants"])
    first_stage = {name: "1" for name in stage1}
    if _unfinished(stage1, results):  # a choice needs every candidate: no stage 2 on a guess
        return None, [{**r, "candidate": n, "stage": "1", "chosen": False, "stage_winner": False}
                      for n in stage1 for r in results[n]]
    chosen = pick(stage1, results)
    winners, stage = {chosen}, 1
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
                raise UserError(f"gate candidate name '{name}' is taken by other settings: rename the variant")
            candidates[name] = refined
            if name not in settings:
                new[name] = refined
        if not new:
            break
        stage += 1
        cells = gate_stage_cells(plan, str(stage), new)
        results.update(_run_named(cells, runner))
        settings.update(new)
        first_stage.update({name: str(stage) for name in new})
        if _unfinished(cells, results):
            return None, [{**r, "candidate": n, "stage": first_stage[n], "chosen": False, "stage_winner": n in winners}
                          for n in settings for r in results.get(n, [])]
        previous, chosen = chosen, pick(candidates, results)
        winners.add(chosen)
        if chosen == previous:
            break
    rows = [{**r, "candidate": name, "stage": first_stage[name], "chosen": name == chosen,
             "stage_winner": name in winners and name != chosen} for name in settings for r in results[name]]
    log.info("gate: chosen %s after %d stage(s)", chosen, stage)
    return settings[chosen], rows


# --- phase 2: learning rates ---------------------------------------------------------------------------


def lr_cells(plan, gate) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """{(arm, scale): its cells, one per seed} of the lr search: each searched arm at each candidate rate, at the
    search's rank, scored on the validation split."""
    lr, named = plan["lr"], {}
    for arm in lr["arms"]:
        for scale in lr["scales"]:
            settings = deep_merge(scaled_lr(plan, arm_settings(plan, arm, gate), scale), {"adapter": {"rank": lr["rank"]}})
            named[(arm, scale)] = on_frozen_base(plan, "lr", [
                make_cell(plan, "lr", f"{arm}.x{scale:g}", settings, seed, "val", False) for seed in lr["seeds"]])
    return named


def lr_phase(plan, gate, runner: Runner) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """{arm: chosen scale} (of the arms whose candidates all finished) and every search row. One candidate
    is no choice: no cell runs."""
    lr = plan["lr"]
    if len(lr["scales"]) == 1:
        only = float(lr["scales"][0])
        return {arm: only for arm in plan["arms"]}, []
    named = lr_cells(plan, gate)
    results = _run_named(named, runner)
    complete = [arm for arm in lr["arms"]  # a partial report chooses nothing for an arm still running
                if all(len(results[(arm, s)]) == len(named[(arm, s)]) for s in lr["scales"])]
    for arm in complete:
        if all(not math.isfinite(mean_val_loss(results[(arm, s)])) for s in lr["scales"]):
            raise UserError(f"lr phase: every candidate of arm '{arm}' diverged ({lr['scales']} x its configured rate): "
                            "try smaller multiples, e.g. --lr-grid 0.1,0.25,0.5")
    chosen = {arm: min(lr["scales"], key=lambda s, a=arm: mean_val_loss(results[(a, s)])) for arm in complete}
    chosen.update({arm: chosen[source] for arm, source in lr["inherit"].items() if source in chosen})
    rows = [{**r, "arm": arm, "scale": scale, "chosen": chosen.get(arm) == scale}
            for (arm, scale), rs in results.items() for r in rs]
    log.info("lr scales: %s", json.dumps(chosen))
    return chosen, rows


# --- the whole comparison ------------------------------------------------------------------------------


def prepare_shared(plan: dict[str, Any]) -> Path:
    """prepare + base once, in the shared folder (skipped when done with the same config)."""
    from pipeline.config import from_dict, save_config
    from pipeline.schema import RunConfig
    from pipeline.stages.runner import run_stages

    raw = base_raw(plan)
    cfg = from_dict(RunConfig, raw, source=plan["base_config"])
    shared = Path(raw["run_dir"])
    shared.mkdir(parents=True, exist_ok=True)
    save_config(cfg, shared / "config.yaml")
    run_stages(cfg, shared, ["prepare", "base"])
    return shared


def budget_line(plan, grid_or_any: dict[str, Any] | None) -> str:
    """What every cell did, from a cell's own config (the plan's budget merged into the CONFIG)."""
    from pipeline.config import from_dict
    from pipeline.schema import RunConfig

    if not (grid_or_any or {}).get("config"):
        return ""
    cfg = from_dict(RunConfig, grid_or_any["config"], source=grid_or_any["id"])  # with the defaults it ran with
    train, ev = cfg.train, cfg.eval
    samples = "the whole test split" if ev.max_samples is None else f"{ev.max_samples} test samples per task"
    return (f"Every cell: the prepared data of `{plan['base_config']}` and its base model, then {train.max_steps} "
            f"steps of batch {train.batch_size}, validation loss every {train.eval_every} steps on "
            f"{train.val_batches} fixed batches; grid cells are scored on {samples}.")


def preflight(plan: dict[str, Any], shared: Path) -> None:
    """Refuse now what would fail after training: a backbone without the test loss, a split the grid scores
    that was not prepared (test, the forgetting split), a primary metric no scored task gives."""
    from pipeline.config import load_config
    from pipeline.schema import RunConfig

    cfg = load_config(RunConfig, shared / "config.yaml")
    if cfg.model.arch == "vit":
        raise UserError(f"{plan['base_config']}: `structlora compare` compares methods on image-text models "
                        f"(model.arch: llava or vlm); a {cfg.model.arch} classifier has no teacher-forced test loss")
    shards = shared / "prepare" / "shards"
    tasks = [t for t, w in cfg.data.tasks.items() if w > 0]
    for split in ("test", "val", *([plan["forgetting"]] if plan.get("forgetting") else [])):
        absent = [t for t in tasks if not (shards / t / split).is_dir()]
        if absent:
            raise UserError(f"{shards}: no '{split}' split for {', '.join(absent)}: the comparison "
                            f"{'chooses on val' if split == 'val' else 'scores it'}; prepare it first "
                            f"(e.g. structlora prepare coco ... --split {split}) or point data at it")
    metric = plan.get("metric", "test_loss")
    task = metric.split(".", 1)[0]
    if task != "test_loss" and task not in [*cfg.eval.tasks, *tasks]:
        raise UserError(f"--metric {metric}: the cells do not score task '{task}' (eval.tasks: "
                        f"{', '.join(cfg.eval.tasks)}); e.g. test_loss, caption.CIDEr, vqav2.overall, gqa.accuracy")


def base_identity(shared: Path) -> str:
    """What the cells adapt, as one id: the sha256 of the shared base model's weights (small models), else the
    config's model name and revision and the base stage's config hash (a base too large to hash, a hub model)."""
    import hashlib

    from data.shards import file_sha256
    from pipeline.stages.runner import Manifest

    files = sorted((shared / "base" / "model").glob("*.safetensors"))
    if files and sum(f.stat().st_size for f in files) < 2**31:
        blob = "".join(f"{f.name}:{file_sha256(f)}\n" for f in files)
    else:  # a large or hub base: its name, revision and the base stage's config hash (no timestamps)
        from pipeline.config import load_config
        from pipeline.schema import RunConfig

        model = load_config(RunConfig, shared / "config.yaml").model
        record = Manifest(shared / "manifest.json").stage("base")
        blob = json.dumps({"model": model.name_or_path, "revision": getattr(model, "revision", None),
                           "files": [f.name for f in files], "hash": record.get("hash")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_compare(plan: dict[str, Any], jobs: int = 1, launcher: str = "local", phases: list[str] | None = None,
                report_only: bool = False, partial: bool = False, accelerate_config: str | None = None,
                sbatch: list[str] | None = None, command: str = "structlora compare",
                report: dict[str, Any] | None = None, rerun_other_base: bool = False) -> dict[str, Any]:
    """Run what is not finished of `phases` (default: all of the plan's), then report (`report`: name,
    title, link_root of eval.compare_report.write_report). Returns {"report", "missing", "slurm"}."""
    from eval.compare_report import write_report

    phases = phases or plan["phases"]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise UserError(f"--phases: unknown {unknown}; choose from {', '.join(plan['phases'])}")
    out = Path(plan["work_dir"])
    if not report_only:
        preflight(plan, prepare_shared(plan))
        if any(p in phases for p in (plan.get("frozen_base") or {}).get("phases", [])):
            freeze_base(plan)
    missing: list[str] = []
    slurm: list[Path] = []

    shared_id = None if report_only or plan.get("frozen_base") else base_identity(out / "shared")

    def runner_for(phase: str) -> Runner:
        inner = _runner_for(phase)
        if shared_id is None:
            return inner
        # cells count as done only on this shared base: a base trained again (another machine) is another base
        return lambda cells: inner([{**c, "match": {**c.get("match", {}), "base_id": shared_id}} for c in cells])

    def guarded(run: Runner) -> Runner:
        def run_here(cells):
            if not rerun_other_base:
                refuse_replacing(cells)
            return run(cells)
        return run_here

    def _runner_for(phase: str) -> Runner:
        if report_only or phase not in phases:
            return lambda cells: finished(cells, missing if (partial or phase not in phases) else None)
        return guarded(_launch(phase))

    def _launch(phase: str) -> Runner:
        if launcher == "slurm":
            def submit(cells):
                script = write_slurm(cells, out, phase, accelerate_config, sbatch)
                if script is not None:
                    slurm.append(script)
                return finished(cells, missing)
            return submit
        return lambda cells: run_cells(cells, jobs, accelerate_config)

    def done(phase: str) -> bool:
        """Did `phase` complete? Later phases need its choices: running them on a partial one is refused."""
        if missing and not report_only and launcher == "local" and any(
                p in phases for p in PHASES[PHASES.index(phase) + 1:]):
            raise UserError(f"phase {phase} is not finished ({len(missing)} cells, e.g. {missing[0]}): "
                            f"run --phases {phase} first")
        return not missing

    gate, gate_rows = gate_phase(plan, runner_for("gate"))
    scales, lr_rows, grid, lowdata, base = {}, [], [], [], []
    if done("gate"):
        scales, lr_rows = lr_phase(plan, gate, runner_for("lr"))
        if done("lr"):
            grid = runner_for("grid")(grid_cells(plan, gate, scales))
            base = [r for r in grid if r["group"] == "base"]
            grid = [r for r in grid if r["group"] != "base"]
            lowdata = runner_for("lowdata")(lowdata_cells(plan, gate, scales)) if plan.get("lowdata") else []
    if slurm:
        return {"report": None, "missing": missing, "slurm": str(slurm[0])}
    path = write_report(plan, gate_rows, gate, lr_rows, scales, grid, lowdata, command=command, missing=missing,
                        base=base[0] if base else None, budget=budget_line(plan, (grid or [None])[0]),
                        **(report or {}))
    return {"report": str(path), "missing": missing, "slurm": None}


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text}: expected comma-separated numbers, e.g. {flag} 0.5,1,2") from None


def compare_command(config: str, methods: str | None = None, ranks: str = "8", seeds: int = 3, lr_grid: str = "0.5,1,2",
                    tune_seeds: int = 1, metric: str = "test_loss", out: str | None = None, jobs: int = 1,
                    threads: int | None = None, launcher: str = "local", report_only: bool = False,
                    partial: bool = False, plan_file: str | None = None, quick: bool = False,
                    phases: str | None = None, accelerate_config: str | None = None, sbatch: list[str] | None = None,
                    overrides: list[str] | None = None, diagnostics: bool = False, forgetting: str | None = None,
                    results: str | None = None, command: str = "", rerun_other_base: bool = False) -> dict[str, Any]:
    """`structlora compare`'s arguments -> a plan -> run_compare; prints where the report (or job array) is."""
    import os

    from pipeline.compare.plan import load_plan, plan_from_flags

    if not Path(config).is_file():
        raise UserError(f"{config}: config file not found")
    if threads is None:  # cells side by side share the cores; a Slurm task uses what it was given
        threads = max(1, (os.cpu_count() or 1) // max(1, jobs)) if launcher == "local" else None
    if plan_file:
        if methods:
            raise UserError("--methods with --plan: the plan file names the arms (and ranks, seeds, lr candidates)")
        plan = load_plan(Path(plan_file), Path(out) if out else None, quick, overrides)
        plan["base_config"] = str(config)
        plan.setdefault("threads", threads)
        plan["forgetting"] = forgetting or plan.get("forgetting")
        if results:
            plan["results"] = results
    else:
        if not methods:
            raise UserError("--methods: name the methods to compare, e.g. --methods lora,structlora (or give --plan FILE)")
        out_dir = Path(out) if out else Path("runs") / f"compare-{Path(config).stem}"
        plan = plan_from_flags(Path(config), [m.strip() for m in methods.split(",") if m.strip()],
                               _numbers(ranks, int, "--ranks"), seeds, _numbers(lr_grid, float, "--lr-grid"), tune_seeds,
                               metric, out_dir, threads, overrides, diagnostics, forgetting,
                               Path(results) if results else None)
    if metric != "test_loss" or not plan_file:
        plan["metric"] = metric
    result = run_compare(plan, jobs=jobs, launcher=launcher, report_only=report_only, partial=partial,
                         phases=[p.strip() for p in phases.split(",")] if phases else None,
                         accelerate_config=accelerate_config, sbatch=sbatch, command=command or "structlora compare",
                         rerun_other_base=rerun_other_base)
    if result["slurm"]:
        print(f"wrote a Slurm job array: sbatch {result['slurm']}\n"
              "when it has finished, run this command again: it writes the next phase's array, or the report")
    else:
        print(f"report: {result['report']}")
    return result
