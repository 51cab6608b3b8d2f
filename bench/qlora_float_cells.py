"""The QLoRA study's float arms are the long-context study's cells: check that, and copy their records over.

bench/qlora.yaml's `lora` and `structlora` arms are bench/long_context.yaml's: the same frozen config, work
directory, budget, lr candidates and seeds, so each of their cells (the lr search, the grid and the base model's
scores) has the same config and run directory, and runs on the same base. This script builds both plans' cells
and checks that every shared cell is the same cell; then, unless `--check`, it copies the long-context study's
records into bench/results/qlora/cells (always overwriting: they are mirrors) and refuses while any is missing:
the QLoRA study would otherwise train those cells itself, in the same run directories, perhaps while the
long-context study is running them. `make qlora-study` runs it first.

    python bench/qlora_float_cells.py [--check]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_ARMS = ("lora", "structlora")


def shared_cells(root: Path = ROOT) -> list[tuple[dict, dict]]:
    """(long-context cell, QLoRA cell) pairs of the float arms and the base model, every lr candidate and every
    grid seed; raises AssertionError naming the first cell whose spec differs."""
    from pipeline.compare import lr_cells
    from pipeline.compare_cells import comparable
    from pipeline.compare_plan import grid_cells, load_plan

    os.chdir(root)  # the plans name their files relative to the repository, as `structlora compare` runs there
    plans = {name: load_plan(Path("bench") / f"{name}.yaml", None) for name in ("long_context", "qlora")}
    cells: dict[str, dict[str, dict]] = {}
    for name, plan in plans.items():
        found = {}
        for arm in SHARED_ARMS:
            assert arm in plan["lr"]["arms"], f"{name}: the lr search leaves out {arm}"
        for (arm, _), lr_group in lr_cells(plan, None).items():
            if arm in SHARED_ARMS:
                found.update((cell["id"], cell) for cell in lr_group)
        for cell in grid_cells(plan, None, {arm: 1.0 for arm in plan["arms"]}):
            if cell["name"] in (*SHARED_ARMS, "base"):
                found[cell["id"]] = cell
        cells[name] = found
    ours, theirs = cells["qlora"], cells["long_context"]
    assert ours.keys() == theirs.keys(), f"cells only in one plan: {sorted(ours.keys() ^ theirs.keys())[:4]}"
    for cell_id, cell in theirs.items():
        other = ours[cell_id]
        assert comparable(cell["config"]) == comparable(other["config"]), f"{cell_id}: the configs differ"
        assert cell["config"]["run_dir"] == other["config"]["run_dir"], f"{cell_id}: the run directories differ"
    return [(theirs[i], ours[i]) for i in sorted(theirs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the float arms are the same cells")
    args = parser.parse_args(argv)
    pairs = shared_cells()
    print(f"{len(pairs)} cells of bench/qlora.yaml are bench/long_context.yaml's (the float arms and the base)")
    if args.check:
        return 0
    missing = [src["id"] for src, _ in pairs if not (ROOT / src["result"]).is_file()]
    if missing:
        print(f"error: {len(missing)} of them are not finished in bench/results/long_context (e.g. {missing[0]}): "
              "finish `make long-context-study` first", file=sys.stderr)
        return 1
    for src, dst in pairs:
        target = ROOT / dst["result"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / src["result"], target)
    print(f"copied {len(pairs)} records into bench/results/qlora/cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
