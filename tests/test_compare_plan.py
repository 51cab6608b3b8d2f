"""Plans of `structlora compare` (bench/study_v2.yaml, run by bench/study_v2.py --quick): every phase (gate and
lr searches on val loss, the grid on the test split with long-context captioning and update diagnostics, the
low-data arm), the statistics (t intervals, Holm within families, minimum detectable difference), CSVs, the
learning-curve plot and the BENCHMARKS.md section, on a CI-sized grid; the frozen base; the committed study
v2 cells reported again give study v2's tables."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from _procs import load_bench
from safetensors.torch import load_file, save_file

from eval import compare_stats, compare_tables, compare_tests
from pipeline.compare import command as compare
from pipeline.compare import plan as compare_plan
from pipeline.compare import tuning
from pipeline.compare.cell import machine_info
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study_v2")
    spec = yaml.safe_load((ROOT / "bench" / "study_v2.yaml").read_text())
    spec["quick"]["work_dir"] = str(tmp / "work")
    spec["quick"]["results"] = str(tmp / "results")
    study_file = tmp / "study_v2.yaml"
    study_file.write_text(yaml.safe_dump(spec))
    bench_md = tmp / "BENCHMARKS.md"
    bench_md.write_text("# Benchmarks\n\n## Another section\n\nkept\n")
    study = load_bench("study_v2")
    args = ["--plan", str(study_file), "--quick", "--jobs", "2", "--update-benchmarks", "--benchmarks-file", str(bench_md)]
    assert study.main(args) == 0
    return study, study_file, tmp, bench_md, args


@pytest.mark.slow  # the quick study v2 (~3.5 min on 2 cores): `make test-slow`
def test_quick_study_runs_every_phase_and_writes_the_report(quick_study):
    _, _, tmp, bench_md, _ = quick_study
    cells = tmp / "results" / "cells"
    groups = {p.name: [json.loads(c.read_text()) for c in p.glob("*.json")] for p in cells.iterdir()}
    # gate: 2 variants + 1 refinement (1 seed); lr: 2 arms x 2 scales; grid and lowdata: 2 arms x 2 seeds
    assert {k: len(v) for k, v in groups.items()} == {"gate1": 2, "gate2": 1, "lr": 4, "grid": 4, "lowdata": 4}
    for name in ("gate1", "gate2", "lr"):  # searches never see the test split and only train
        assert {c["split"] for c in groups[name]} == {"val"} and all(not c["scores"] for c in groups[name])
        assert all(len(c["val_losses"]) == 2 for c in groups[name])  # the learning curve: every eval_every steps
    for cell in groups["grid"] + groups["lowdata"]:
        assert cell["split"] == "test"
        assert {"caption.CIDEr", "vqav2.overall", "gqa.accuracy", "test_loss", "test_loss.caption", "test_loss.vqav2",
                "test_loss.gqa"} <= set(cell["scores"])
        assert (tmp / "work" / "cells" / cell["id"] / "manifest.json").is_file()  # a run directory
        assert math.isfinite(cell["grad_adjacent_cosine"]) and math.isfinite(cell["drift_energy_normalized"])
    structlora = [c for c in groups["grid"] if c["name"] == "structlora"]
    assert all("kept_fraction" in c and "message_share_mean" in c for c in structlora)
    assert all(set(c["long_context_cider"]) == {"96", "160"} for c in groups["grid"])
    assert all(c["fraction"] == 0.5 for c in groups["lowdata"])
    with (tmp / "results" / "tests.csv").open() as f:
        tests = list(csv.DictReader(f))
    scored = [t for t in tests if t["group"] != "long_context"]  # the long-context buckets are tests too
    assert {t["metric"] for t in scored} == {"test loss", "CIDEr x100", "VQA acc", "GQA acc"}
    assert {t["group"] for t in tests} == {"grid", "lowdata", "long_context"}
    assert all(t["family"] and "holm" in t for t in tests)
    assert (tmp / "results" / "learning_curves.png").stat().st_size > 0
    text = bench_md.read_text()
    for heading in ("## Method study v2", "### 1. The gate", "### 2. Learning rate per arm", "### 3. Test split",
                    "### Power", "### Long-context captioning", "### Update structure", "### 4. Low data"):
        assert heading in text, heading
    assert "## Another section\n\nkept" in text


@pytest.mark.slow  # the quick study v2 (~3.5 min on 2 cores): `make test-slow`
def test_report_only_rebuilds_the_same_tables(quick_study):
    study, study_file, tmp, _, _ = quick_study
    before = {name: (tmp / "results" / name).read_text() for name in ("study.md", "cells.csv", "tests.csv")}
    for name in before:
        (tmp / "results" / name).unlink()
    assert study.main(["--plan", str(study_file), "--quick", "--report-only"]) == 0
    after = {name: (tmp / "results" / name).read_text() for name in before}
    assert after["cells.csv"] == before["cells.csv"] and after["tests.csv"] == before["tests.csv"]
    # the tables are the same; only the command line in the first paragraph differs
    assert after["study.md"].split("\n", 3)[3] == before["study.md"].split("\n", 3)[3]


@pytest.mark.slow  # the quick study v2 (~3.5 min on 2 cores): `make test-slow`
def test_the_grid_adapts_the_frozen_base_and_refuses_another(quick_study):
    """bench/study_v2.yaml `frozen_base`: grid cells run on a committed base model (sha256 checked),
    record it and their machine, and cells trained on another base are not done on it."""
    study, study_file, tmp, _, _ = quick_study
    from data.shards import file_sha256
    trained = tmp / "work" / "shared" / "base" / "model"
    frozen = tmp / "frozen_base"  # another base: the study's own, every weight scaled by 1.01
    shutil.copytree(trained, frozen)
    weights = {k: v * 1.01 if v.is_floating_point() else v for k, v in load_file(frozen / "model.safetensors").items()}
    save_file(weights, frozen / "model.safetensors", metadata={"format": "pt"})
    sha = file_sha256(frozen / "model.safetensors")
    env = yaml.safe_load((ROOT / "bench" / "study_v2.yaml").read_text())["frozen_base"]["env"]
    spec = yaml.safe_load(study_file.read_text())
    spec["quick"]["frozen_base"] = {"dir": str(frozen), "sha256": sha, "phases": ["grid"], "env": env,
                                    "prepare_sha256": compare_plan.prepare_sha256(tmp / "work" / "shared" / "prepare")}
    for key, value, error in (("sha256", "0" * 64, f"model.safetensors: sha256 {sha} is not frozen_base.sha256 0{{64}}"),
                              ("prepare_sha256", "1" * 64, "prepare: the prepared world's content hash")):
        bad = yaml.safe_load(yaml.safe_dump(spec))
        bad["quick"]["frozen_base"][key] = value
        (tmp / "bad.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(UserError, match=error):
            study.main(["--plan", str(tmp / "bad.yaml"), "--quick", "--phases", "grid"])
    (tmp / "frozen.yaml").write_text(yaml.safe_dump(spec))
    before = {p.name: json.loads(p.read_text()) for p in (tmp / "results" / "cells" / "grid").glob("*.json")}
    assert before and all(r["base_sha256"] == file_sha256(trained / "model.safetensors") for r in before.values())
    with pytest.raises(UserError, match=r"run on another base model \(base_sha256 .*the plan's frozen base"):
        study.main(["--plan", str(tmp / "frozen.yaml"), "--quick", "--jobs", "2", "--phases", "grid"])
    assert {p.name: json.loads(p.read_text()) for p in (tmp / "results" / "cells" / "grid").glob("*.json")} == before
    assert study.main(["--plan", str(tmp / "frozen.yaml"), "--quick", "--jobs", "2", "--phases", "grid",
                       "--rerun-other-base"]) == 0
    after = {p.name: json.loads(p.read_text()) for p in (tmp / "results" / "cells" / "grid").glob("*.json")}
    assert after.keys() == before.keys()
    for name, result in after.items():  # every cell ran again, on the frozen base, and says where it ran
        assert result["base_sha256"] == sha and result["val_losses"] != before[name]["val_losses"], name
        assert result["machine"]["env"].items() >= env.items() and len(result["machine"]["numerics_fingerprint"]) == 16
        link = tmp / "work" / "cells" / "grid" / Path(name).stem / "base"
        assert link.resolve() == (tmp / "work" / "shared_frozen" / "base").resolve()
    assert (tmp / "work" / "shared_frozen" / "prepare").resolve() == (tmp / "work" / "shared" / "prepare").resolve()
    machines = [x for x in (tmp / "results" / "study.md").read_text().splitlines() if x.startswith("Grid and low-data")]
    assert f"`{sha[:12]}` ({len(after)} cells)" in machines[0]  # the low-data cells, not frozen here, keep theirs


def test_frozen_phases_run_seed_major_and_record_the_base_as_a_condition(tmp_path):
    spec = _study_spec(tmp_path)
    cells = [{"id": f"{arm}-s{seed}", "seed": seed} for arm in ("lora", "dora") for seed in (0, 1)]
    frozen = compare_plan.on_frozen_base(spec, "grid", cells)
    assert [c["id"] for c in frozen] == ["lora-s0", "dora-s0", "lora-s1", "dora-s1"]
    assert all(c["match"] == {"base_sha256": spec["frozen_base"]["sha256"]} and c["env"] == spec["frozen_base"]["env"]
               and c["shared"].endswith("shared_frozen") for c in frozen)
    assert compare_plan.on_frozen_base(spec, "lr", cells) == cells  # the selection phases keep their cells
    assert machine_info()["numerics_fingerprint"] == machine_info()["numerics_fingerprint"]


def test_an_unfinished_study_is_not_reported_unless_partial(tmp_path):
    study = load_bench("study_v2")
    spec = yaml.safe_load((ROOT / "bench" / "study_v2.yaml").read_text())
    spec["quick"]["work_dir"] = str(tmp_path / "work")
    spec["quick"]["results"] = str(tmp_path / "results")
    study_file = tmp_path / "s.yaml"
    study_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match="not finished"):
        study.main(["--plan", str(study_file), "--quick", "--report-only"])
    assert study.main(["--plan", str(study_file), "--quick", "--report-only", "--partial"]) == 0
    assert "Partial report" in (tmp_path / "results" / "study.md").read_text()


def test_statistics():
    report = compare_stats
    assert report.holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])
    lo, hi = report.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # 3 -/+ t(0.975, 4) * sd / sqrt(5)
    assert (lo, hi) == pytest.approx((3 - 2.7764 * 2.5**0.5 / 5**0.5, 3 + 2.7764 * 2.5**0.5 / 5**0.5), rel=1e-4)
    # paired t, alpha 0.05 two-sided, power 0.8, n = 5: (t_0.975,4 + t_0.8,4) * sd / sqrt(5)
    assert report.min_detectable(1.0, 5) == pytest.approx((2.7764 + 0.9410) / 5**0.5, rel=1e-3)
    assert math.isnan(report.min_detectable(0.0, 5)) and math.isnan(report.paired_p([1.0, 1.0]))
    c = report.compare(dict(enumerate([50, 52, 51])), dict(enumerate([48, 49, 50])))
    assert c["n"] == 3 and c["diff"] == pytest.approx(2.0)


def test_the_low_data_table_shows_whether_the_model_overfits():
    report = compare_tables
    spec = {"lowdata": {"arms": ["lora", "structlora"], "fractions": [0.1, 0.02]}}

    def cell(seed, curve, train, fraction=0.02):
        return {"name": "lora", "seed": seed, "fraction": fraction, "scores": {"test_loss": 1.0},
                "final_train_loss": train, "val_losses": [[100 * (i + 1), v] for i, v in enumerate(curve)]}

    # val loss turns up after its minimum (seed 0 at step 200, seed 1 at step 300), train loss keeps falling
    rows = report.lowdata_table(spec, [cell(0, [2.0, 1.5, 1.2, 1.1], 0.9, fraction=0.1),
                                       cell(0, [2.0, 1.0, 1.5, 1.8], 0.2), cell(1, [2.0, 1.4, 1.2, 1.6], 0.4)],
                                [report.metric_of("test_loss")])
    assert len(rows) == 4 and rows[2].startswith("| 10% | lora | 1.0000 |") and "(step 400)" in rows[2]
    assert rows[3].startswith("| 2% | lora | 1.0000 ± 0.0000 |") and rows[3].endswith("| 2 |")
    assert "| 0.3000 ± 0.1414 | 1.1000 ± 0.1414 (steps 200-300) | 1.7000 ± 0.1414 |" in rows[3]


def test_ablations_are_compared_with_structlora_in_a_family_of_their_own():
    report = compare_tests
    spec = {"arms": {"lora": {}, "structlora": {}, "structlora_paper": {}, "no_ib": {}},
            "ablation_arms": ["no_ib", "no_coordinator"]}

    def cell(name, rank, seed, loss):
        return {"name": name, "rank": rank, "seed": seed, "scores": {"test_loss": loss}}

    grid = [cell("lora", r, s, 9.0) for r in (4, 16) for s in range(3)]
    grid += [cell("structlora", r, s, 1.0 + 0.01 * s) for r in (4, 16) for s in range(3)]
    grid += [cell("structlora_paper", r, s, 1.5 + 0.02 * s) for r in (4, 16) for s in range(3)]
    grid += [cell("no_ib", 16, s, 0.9 + 0.01 * s + 0.001 * (s == 1)) for s in range(3)]
    metrics = [compare_tables.metric_of("test_loss")]
    rows = report.ablation_comparisons(spec, grid, metrics)
    assert {(c["arm"], c["rank"]) for c in rows} == {("structlora_paper", 4), ("structlora_paper", 16), ("no_ib", 16)}
    assert all(c["reference"] == "structlora" and c["group"] == "ablation" and c["metric"] == "test loss" for c in rows)
    by = {(c["arm"], c["rank"]): c for c in rows}
    assert by[("structlora_paper", 4)]["diff"] == pytest.approx(0.51)
    assert by[("no_ib", 16)]["diff"] == pytest.approx(-0.1 + 0.001 / 3)
    report.assign(rows, report.default_families({**spec, "reference": "lora"}))
    assert {c["family"] for c in rows} == {"ablations"} and all(c["family_size"] == 3 for c in rows)
    assert report.ablation_comparisons({**spec, "arms": {"lora": {}, "structlora": {}}, "ablation_arms": []}, grid,
                                       metrics) == []


def test_the_gate_is_the_sparsest_within_one_standard_error_of_the_best():
    def cells(losses, kept):
        return [{"seed": s, "val_losses": [[1200, v]], "kept_fraction": kept} for s, v in enumerate(losses)]

    results = {"dense_best": cells([1.40, 1.50], 1.0),        # the lowest mean loss, keeps every direction
               "sparse_tied": cells([1.41, 1.49], 0.6),       # +0.00 on average: as good, sparser -> chosen
               "sparse_worse": cells([1.50, 1.60], 0.3)}      # +0.10 on both seeds (SE 0): worse
    assert tuning.pick(dict.fromkeys(results), results) == "sparse_tied"
    results["sparse_tied"] = cells([1.45, 1.55], 0.6)         # +0.05 on both seeds: no longer as good
    assert tuning.pick(dict.fromkeys(results), results) == "dense_best"


def _study_spec(tmp_path) -> dict:
    spec = compare_plan.load_plan(ROOT / "bench" / "study_v2.yaml", tmp_path / "work")
    spec["base_config"] = str(ROOT / "bench" / "study_v2_config.yaml")
    spec["frozen_base"]["dir"] = str(ROOT / spec["frozen_base"]["dir"])
    return spec


def _gate_search(tmp_path, max_stages: int, landscape):
    """The gate phase on variants c_none_l0 and d_none_l0_as_lora with 4 refinements, every cell
    "trained" by `landscape(config) -> (val loss, kept share)` (plus a small per-seed offset).
    Returns (spec, chosen settings, report rows, the cell ids of each runner call)."""
    spec = _study_spec(tmp_path)
    g = spec["gate"]
    g["variants"] = {k: g["variants"][k] for k in ("c_none_l0", "d_none_l0_as_lora")}
    g["refine"] = {k: g["refine"][k] for k in ("lr_gate_1x", "ib_0", "ib_1e-2", "ib_1e-1")}
    g["max_stages"] = max_stages
    ran: list[list[str]] = []

    def runner(cells):
        ran.append([c["id"] for c in cells])
        out = []
        for c in cells:
            loss, kept = landscape(c["config"])
            out.append({"id": c["id"], "seed": c["seed"], "kept_fraction": kept,
                        "val_losses": [[1200, loss + 0.001 * c["seed"] * (1 + kept)]]})
        return out

    gate, rows = tuning.gate_phase(spec, runner)
    return spec, gate, rows, ran


def _gate_and_slow(config) -> tuple[dict, bool]:
    """The cell's gate settings and whether its gates train at the factors' rate (1x)."""
    return config["adapter"]["structlora"]["gate"], config["train"].get("lr_gate") == config["train"]["lr"]


def test_the_gate_search_refines_the_choice_of_each_stage(tmp_path):
    """Coordinate descent: stage 2 moves the gate learning rate, so stage 3 re-searches the IB weight at
    the new rate (the unchanged refinements and settings already trained are not run again)."""

    def landscape(config):  # made up: the 1x gate rate is better, lambda 0.1 prunes for free
        gate, slow = _gate_and_slow(config)
        loss = 1.40 - 0.05 * slow + 0.01 * (gate["init_prob"] < 0.95)
        kept = 0.5 if gate["lambda_ib"] >= 0.1 else (1.0 if slow or gate["lambda_ib"] == 0 else 0.6)
        return loss, kept

    spec, gate, rows, ran = _gate_search(tmp_path, 3, landscape)
    stages = [sorted({i.split("/")[0] for i in ids}) for ids in ran]
    assert stages == [["gate1"], ["gate2"], ["gate3"]]
    assert sorted({i.split("/")[1].rsplit("-r8", 1)[0] for i in ran[2]}) == [
        "d_none_l0_as_lora+lr_gate_1x+ib_0", "d_none_l0_as_lora+lr_gate_1x+ib_1e-1"]
    assert gate["adapter"]["structlora"]["gate"]["lambda_ib"] == 0.1
    assert gate["train"]["lr_gate"] == spec["gate"]["refine"]["lr_gate_1x"]["train"]["lr_gate"]
    chosen = {r["candidate"] for r in rows if r["chosen"]}
    winners = {r["candidate"] for r in rows if r["stage_winner"]}
    assert chosen == {"d_none_l0_as_lora+lr_gate_1x+ib_1e-1"}
    assert winners == {"d_none_l0_as_lora", "d_none_l0_as_lora+lr_gate_1x"}
    assert {r["stage"] for r in rows if r["candidate"].endswith("+ib_1e-1")} == {"2", "3"}


def test_a_partial_learning_rate_phase_chooses_only_for_finished_arms(tmp_path):
    spec = _study_spec(tmp_path)
    spec["lr"].update(arms=["lora", "structlora"], inherit={"no_ib": "structlora"})

    def runner(cells):  # LoRA's cells are finished, StructLoRA's are still running
        return [{"id": c["id"], "seed": c["seed"], "config": c["config"],
                 "val_losses": [[1200, 1.5 - 0.1 * (c["config"]["train"]["lr"] > 5e-3)]]}
                for c in cells if c["name"].startswith("lora.")]

    chosen, rows = tuning.lr_phase(spec, {}, runner)
    assert chosen == {"lora": 2.0}
    table = "\n".join(compare_tables.lr_table(rows, chosen, spec, gate_cells=4))
    lora_cells = sum(1 for r in rows if r["arm"] == "lora")
    structlora_cells = sum(1 for r in rows if r["arm"] == "structlora") + 4
    assert f"| x2 (edge of the grid) | 0.01 | {lora_cells} |" in table, "a choice at the grid's edge is flagged"
    assert [line for line in table.splitlines() if line.startswith("| structlora |")][0].endswith(
        f"| pending |  | {structlora_cells} |")
    assert f"Tuning cells per arm: lora {lora_cells}, structlora {structlora_cells}" in table
    assert "Chosen at the edge of the candidates: lora" in table


def test_the_gate_search_stops_when_the_choice_stays_and_reuses_what_it_trained(tmp_path):
    """Stage 2 picks the IB weight 0.1 (as good, sparser); its refinements lambda 0 and 1e-2 were trained
    already (d+ib_0 in stage 2, d itself in stage 1), so stage 3 trains the 1x gate rate only, compares
    it with them all, keeps the choice and stops: no stage 4 although max_stages allows it."""

    def landscape(config):  # made up: the 1x gate rate is worse, lambda 0.1 prunes for free
        gate, slow = _gate_and_slow(config)
        loss = 1.40 + 0.05 * slow + 0.01 * (gate["init_prob"] < 0.95)
        return loss, 0.5 if gate["lambda_ib"] >= 0.1 else 1.0

    _, gate, rows, calls = _gate_search(tmp_path, 4, landscape)
    assert gate["adapter"]["structlora"]["gate"]["lambda_ib"] == 0.1
    ran = [i for ids in calls for i in ids]
    assert sorted({i.split("/")[0] for i in ran}) == ["gate1", "gate2", "gate3"]
    assert sorted(i for i in ran if i.startswith("gate3/")) == [
        "gate3/d_none_l0_as_lora+ib_1e-1+lr_gate_1x-r8-s0", "gate3/d_none_l0_as_lora+ib_1e-1+lr_gate_1x-r8-s1"]
    assert len(ran) == len(set(ran)) == 2 * (2 + 3 + 1)  # nothing trained twice
    assert {r["candidate"] for r in rows if r["chosen"]} == {"d_none_l0_as_lora+ib_1e-1"}


def test_the_committed_study_v2_cells_give_study_v2s_tables_again(tmp_path):
    """The command is the study: report-only over the committed cells (matched by their whole config, the
    frozen base's sha256 included) rebuilds every table of bench/results/study_v2/study.md."""
    results = ROOT / "bench" / "results" / "study_v2"
    shutil.copytree(results / "cells", tmp_path / "cells")
    plan = _study_spec(tmp_path)
    plan["results"] = str(tmp_path)
    out = compare.run_compare(plan, report_only=True, command="test", report={"name": "study", "title": "t"})
    assert out["missing"] == []
    old = [x for x in (results / "study.md").read_text().splitlines()
           if x.startswith(("|", "###", "Tuning", "Chosen", "- **"))]
    new = Path(out["report"]).read_text().splitlines()
    position = 0
    for line in old:  # every table line of the committed report, in order
        found = next((i for i in range(position, len(new)) if new[i] == line), None)
        assert found is not None, line
        position = found + 1
    assert len(old) > 150
    tests = json.loads((tmp_path / "study.json").read_text())["tests"]
    grid_mdds = [c["mdd"] for c in tests if (c["group"], c["arm"], c["key"]) == ("grid", "structlora", "test_loss")]
    assert f"| test loss | 5 | primary | {statistics.median(grid_mdds):.4g} |" in new
    changed = compare_plan.load_plan(ROOT / "bench" / "study_v2.yaml", tmp_path / "work")
    changed["base_config"] = str(ROOT / "configs" / "tiny.yaml")  # today's tiny.yaml: other configs, no cell reused
    changed["results"] = str(tmp_path)
    with pytest.raises(UserError, match="cells are not finished"):
        compare.run_compare(changed, report_only=True)


def test_flags_make_a_plan_and_bad_flags_say_what_is_wrong(tmp_path, capsys):
    from pipeline.cli import main

    smoke = ROOT / "configs" / "smoke.yaml"
    plan = compare_plan.plan_from_flags(smoke, ["lora", "structlora"], [4, 8], 3, [1.0], 1, "test_loss",
                                        tmp_path, threads=1, forgetting="base")
    assert plan["reference"] == "lora" and plan["seeds"] == [0, 1, 2] and plan["lr"]["rank"] == 4
    assert plan["phases"] == ["lr", "grid"] and plan["score_base"] and plan["results"] == str(tmp_path / "results")
    scales, rows = tuning.lr_phase(plan, None, lambda cells: pytest.fail("one lr candidate: no cell runs"))
    assert scales == {"lora": 1.0, "structlora": 1.0} and rows == []
    cells = compare_plan.grid_cells(plan, None, scales)
    grid, base = cells[:-1], cells[-1]
    assert [c["seed"] for c in grid] == sorted(c["seed"] for c in grid) and len(grid) == 2 * 2 * 3  # seed-major
    assert base["kind"] == "base" and base["id"] == "base/base" and all(c["forgetting"] == "base" for c in cells)
    assert {c["config"]["adapter"]["rank"] for c in grid} == {4, 8}
    assert all(c["config"]["eval"]["split"] == "test" and c["evaluate"] for c in cells)
    with pytest.raises(UserError, match="change data, which every cell shares"):
        compare_plan.make_cell(plan, "grid", "lora", {"data": {"max_length": 64}}, 0, "test", True)
    # what only training reads may differ between arms (one prepared world and base model for both)
    short = compare_plan.make_cell(plan, "grid", "lora_long", {"data": {"long_context": {"share": 0.5}}}, 0, "test",
                                   True)
    assert short["config"]["data"]["long_context"]["share"] == 0.5
    for methods, seeds, error in ((["lora"], 3, "two or more different methods"),
                                  (["lora", "lora"], 3, "two or more different methods"),
                                  (["lora", "qlora"], 3, "two or more different methods"),
                                  (["lora", "dora"], 1, "at least 2")):
        with pytest.raises(UserError, match=error):
            compare_plan.plan_from_flags(smoke, methods, [8], seeds, [1.0], 1, "test_loss", tmp_path, threads=1)
    assert main(["compare", str(smoke), "--out", str(tmp_path)]) == 2
    assert "--methods: name the methods to compare" in capsys.readouterr().err
    assert main(["compare", str(smoke), "--methods", "lora,dora", "--lr-grid", "1,x", "--out", str(tmp_path)]) == 2
    assert "--lr-grid 1,x: expected comma-separated numbers" in capsys.readouterr().err


def test_a_diverged_candidate_loses_and_an_arm_with_only_diverged_ones_stops_the_comparison(tmp_path):
    plan = compare_plan.plan_from_flags(ROOT / "configs" / "smoke.yaml", ["lora", "full"], [8], 2, [1.0, 2.0, 4.0], 1,
                                        "test_loss", tmp_path, threads=1)

    def runner(cells):  # full fine-tuning diverges at x2 and x4 (compare_cell writes val loss inf), LoRA at x4
        out = []
        for c in cells:
            bad = c["name"] in ("full.x2", "full.x4", "lora.x4")
            out.append({"id": c["id"], "seed": c["seed"], "config": c["config"],
                        "val_losses": [[0, float("inf")]] if bad else [[10, 1.0 + 0.1 * ("x1" in c["name"])]]})
        return out

    chosen, rows = tuning.lr_phase(plan, None, runner)
    assert chosen == {"lora": 2.0, "full": 1.0} and len(rows) == 6

    def diverging(cells):
        return [{**r, "val_losses": [[0, float("inf")]]} if r["id"].startswith("lr/full") else r for r in runner(cells)]

    with pytest.raises(UserError, match="every candidate of arm 'full' diverged"):
        tuning.lr_phase(plan, None, diverging)


def test_what_would_fail_after_training_is_refused_before(tmp_path):
    """preflight: a split the grid scores (test), the lr phase reads (val) or the forgetting split, missing in
    the prepared data; a --metric of a task the cells do not score."""
    shared = tmp_path / "shared"
    for task in ("caption", "vqav2", "gqa"):
        for split in ("train", "val"):
            (shared / "prepare" / "shards" / task / split).mkdir(parents=True)
    (shared / "config.yaml").write_text((ROOT / "configs" / "smoke.yaml").read_text())
    plan = compare_plan.plan_from_flags(ROOT / "configs" / "smoke.yaml", ["lora", "structlora"], [8], 2, [1.0], 1,
                                        "test_loss", tmp_path, threads=1)
    with pytest.raises(UserError, match="no 'test' split for caption, vqav2, gqa"):
        compare.preflight(plan, shared)
    for task in ("caption", "vqav2", "gqa"):
        (shared / "prepare" / "shards" / task / "test").mkdir()
    compare.preflight(plan, shared)
    with pytest.raises(UserError, match="no 'base' split"):
        compare.preflight({**plan, "forgetting": "base"}, shared)
    with pytest.raises(UserError, match="--metric conversations.exact_match: the cells do not score"):
        compare.preflight({**plan, "metric": "conversations.exact_match"}, shared)
