"""The StructLoRA study: methods x ranks x seeds, ablations, a low-data sweep, significance.

    python bench/study.py bench/study.yaml [--jobs 2] [--quick] [--report-only] [--update-benchmarks]

Phases, in order (each cell is skipped when its result JSON exists with the same settings):
1. prepare + base once (the pipeline's own stages, on base_config), shared by every cell;
2. search: candidates of StructLoRA's gate/coordinator settings and of the static penalties'
   weights, scored on the validation split (never test); the best of each method is kept;
3. grid: every method x rank x seed (full fine-tuning once per seed), scored on the test split;
4. ablations and the low-data sweep (at `ablation_rank`), on the test split;
5. report: CSVs, tables with paired t-tests, plots (bench/study_report.py), and with
   --update-benchmarks the study's section of BENCHMARKS.md.

A cell runs the pipeline's train and eval stages in a fresh process (torch threads fixed by
`threads`), so its peak memory is its own and the same command reproduces the same numbers
on the same machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from study_cell import run_cell  # noqa: E402 - after the path set-up

log = logging.getLogger("study")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `extra` merged in, mappings recursively."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_study(path: Path, quick: bool) -> dict[str, Any]:
    """The study spec; --quick narrows the grid and budget with the file's `quick` section."""
    import yaml

    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or "base_config" not in spec:
        raise SystemExit(f"{path}: not a study file (needs base_config, budget, methods, ...)")
    spec["base_overrides"] = {}
    if quick:
        q = spec["quick"]
        spec["work_dir"], spec["results"] = q["work_dir"], q["results"]
        spec["budget"] = deep_merge(spec["budget"], q["budget"])
        spec["base_overrides"] = q.get("base_overrides", {})
        spec["methods"] = {m: spec["methods"][m] for m in q["methods"]}
        spec["ranks"], spec["seeds"], spec["fractions"] = q["ranks"], q["seeds"], q["fractions"]
        spec["search"]["candidates"] = {m: {c: spec["search"]["candidates"][m][c] for c in names}
                                        for m, names in q["search"].items()}
        spec["ablations"] = {a: spec["ablations"][a] for a in q["ablations"]}
        spec["ablation_rank"] = q["ranks"][-1]
        spec["search"]["rank"] = q["ranks"][-1]
        spec["fraction_methods"] = [m for m in spec["fraction_methods"] if m in spec["methods"]]
    return spec


def base_raw(spec: dict[str, Any]) -> dict[str, Any]:
    from pipeline.config import read_yaml

    raw = deep_merge(read_yaml(ROOT / spec["base_config"]), spec["base_overrides"])
    raw["run_dir"] = str(ROOT / spec["work_dir"] / "shared")
    return raw


def prepare_shared(spec: dict[str, Any]) -> Path:
    """Run prepare + base once (the pipeline skips them when they are done with the same config)."""
    from pipeline.config import from_dict
    from pipeline.runner import run_stages
    from pipeline.schema import RunConfig

    raw = base_raw(spec)
    cfg = from_dict(RunConfig, raw, source=spec["base_config"])
    shared = Path(raw["run_dir"])
    shared.mkdir(parents=True, exist_ok=True)
    run_stages(cfg, shared, ["prepare", "base"])
    return shared


def method_settings(spec: dict[str, Any], method: str, rank: int, chosen: dict[str, dict]) -> dict[str, Any]:
    """The config overrides of `method` at `rank` (with its searched settings, if any)."""
    settings = copy.deepcopy(spec["methods"][method])
    per_rank = settings.pop("vera_rank_per_rank", None)
    settings = deep_merge(settings, {"adapter": {"rank": rank}})
    if per_rank:
        settings = deep_merge(settings, {"adapter": {"vera_rank": per_rank * rank}})
    return deep_merge(settings, chosen.get(method, {}))


def cell_spec(spec: dict[str, Any], group: str, name: str, settings: dict[str, Any], seed: int,
              split: str = "test", fraction: float = 1.0) -> dict[str, Any]:
    raw = deep_merge(base_raw(spec), spec["budget"])
    raw = deep_merge(raw, settings)
    raw = deep_merge(raw, {"train": {"seed": seed, "data_fraction": fraction}, "eval": {"split": split}})
    rank = raw["adapter"]["rank"] if raw["adapter"]["method"] != "full" else 0
    cell_id = f"{group}/{name}-r{rank}-s{seed}" + (f"-f{fraction:g}" if fraction < 1.0 else "")
    raw["run_dir"] = str(ROOT / spec["work_dir"] / "cells" / cell_id)
    return {"id": cell_id, "group": group, "name": name, "rank": rank, "seed": seed, "fraction": fraction,
            "split": split, "config": raw, "shared": str(ROOT / spec["work_dir"] / "shared"),
            "result": str(ROOT / spec["results"] / "cells" / f"{cell_id}.json"), "threads": spec["threads"]}


def is_done(cell: dict[str, Any]) -> bool:
    path = Path(cell["result"])
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    # `match`: result fields the cell must also agree on (study v2's grid: the frozen base's sha256)
    return saved.get("config") == _comparable(cell["config"]) and all(
        saved.get(k) == v for k, v in cell.get("match", {}).items())


def _comparable(raw: dict[str, Any]) -> dict[str, Any]:
    """The cell's config as saved in its result (paths are relative, so results move with the repo)."""
    out = copy.deepcopy(raw)
    out["run_dir"] = os.path.relpath(out["run_dir"], ROOT)
    return out


def run_cells(cells: list[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    """Run the cells that are not done yet, `jobs` at a time, each in a fresh process."""
    from tqdm import tqdm

    todo = [c for c in cells if not is_done(c)]
    if todo:
        log.info("%d of %d cells to run (%d done)", len(todo), len(cells), len(cells) - len(todo))
        ctx = mp.get_context("spawn")
        fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}  # a process per cell
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, **fresh) as pool:
            futures = {pool.submit(run_cell, {**c, "config_saved": _comparable(c["config"])}): c for c in todo}
            bar = tqdm(total=len(todo), desc="cells", unit="cell", dynamic_ncols=True)
            for future in as_completed(futures):
                cell = futures[future]
                try:
                    result = future.result()
                except BaseException:  # a failing cell stops the study now, not after the queue drains
                    log.error("cell %s failed", cell["id"])
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                bar.update(1)
                bar.set_postfix_str(f"{cell['id']}: " + ", ".join(f"{k} {v:.3g}" for k, v in result["scores"].items()))
            bar.close()
    return [json.loads(Path(c["result"]).read_text()) for c in cells]


def score_of(result: dict[str, Any]) -> float:
    """One number to rank candidates: the mean of CIDEr x 100, VQA and GQA accuracy."""
    s = result["scores"]
    return (100.0 * s["CIDEr"] + s["VQA"] + s["GQA"]) / 3.0


def search(spec: dict[str, Any], runner) -> tuple[dict[str, dict], list[dict]]:
    """Score every candidate on the validation split; return the winner's settings per method.

    `runner(cells)` returns the cells' results (runs them, or reads finished ones)."""
    s = spec["search"]
    cells = []
    for method, candidates in s["candidates"].items():
        for cand, extra in candidates.items():
            settings = deep_merge(method_settings(spec, method, s["rank"], {}), extra)
            cells.append((method, cand, extra, cell_spec(spec, "search", f"{method}.{cand}", settings, s["seed"],
                                                          split=s["split"])))
    results = runner([c[3] for c in cells])
    chosen, best = {}, {}
    for (method, cand, extra, _), result in zip(cells, results):
        if math.isfinite(score_of(result)) and (method not in best or score_of(result) > best[method]):
            best[method], chosen[method] = score_of(result), {"candidate": cand, **extra}
    return {m: {k: v for k, v in c.items() if k != "candidate"} for m, c in chosen.items()}, \
        [{**r, "candidate": c[1], "candidate_settings": c[2], "method": c[0]} for c, r in zip(cells, results)]


def grid_cells(spec: dict[str, Any], chosen: dict[str, dict]) -> list[dict[str, Any]]:
    cells = []
    for method in spec["methods"]:
        for rank in ([spec["ranks"][-1]] if method == "full" else spec["ranks"]):
            for seed in spec["seeds"]:
                cells.append(cell_spec(spec, "grid", method, method_settings(spec, method, rank, chosen), seed))
    r = spec["ablation_rank"]
    for name, extra in spec["ablations"].items():
        settings = deep_merge(method_settings(spec, "structlora", r, chosen), extra)
        cells += [cell_spec(spec, "ablation", name, settings, seed) for seed in spec["seeds"]]
    for method in spec["fraction_methods"]:
        for fraction in spec["fractions"]:
            cells += [cell_spec(spec, "fraction", method, method_settings(spec, method, r, chosen), seed,
                                fraction=fraction) for seed in spec["seeds"]]
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="study file, e.g. bench/study.yaml")
    parser.add_argument("--quick", action="store_true", help="the file's quick grid: minutes, same code path")
    parser.add_argument("--jobs", type=int, default=1, help="cells run side by side (each in its own process)")
    parser.add_argument("--report-only", action="store_true", help="no training: report the finished cells")
    parser.add_argument("--partial", action="store_true",
                        help="with --report-only: report what is finished so far (the report says how much is missing)")
    parser.add_argument("--update-benchmarks", action="store_true", help="rewrite the study's BENCHMARKS.md section")
    parser.add_argument("--benchmarks-file", type=Path, default=ROOT / "BENCHMARKS.md", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from study_report import write_report

    spec = load_study(args.study, args.quick)
    command = "python bench/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    if not args.report_only:
        prepare_shared(spec)
    missing: list[str] = []
    if args.report_only:
        def runner(cells):
            return _finished(cells, missing if args.partial else None)
    else:
        def runner(cells):
            return run_cells(cells, args.jobs)
    chosen, search_rows = search(spec, runner)
    log.info("searched settings: %s", json.dumps(chosen))
    cells = grid_cells(spec, chosen)
    results = runner(cells)
    out = write_report(spec, results, search_rows, chosen, command=command,
                       benchmarks=args.benchmarks_file if args.update_benchmarks else None, missing=missing)
    log.info("%d cells reported in %.0f s: %s", len(results), time.time() - t0, out)
    return 0


def _finished(cells: list[dict[str, Any]], missing: list[str] | None = None) -> list[dict[str, Any]]:
    """Results of finished cells; unfinished ones stop the report, or with `missing` (--partial) are listed there."""
    todo = [c["id"] for c in cells if not is_done(c)]
    if todo and missing is None:
        raise SystemExit(f"--report-only: {len(todo)} cells are not finished, e.g. {todo[0]}; run the study "
                         "(or add --partial)")
    if missing is not None:
        missing += todo
    return [json.loads(Path(c["result"]).read_text()) for c in cells if c["id"] not in todo]


if __name__ == "__main__":
    sys.exit(main())
