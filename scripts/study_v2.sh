#!/usr/bin/env bash
# Run study v2 on its pinned code version, from a git worktree, so that work on the main tree
# (the data pipeline, the method) cannot change a study that is spread over several sittings.
# Cells and the shared base model live in the main tree (runs/study_v2, bench/results/study_v2),
# linked into the worktree; commit bench/results/study_v2 as cells finish.
#   scripts/study_v2.sh --phases gate --jobs 2        (any bench/study_v2.py arguments)
# A new pin must be a commit on top of the current pin that changes bench/ only (record it in main
# with `git merge -s ours`): a cell is matched by its whole config, and configs/ on main have moved on
# since (the gate, train.lr_gate), so a pin cut from main would re-run every cell.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PIN="${STUDY_V2_COMMIT:-$(cat "$ROOT/bench/study_v2.commit")}"
TREE="${STUDY_V2_TREE:-$ROOT/../study_v2-$PIN}"
if [ ! -d "$TREE" ]; then
  git -C "$ROOT" worktree add --detach "$TREE" "$PIN"
fi
mkdir -p "$ROOT/runs/study_v2" "$ROOT/bench/results/study_v2"
mkdir -p "$TREE/runs" "$TREE/bench/results"
ln -sfn "$ROOT/runs/study_v2" "$TREE/runs/study_v2"
ln -sfn "$ROOT/bench/results/study_v2" "$TREE/bench/results/study_v2"
cd "$TREE"
HF_HUB_OFFLINE=1 exec "$ROOT/.venv/bin/python" bench/study_v2.py bench/study_v2.yaml "$@"
