"""`structlora compare`: does a method help on this model and this data? A fair, powered comparison.

    structlora compare CONFIG --methods lora,structlora [--ranks 8] [--seeds 3] [--lr-grid 0.5,1,2]
                       [--tune-seeds 1] [--reuse-tune-seeds] [--metric test_loss] [--primary-arms ARMS]
                       [--jobs N] [--out DIR] [--launcher local|slurm] [--report-only [--partial]] [--plan FILE]
    structlora compare --pool DIR[:REF,ARM] [DIR...] [--methods REF,ARM] [--metric test_loss] [--out DIR]

Phases, each a set of cells (pipeline.compare.cells), each cell an ordinary run directory (the
tuning phases, 1 and 2, are pipeline.compare.tuning):
0. prepare + base once, in OUT/shared: every cell adapts that one base on that one prepared data;
1. gate (plan files only): StructLoRA's gate variants on validation loss, coordinate descent;
2. lr: every arm gets the same candidates (multiples of its configured rate), chosen on the final
   validation loss averaged over the tuning seeds (disjoint from the grid's unless --reuse-tune-seeds);
   never on the test split;
3. grid: every arm x rank x seed at its chosen rate, scored on the test split (the teacher-forced test
   loss always; the config's eval tasks);
4. lowdata (plan files only): a share of the training images for the same steps.
Then the report (eval.compare_report): paired differences against the reference arm with t intervals,
paired t-tests, Holm within each declared family (eval.compare_tests), the minimum detectable difference at
the family's Holm level, learning curves and cost per arm. --pool pools finished comparisons of one arm pair
by a random-effects meta-analysis (eval.compare_pool). Every phase skips its finished cells, so an interrupted comparison continues cell by cell.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.compare.cells import (
    base_raw,
    finished,
    refuse_replacing,
    run_cells,
    write_slurm,
)
from pipeline.compare.plan import (
    PHASES,
    freeze_base,
    grid_cells,
    lowdata_cells,
)
from pipeline.compare.tuning import Runner, gate_phase, lr_phase
from pipeline.errors import UserError


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
                    results: str | None = None, command: str = "", rerun_other_base: bool = False,
                    primary_arms: str | None = None, reuse_tune_seeds: bool = False, pool: list[str] | None = None,
                    per_rank: bool = False, tau2: str = "reml") -> dict[str, Any]:
    """`structlora compare`'s arguments -> a plan -> run_compare; prints where the report (or job array) is.
    With `pool`: the pooled meta-analysis of those results folders (no CONFIG, nothing trains)."""
    import os

    from pipeline.compare.plan import load_plan, plan_from_flags

    if pool:
        from eval.compare_pool import pool as pool_folders

        pair = [m.strip() for m in (methods or "lora,structlora").split(",") if m.strip()]
        if len(pair) != 2 or config:
            raise UserError("--pool DIR [DIR...]: no CONFIG; --methods names one pair, REF,ARM (default lora,structlora)")
        missing = [d for d in pool if not Path(d.partition(":")[0]).is_dir()]
        if missing:
            raise UserError(f"--pool: {', '.join(missing)}: not a folder (a comparison's results folder)")
        result = pool_folders(pool, (pair[0], pair[1]), metric, Path(out or "runs/pool"), tau2, per_rank,
                              command=command or "structlora compare --pool")
        print(f"report: {result['report']}")
        return result
    if not config:
        raise UserError("structlora compare: give a CONFIG (or --pool DIR [DIR...])")
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
        if primary_arms or reuse_tune_seeds:
            from pipeline.compare.plan import check_statistics

            plan["primary_arms"] = primary_arms or plan["primary_arms"]
            plan["reuse_tune_seeds"] = reuse_tune_seeds or plan["reuse_tune_seeds"]
            check_statistics(plan, plan_file)
    else:
        if not methods:
            raise UserError("--methods: name the methods to compare, e.g. --methods lora,structlora (or give --plan FILE)")
        out_dir = Path(out) if out else Path("runs") / f"compare-{Path(config).stem}"
        plan = plan_from_flags(Path(config), [m.strip() for m in methods.split(",") if m.strip()],
                               _numbers(ranks, int, "--ranks"), seeds, _numbers(lr_grid, float, "--lr-grid"), tune_seeds,
                               metric, out_dir, threads, overrides, diagnostics, forgetting,
                               Path(results) if results else None,
                               [a.strip() for a in primary_arms.split(",") if a.strip()] if primary_arms else None,
                               reuse_tune_seeds)
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
