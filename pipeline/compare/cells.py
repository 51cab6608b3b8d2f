"""The cells of `structlora compare`: specs, matching, running them here or writing a Slurm job array.

A cell is one training run of the comparison (an arm at a rank, a learning-rate scale and a seed). Its
spec is a JSON file (`cell.json` in its run directory) holding the whole run config; the cell itself
is an ordinary run directory (config.yaml, manifest.json, train/ with checkpoints, eval/) whose
prepare/ and base/ link to the comparison's one shared prepared data and base model. A finished cell
leaves its result record (`results/cells/<id>.json`, written atomically), and a cell counts as done
only when that record's config equals the spec's config (the run directory's path aside): a changed
config never reuses a stale cell. A killed cell resumes from its last checkpoint, as `structlora run`
does. `pipeline.compare.cell` runs one spec; this module decides which to run and how to launch them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

log = logging.getLogger("structlora.compare")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `extra` merged in, mappings recursively."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def base_raw(plan: dict[str, Any]) -> dict[str, Any]:
    """The comparison's config (the CONFIG file, its --set overrides, the plan's base_overrides), run in
    the shared folder: every cell is this plus its own settings."""
    from pipeline.config import apply_overrides, read_yaml
    from pipeline.schema import RunConfig

    raw = apply_overrides(read_yaml(Path(plan["base_config"])), plan.get("overrides") or [], RunConfig)
    raw = deep_merge(raw, plan.get("base_overrides") or {})
    raw["run_dir"] = str(Path(plan["work_dir"]) / "shared")
    return raw


# The config sections a cell may not change: they make the shared prepared data and base model.
SHARED_SECTIONS = ("data", "model", "base", "seed")


def _shared_part(raw: dict[str, Any], section: str) -> Any:
    """A section as the shared prepare and base stages read it (without what only training reads)."""
    from pipeline.stages.runner import TRAIN_ONLY

    value = raw.get(section)
    if isinstance(value, dict) and section in TRAIN_ONLY:
        return {k: v for k, v in value.items() if k not in TRAIN_ONLY[section]}
    return value


def cell_spec(plan: dict[str, Any], group: str, name: str, settings: dict[str, Any], seed: int,
              split: str = "test", fraction: float = 1.0, evaluate: bool = True) -> dict[str, Any]:
    """One cell: the comparison's config + the plan's budget + the arm's settings + seed, split and share
    of the training data. Its id names its run directory and its result file."""
    shared = base_raw(plan)
    raw = deep_merge(deep_merge(shared, plan.get("budget") or {}), settings)
    raw = deep_merge(raw, {"train": {"seed": seed, "data_fraction": fraction}, "eval": {"split": split}})
    changed = [k for k in SHARED_SECTIONS if _shared_part(raw, k) != _shared_part(shared, k)]
    if changed:
        raise UserError(f"cell {group}/{name}: its settings change {', '.join(changed)}, which every cell shares "
                        "(one prepared data folder and one base model): put that change in the CONFIG instead")
    rank = raw["adapter"]["rank"] if raw["adapter"].get("method") != "full" else 0
    cell_id = f"{group}/{name}-r{rank}-s{seed}" + (f"-f{fraction:g}" if fraction < 1.0 else "")
    raw["run_dir"] = str(Path(plan["work_dir"]) / "cells" / cell_id)
    return {"id": cell_id, "group": group, "name": name, "rank": rank, "seed": seed, "fraction": fraction,
            "split": split, "config": raw, "shared": str(Path(plan["work_dir"]) / "shared"),
            "result": str(Path(plan["results"]) / "cells" / f"{cell_id}.json"), "threads": plan.get("threads", 1),
            "evaluate": evaluate, "diagnostics": bool(plan.get("diagnostics")) and evaluate}


def comparable(raw: dict[str, Any]) -> dict[str, Any]:
    """The cell's config as matched: without its run directory (a results folder moves with its repo)."""
    out = copy.deepcopy(raw)
    out.pop("run_dir", None)
    return out


def saved_result(cell: dict[str, Any]) -> dict[str, Any] | None:
    """The cell's result file as written, or None (none yet, or unreadable)."""
    path = Path(cell["result"])
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_done(cell: dict[str, Any]) -> bool:
    """Has this cell a result under the same config (and the same `match` fields, e.g. the base's sha256)?"""
    saved = saved_result(cell)
    if saved is None:
        return False
    if cell.get("forgetting") and (saved.get("forgetting") or {}).get("split") != cell["forgetting"]:
        return False  # asked for now, not measured then
    if cell.get("diagnostics") and cell.get("kind") != "base" and "adjacent_cosine" not in saved:
        return False
    return comparable(saved.get("config") or {}) == comparable(cell["config"]) and all(
        saved.get(k) == v for k, v in cell.get("match", {}).items())


def on_another_base(cells: list[dict[str, Any]]) -> list[tuple[str, str, Any, Any]]:
    """Finished cells whose result has the cell's config but another base model (a `match` field differs):
    (result file, field, its value there, its value now). Running them replaces those results."""
    found = []
    for cell in cells:
        saved = saved_result(cell)
        if not saved or comparable(saved.get("config") or {}) != comparable(cell["config"]):
            continue
        diff = [(k, saved[k], v) for k, v in cell.get("match", {}).items() if k in saved and saved[k] != v]
        if diff:
            found.append((str(cell["result"]), *diff[0]))
    return found


def refuse_replacing(cells: list[dict[str, Any]]) -> None:
    """Stop before a run replaces finished results made on another base model (a new machine retrains an
    unfrozen base, and CPU training differs between CPU models), unless --rerun-other-base."""
    stale = on_another_base(cells)
    if stale:
        path, key, there, here = stale[0]
        why = ("the plan's frozen base (frozen_base) is another model than theirs" if key == "base_sha256" else
               "a base retrained on another machine differs (CPU training is not reproducible across CPU models) "
               "unless the plan freezes it (`frozen_base`, as bench/study_v2.yaml does)")
        raise UserError(
            f"{path}{f' and {len(stale) - 1} other finished cells' if len(stale) > 1 else ''}: run on another base "
            f"model ({key} {str(there)[:12]}... there, {str(here)[:12]}... here); running them here would replace "
            f"those results: {why}. Report what they hold with --report-only, or pass --rerun-other-base to run "
            "them again on this base")


def finished(cells: list[dict[str, Any]], missing: list[str] | None = None) -> list[dict[str, Any]]:
    """Results of the finished cells. Unfinished ones stop the report, or are appended to `missing`."""
    todo = [c["id"] for c in cells if not is_done(c)]
    if todo and missing is None:
        raise UserError(f"--report-only: {len(todo)} cells are not finished, e.g. {todo[0]}; run the comparison "
                        "(or add --partial to report what is finished)")
    if missing is not None:
        missing += todo
    return [json.loads(Path(c["result"]).read_text()) for c in cells if c["id"] not in todo]


def write_spec(cell: dict[str, Any]) -> Path:
    """The cell's spec file (in its run directory), written atomically; what a launched cell reads."""
    run_dir = Path(cell["config"]["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "cell.json"
    tmp = path.with_name(f"cell.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cell, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def launch_command(spec: Path, accelerate_config: str | None = None) -> list[str]:
    """How one cell is started: `python -m pipeline.compare.cell SPEC`, or under `accelerate launch
    --config_file FILE` (the user's multi-GPU / FSDP / DeepSpeed settings) when one is given."""
    if accelerate_config:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                "-m", "pipeline.compare.cell", str(spec)]
    return [sys.executable, "-m", "pipeline.compare.cell", str(spec)]


def _cell_env(cell: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    threads = str(cell.get("threads") or 1)
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"})
    env.update({k: str(v) for k, v in (cell.get("env") or {}).items()})  # the kernels' code paths, before torch
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _exit_on(signum, frame) -> None:
    raise SystemExit(128 + signum)  # runs the `finally` that stops the cells


def _signal_tree(proc: subprocess.Popen, sig: int) -> None:
    """`sig` to a cell's process and everything it started (the ranks of an `accelerate launch`). The cells stay
    in the command's process group, so a kill of the whole group (a terminal's Ctrl-C, a scheduler) reaches them."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for member in [*family, proc]:
        try:
            member.send_signal(sig)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass


def _die_with_parent() -> None:
    """In the cell's process before it starts (Linux): SIGKILL it when the command dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


HEADLINE = ("test_loss", "caption.CIDEr", "vqav2.overall", "gqa.accuracy")  # shown on the progress bar


def run_cells(cells: list[dict[str, Any]], jobs: int = 1, accelerate_config: str | None = None) -> list[dict[str, Any]]:
    """Run the cells that are not done, `jobs` at a time, each in its own process (its own peak memory, and
    a kill takes only that cell); returns every cell's result, in order. A failing cell stops the rest."""
    from tqdm import tqdm

    todo = [c for c in cells if not is_done(c)]
    if todo:
        log.info("%d of %d cells to run (%d done)", len(todo), len(cells), len(cells) - len(todo))
        queue, running = list(todo), {}
        bar = tqdm(total=len(todo), desc="cells", unit="cell", dynamic_ncols=True)
        previous = {sig: signal.signal(sig, _exit_on) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            while queue or running:
                while queue and len(running) < max(1, jobs):
                    cell = queue.pop(0)
                    log_path = Path(cell["config"]["run_dir"]) / "cell.log"
                    spec = write_spec(cell)
                    with log_path.open("ab") as out:
                        running[cell["id"]] = (subprocess.Popen(launch_command(spec, accelerate_config), stdout=out,
                                                                stderr=subprocess.STDOUT, env=_cell_env(cell),
                                                                preexec_fn=_die_with_parent), cell, log_path)
                time.sleep(0.2)
                for cid, (proc, cell, log_path) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    del running[cid]
                    if proc.returncode != 0:
                        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
                        raise UserError(f"cell {cid} failed (exit {proc.returncode}); its log {log_path} ends:\n  "
                                        + "\n  ".join(tail))
                    if not is_done(cell):
                        raise UserError(f"cell {cid} finished but its result {cell['result']} does not match the "
                                        "cell (config, base, forgetting split): was the result file changed?")
                    bar.update(1)
                    result = json.loads(Path(cell["result"]).read_text())
                    shown = {k: v for k, v in (result.get("scores") or {}).items() if k in HEADLINE}
                    if not shown and result.get("val_losses"):
                        shown = {"val loss": result["val_losses"][-1][1]}
                    bar.set_postfix_str(f"{cid}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        finally:
            for proc, _, _ in running.values():  # stopped (an error, Ctrl-C, SIGTERM, SIGHUP): no orphan cells,
                _signal_tree(proc, signal.SIGTERM)  # nor orphan ranks of an `accelerate launch`
            for proc, _, _ in running.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    _signal_tree(proc, signal.SIGKILL)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            bar.close()
    return [json.loads(Path(c["result"]).read_text()) for c in cells]


def write_slurm(cells: list[dict[str, Any]], out: Path, phase: str, accelerate_config: str | None = None,
                sbatch: list[str] | None = None) -> Path | None:
    """A Slurm job array for the unfinished cells of one phase (one cell per array task), or None when
    every cell is done. The array task reads its spec's path from a list beside the script."""
    todo = [c for c in cells if not is_done(c)]
    if not todo:
        return None
    folder = out / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    import hashlib

    # one list per submission, never rewritten: tasks of an array submitted earlier keep reading theirs
    lines = "".join(f"{write_spec(c).resolve()}\n" for c in todo)
    listing = folder / f"{phase}-{hashlib.sha256(lines.encode()).hexdigest()[:8]}.cells"
    listing.write_text(lines)
    python = shlex.quote(sys.executable)  # this environment's interpreter, not whatever `python` a node has
    launcher = (f"{python} -m accelerate.commands.launch --config_file "
                f"{shlex.quote(str(Path(accelerate_config).resolve()))}" if accelerate_config else python)
    threads = todo[0].get("threads") or "${SLURM_CPUS_PER_TASK:-1}"
    lines = ["#!/usr/bin/env bash", f"# structlora compare, phase {phase}: {len(todo)} cells, one per array task.",
             f"#   sbatch {folder.resolve() / f'{phase}.sbatch'}",
             "# then run the same `structlora compare` command again (the next phase, or the report).",
             f"#SBATCH --job-name=compare-{phase}", f"#SBATCH --array=0-{len(todo) - 1}",
             f"#SBATCH --output={(folder / 'logs').resolve()}/{phase}-%A_%a.out",
             *[f"#SBATCH {s}" for s in sbatch or []],
             "set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}",
             f'SPEC=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(listing.resolve()))})',
             "export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0} TOKENIZERS_PARALLELISM=false",
             f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}",
             *[f"export {k}={shlex.quote(str(v))}" for k, v in (todo[0].get("env") or {}).items()],
             f'exec {launcher} -m pipeline.compare.cell "$SPEC"', ""]
    script = folder / f"{phase}.sbatch"
    script.write_text("\n".join(lines))
    script.chmod(0o755)
    return script
