"""`structlora compare` as a user runs it: the smoke config, 2 methods x 2 seeds x a 2-point lr grid; killed
mid-cell and resumed it gives the report of an uninterrupted run; a changed config reuses no cell; the Slurm
launcher writes one job array per phase whose tasks run the cells; report-only gathers them."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _procs import ROOT, cpu_env

from pipeline.compare.cells import comparable

SMALL = ["--set", "train.max_steps=12", "--set", "train.save_every=3", "--set", "train.eval_every=6",
         "--set", "train.val_batches=1", "--set", "eval.max_samples=4", "--set", "eval.tasks=[test_loss]"]


def compare(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "compare", str(ROOT / "configs" / "smoke.yaml"),
            "--methods", "lora,structlora", "--seeds", "2", "--lr-grid", "1,2", "--out", str(out), "--jobs", "2",
            "--forgetting-split", "base",
            *SMALL, *extra]


def run(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, env=cpu_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def tables(report: Path) -> list[str]:
    """The report's lines that are results (tables and headings), without timings (the cost section, the grid
    table's step time): what a re-run must reproduce."""
    lines = report.read_text().splitlines()
    cut = lines.index("### Cost per arm (grid cells)") if "### Cost per arm (grid cells)" in lines else len(lines)
    out, timed = [], None
    for line in lines[:cut]:
        if not line.startswith("|"):
            timed = None
            if line.startswith("###"):
                out.append(line)
            continue
        cells = line.split("|")
        if timed is None and "step (ms)" in [c.strip() for c in cells]:
            timed = [c.strip() for c in cells].index("step (ms)")
        out.append("|".join(c for i, c in enumerate(cells) if i != timed))
    return out


def results(out: Path) -> dict[str, dict]:
    return {p.relative_to(out / "results" / "cells").as_posix(): json.loads(p.read_text())
            for p in sorted((out / "results" / "cells").rglob("*.json"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "a"
    run(compare(out))
    return out


def test_the_comparison_runs_every_phase_as_run_directories(uninterrupted):
    out = uninterrupted
    cells = results(out)
    assert sorted(cells) == ["base/base.json", "grid/lora-r8-s0.json", "grid/lora-r8-s1.json", "grid/structlora-r8-s0.json",
                             "grid/structlora-r8-s1.json", "lr/lora.x1-r8-s1000.json", "lr/lora.x2-r8-s1000.json",
                             "lr/structlora.x1-r8-s1000.json", "lr/structlora.x2-r8-s1000.json"]
    base = cells.pop("base/base.json")  # the base model, scored as the grid cells are: nothing trained
    assert base["scores"].keys() == cells["grid/lora-r8-s0.json"]["scores"].keys() and "steps" not in base
    assert base["forgetting"]["split"] == "base" and "test_loss.caption" in base["forgetting"]["scores"]
    for name, cell in cells.items():
        run_dir = out / "cells" / name[: -len(".json")]
        manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
        assert (run_dir / "config.yaml").is_file() and (run_dir / "base").resolve() == (out / "shared" / "base").resolve()
        assert any((run_dir / "train" / "checkpoints").glob("step-*")), "a cell keeps its checkpoints"
        if name.startswith("lr/"):  # chosen on validation loss: the lr cells never see the test split
            assert set(manifest) == {"prepare", "base", "train"} and cell["split"] == "val" and not cell["scores"]
        else:
            assert manifest["eval"]["status"] == "done" and cell["split"] == "test"
            assert {"test_loss", "test_loss.caption", "test_loss.vqav2", "test_loss.gqa"} <= set(cell["scores"])
            assert cell["forgetting"]["scores"].keys() == base["forgetting"]["scores"].keys()
            assert cell["base_id"] == base["base_id"] and len(cell["base_id"]) == 16
        assert len(cell["val_losses"]) == 2 and cell["trainable_parameters"] > 0 and cell["peak_rss_mb"] > 0
    chosen = json.loads((out / "results" / "report.json").read_text())["lr_scales"]
    assert set(chosen) == {"lora", "structlora"} and set(chosen.values()) <= {1.0, 2.0}
    for name, cell in cells.items():  # the grid trains each arm at the rate its lr cells chose
        if name.startswith("grid/"):
            lr = cells[f"lr/{cell['name']}.x{chosen[cell['name']]:g}-r8-s1000.json"]["config"]["train"]["lr"]
            assert cell["config"]["train"]["lr"] == lr
    text = (out / "results" / "report.md").read_text()
    for heading in ("### 2. Learning rate per arm", "### 3. Test split", "### Effects against lora", "### Power",
                    "### Forgetting: the `base` split", "### Cost per arm", "![learning curves](learning_curves.png)",
                    "| | base model (not adapted) | " + f"{base['scores']['test_loss']:.4f} |"):
        assert heading in text, heading
    assert "Tuning cells per arm: lora 2, structlora 2. Every arm had the same tuning budget." in text
    assert (out / "results" / "learning_curves.png").stat().st_size > 0


def test_killed_mid_cell_it_resumes_to_the_report_of_an_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    shutil.copytree(uninterrupted / "shared", out / "shared", symlinks=True)  # the same prepare + base
    proc = subprocess.Popen(compare(out), env=cpu_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed = time.monotonic() + 600, None
    while time.monotonic() < deadline and proc.poll() is None and killed is None:
        for run_dir in (out / "cells" / "grid").glob("*"):
            if any((run_dir / "train" / "checkpoints").glob("step-*/COMPLETE")) and not (run_dir / "train" / "final").exists():
                killed = run_dir.name
                break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole launch, as a scheduler or Ctrl-C stops it
    proc.wait()
    assert killed is not None, "the comparison finished before a grid cell could be killed mid-training"
    assert not (out / "results" / "cells" / "grid" / f"{killed}.json").exists()
    run(compare(out))
    again = results(out)
    assert again[f"grid/{killed}.json"]["resumed_from"] is not None, "the killed cell resumed from its checkpoint"
    first = results(uninterrupted)
    assert sorted(again) == sorted(first)
    for name in first:
        for key in ("scores", "forgetting", "val_losses", "final_train_loss", "steps"):
            assert again[name].get(key) == first[name].get(key), (name, key)
        assert comparable(again[name]["config"]) == comparable(first[name]["config"])  # all but its folder
    assert tables(out / "results" / "report.md") == tables(uninterrupted / "results" / "report.md")
    report = json.loads((out / "results" / "report.json").read_text())
    assert report["tests"] == json.loads((uninterrupted / "results" / "report.json").read_text())["tests"]


def test_a_changed_config_reuses_no_cell(uninterrupted):
    command = compare(uninterrupted, "--set", "train.lr=1.0e-3", "--report-only")
    proc = run(command, check=False)
    assert proc.returncode == 2 and "cells are not finished" in proc.stderr, proc.stderr
    proc = run(compare(uninterrupted, "--report-only", "--metric", "caption.CIDEr"), check=False)
    assert proc.returncode == 2 and "--metric caption.CIDEr: no cell has it" in proc.stderr
    assert "test_loss.caption" in proc.stderr


def test_slurm_writes_an_array_per_phase_and_report_only_gathers_the_cells(uninterrupted, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    shutil.copytree(uninterrupted / "shared", out / "shared", symlinks=True)
    slurm = ["--launcher", "slurm", "--sbatch=--gres=gpu:1", "--sbatch=--time=02:00:00"]
    run(compare(out, *slurm))
    script = (out / "slurm" / "lr.sbatch").read_text()
    (listing,) = (out / "slurm").glob("lr-*.cells")
    specs = listing.read_text().splitlines()
    assert "#SBATCH --array=0-3" in script and "#SBATCH --gres=gpu:1" in script and len(specs) == 4
    assert str(listing.resolve()) in script and not (out / "results" / "cells").exists()
    assert f'exec {sys.executable} -m pipeline.compare.cell "$SPEC"' in script
    assert sorted(json.loads(Path(s).read_text())["id"] for s in specs) == [
        "lr/lora.x1-r8-s1000", "lr/lora.x2-r8-s1000", "lr/structlora.x1-r8-s1000", "lr/structlora.x2-r8-s1000"]
    # the scheduler runs array task 0: the script itself, with the task's id
    env = dict(cpu_env(), SLURM_ARRAY_TASK_ID="0", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["bash", str(out / "slurm" / "lr.sbatch")], env=env, check=True, capture_output=True, timeout=600)
    done = json.loads(Path(specs[0]).read_text())["id"]
    assert (out / "results" / "cells" / f"{done}.json").is_file()
    for name in results(uninterrupted):  # the other tasks "ran" elsewhere: their records arrive
        if name.startswith("lr/") and name != f"{done}.json":
            (out / "results" / "cells" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(uninterrupted / "results" / "cells" / name, out / "results" / "cells" / name)
    run(compare(out, *slurm))  # the lr phase is done: the grid's array
    (first,) = (out / "slurm").glob("grid-*.cells")  # 2 arms x 2 seeds, and the base's scores
    assert "#SBATCH --array=0-4" in (out / "slurm" / "grid.sbatch").read_text() and len(first.read_text().split()) == 5
    proc = run(compare(out, "--report-only"), check=False)
    assert proc.returncode == 2 and "5 cells are not finished" in proc.stderr
    finished = [n for n in results(uninterrupted) if n.startswith(("grid/", "base/"))]
    for name in finished:
        (out / "results" / "cells" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(uninterrupted / "results" / "cells" / name, out / "results" / "cells" / name)
        if name == finished[1]:  # two tasks of the array done, three pending: the user runs the command again
            run(compare(out, *slurm))
            assert "#SBATCH --array=0-2" in (out / "slurm" / "grid.sbatch").read_text()
            assert len(first.read_text().split()) == 5, "the list the submitted array reads is never rewritten"
            assert len(list((out / "slurm").glob("grid-*.cells"))) == 2
    assert "report:" in run(compare(out, *slurm)).stdout  # nothing left to submit: the report
    run(compare(out, "--report-only"))
    assert tables(out / "results" / "report.md") == tables(uninterrupted / "results" / "report.md")


def test_a_cell_under_accelerate_launch_trains_on_every_rank_and_records_once(uninterrupted, tmp_path):
    """--accelerate-config: the cell runs under `accelerate launch --config_file FILE` (here two gloo ranks on
    the CPU); the ranks train together, the main process writes the one result."""
    from pipeline.compare.cells import launch_command, write_spec

    cell = json.loads((uninterrupted / "cells" / "grid" / "structlora-r8-s1" / "cell.json").read_text())
    cell["config"]["run_dir"] = str(tmp_path / "cell")
    cell["result"] = str(tmp_path / "result.json")
    cell["forgetting"] = None
    command = launch_command(write_spec(cell), str(ROOT / "configs" / "accelerate" / "cpu_ddp.yaml"))
    assert command[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs" / "accelerate" /
                                                                                    "cpu_ddp.yaml")]
    proc = subprocess.run(command, env=cpu_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 12 and math.isfinite(result["scores"]["test_loss"])
    summary = json.loads((tmp_path / "cell" / "train" / "final" / "summary.json").read_text())
    assert len(summary["rank_checksums"]) == 2


def test_a_stopped_comparison_stops_its_cells(uninterrupted, tmp_path):
    """SIGTERM to the command (a scheduler's stop, a closed terminal's SIGHUP): its cells stop too, no orphan
    keeps training into a folder that the next launch would also train into."""
    out = tmp_path / "d"
    out.mkdir()
    shutil.copytree(uninterrupted / "shared", out / "shared", symlinks=True)
    proc = subprocess.Popen(compare(out), env=cpu_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list((out / "cells").glob("*/*/cell.log")):
        time.sleep(0.1)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    time.sleep(1)
    alive = subprocess.run(["pgrep", "-f", f"pipeline.compare.cell {out}"], capture_output=True, text=True).stdout
    assert not alive.strip(), f"cells still running after the command stopped: {alive}"


def test_results_made_on_another_base_are_not_replaced_unless_asked(uninterrupted, tmp_path):
    """A study restarted on a new machine retrains an unfrozen base, which differs (CPU training is not reproducible
    across CPU models): its finished cells would silently be trained again and their committed results replaced.
    The run stops first, naming them; --rerun-other-base runs them on this base."""
    out = tmp_path / "a"
    shutil.copytree(uninterrupted, out, symlinks=True)
    record = out / "results" / "cells" / "grid" / "lora-r8-s1.json"
    cell = json.loads(record.read_text())
    here = cell["base_id"]
    cell["base_id"] = "0123456789abcdef"  # as if made on another machine's base model
    record.write_text(json.dumps(cell))
    proc = run(compare(out), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{record}: run on another base model (base_id 0123456789ab... there, {here[:12]}... here)" in proc.stderr
    assert "--rerun-other-base" in proc.stderr and json.loads(record.read_text()) == cell  # untouched
    run(compare(out, "--report-only", "--partial"))  # what they hold can still be reported
    run(compare(out, "--rerun-other-base"))
    assert json.loads(record.read_text())["base_id"] == here
    assert results(out).keys() == results(uninterrupted).keys()
