"""The tuning phases of `structlora compare`, chosen on validation loss (never on the test split).

1. gate (plan files only): StructLoRA's gate variants, then coordinate descent over the `refine`
   changes; the choice is the one-standard-error rule (`pick`);
2. lr: every arm gets the same candidates (multiples of its configured rate), chosen on the final
   validation loss averaged over the tuning seeds.
Each phase takes a `Runner` (cells -> the result records of those finished); pipeline.compare.command
runs the phases in order and the grid after them.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable
from typing import Any

from pipeline.compare.cells import deep_merge
from pipeline.compare.plan import arm_settings, make_cell, on_frozen_base, scaled_lr
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
