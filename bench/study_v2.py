"""Study v2: StructLoRA against LoRA, DoRA and full fine-tuning on the tiny preset, as one `structlora compare`.

    python bench/study_v2.py [--jobs 2] [--phases gate,lr,grid,lowdata] [--quick]
                             [--report-only [--partial]] [--update-benchmarks]

The study is one CONFIG (bench/study_v2_config.yaml: configs/tiny.yaml as the study ran it) plus a plan
(bench/study_v2.yaml: StructLoRA's gate search, the lr phase for every arm, the grid with ablations and
long-context captioning, the low-data phase, the frozen base). Everything else (cells as run
directories, matching, resuming, statistics, the report) is `structlora compare`'s (pipeline/compare.py);
this script only names the files and writes the report into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTION = "## Method study v2 (bench/study_v2.py)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", type=Path, default=ROOT / "bench" / "study_v2.yaml", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, default=ROOT / "bench" / "study_v2_config.yaml", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="the plan's quick grid: minutes, same code path")
    parser.add_argument("--jobs", type=int, default=1, help="cells run side by side (each in its own process)")
    parser.add_argument("--phases", help="run cells of these phases only (gate, lr, grid, lowdata)")
    parser.add_argument("--report-only", action="store_true", help="no training: report the finished cells")
    parser.add_argument("--partial", action="store_true", help="with --report-only: report what is finished so far")
    parser.add_argument("--rerun-other-base", action="store_true",
                        help="run again (replacing their results) the finished cells made on another base model")
    parser.add_argument("--update-benchmarks", action="store_true", help="rewrite the study's BENCHMARKS.md section")
    parser.add_argument("--benchmarks-file", type=Path, default=ROOT / "BENCHMARKS.md", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline.compare.command import run_compare
    from pipeline.compare.plan import load_plan

    command = "python bench/study_v2.py " + " ".join(argv if argv is not None else sys.argv[1:])
    here = os.getcwd()
    os.chdir(ROOT)  # the plan's folders (runs/study_v2, bench/results/study_v2, the frozen base) are ROOT's
    try:
        plan = load_plan(args.plan, None, args.quick)
        plan["base_config"] = os.path.relpath(args.config.resolve(), ROOT)
        result = run_compare(plan, jobs=args.jobs, phases=args.phases.split(",") if args.phases else None,
                             report_only=args.report_only, partial=args.partial, command=command,
                             rerun_other_base=args.rerun_other_base,
                             report={"name": "study", "title": SECTION[3:], "link_root": ROOT})
    finally:
        os.chdir(here)
    if args.update_benchmarks:
        sys.path.insert(0, str(ROOT / "bench"))
        from inference import update_benchmarks

        body = Path(result["report"]).read_text().split("\n", 2)[2]  # without the report's own title
        update_benchmarks(args.benchmarks_file, body, section=SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
