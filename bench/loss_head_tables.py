"""The tables of bench/loss_head.py (run through it: `python bench/loss_head.py`): per-case rows, the summary
tables and the real-depth arithmetic. See bench/loss_head.py's docstring for what is measured."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loss_head import ARMS, SKELETONS, MiB, median  # noqa: E402
from bench.train_step_vs_peft import spread  # noqa: E402


def per_layer(row: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """{tower: (median forward + backward seconds of one trained layer, median bytes one saves for its backward,
    median forward seconds)}, over the layers timed at both ends in every round of both arms."""
    out = {}
    steps = [step for arm in ARMS for step in row["timings"][arm]]
    for tower in ("vision", "language"):
        keys = sorted({k for step in steps for k in step["layers"] if k[0] == tower})
        times = [step["layers"][k] for step in steps for k in keys if k in step["layers"]]
        forward = [step["layers_forward"][k] for step in steps for k in keys if k in step["layers_forward"]]
        out[tower] = (median(times), median([float(row["saved"]["full"].get(k, 0)) for k in keys]), median(forward))
    return out


def real_depth(row: dict[str, Any]) -> dict[str, Any]:
    _, vision_skel, vision_real, text_skel, text_real = SKELETONS[row["key"]]
    layers = per_layer(row)
    extra_time = (vision_real - vision_skel) * layers["vision"][0] + (text_real - text_skel) * layers["language"][0]
    extra_mem = (vision_real - vision_skel) * layers["vision"][1] + (text_real - text_skel) * layers["language"][1]
    extra_fwd = (vision_real - vision_skel) * layers["vision"][2] + (text_real - text_skel) * layers["language"][2]

    def med(arm: str, key: str) -> float:
        return median([s[key] for s in row["timings"][arm]])

    steps, heads = {a: med(a, "step") + extra_time for a in ARMS}, {a: med(a, "head") for a in ARMS}
    # the arms differ in the head + loss only: the labelled step = the full one less the measured saving
    saved_step = steps["full"] - (heads["full"] - heads["labelled"])
    forward = med("full", "forward") + extra_fwd
    return {"layers": layers, "step": steps, "head": heads, "step_by_saving": saved_step,
            "forward": forward, "forward_saving": med("full", "head_forward") - med("labelled", "head_forward"),
            "peak": {a: row["step_peak"][a] + extra_mem for a in ARMS}, "depth": (vision_real, text_real)}


def print_rows(rows: list[dict[str, Any]]) -> None:
    print("\n| skeleton | case | tokens (image / labelled / row) | arm | step (s, median) | min-max (s) | "
          "labelled / full (median, spread) | head + loss (s, median) | head + loss share of step | "
          "step peak (MiB) | resident (MiB) |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        t = row["timings"]
        ratios = [a["step"] / b["step"] for a, b in zip(t["labelled"], t["full"])]
        for arm in ARMS:
            steps = [s["step"] for s in t[arm]]
            shares = [s["head"] / s["step"] for s in t[arm]]
            print(f"| {row['title']} | {row['case']} | {row['image']} / {row['labelled']} / {row['total']} | {arm} | "
                  f"{median(steps):.2f} | {min(steps):.1f}-{max(steps):.1f} | "
                  f"{spread(ratios) if arm == 'labelled' else '1'} | {median([s['head'] for s in t[arm]]):.3f} | "
                  f"{100 * median(shares):.1f}% | {row['step_peak'][arm] / MiB:.0f} | {row['resident'] / MiB:.0f} |")
    print(flush=True)


def print_tables(rows: list[dict[str, Any]], rounds: int) -> None:
    print(f"\n### Train step, full vs labelled-only ({rounds} interleaved rounds per case, batch 1, float32)")
    print_rows(rows)
    print("\n### Loss computation alone (head + cross-entropy + backward, same hidden states): live-tensor peak\n")
    print("| skeleton | case | vocabulary x positions (full) | full (MiB) | labelled (MiB) | full / labelled | "
          ">= 4x | full (s, 1 call) | labelled (s, 1 call) | full: share of the step peak | labelled: share |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    vocab = {"llava": 32064, "qwen2_5_vl": 152064, "gemma3": 262208}
    for row in rows:
        p = row["loss_peak"]
        ratio = p["full"] / max(1, p["labelled"])
        print(f"| {row['title']} | {row['case']} | {vocab[row['key']]:,} x {row['total']} | {p['full'] / MiB:.1f} | "
              f"{p['labelled'] / MiB:.1f} | {ratio:.1f}x | {'yes' if ratio >= 4 else 'no'} | "
              f"{row['loss_seconds']['full']:.2f} | {row['loss_seconds']['labelled']:.3f} | "
              f"{100 * p['full'] / row['step_peak']['full']:.0f}% | "
              f"{100 * p['labelled'] / row['step_peak']['labelled']:.0f}% |")
    print("\n### At the real depth, by arithmetic (measured per-layer cost x the real layer count; not measured)\n")
    print("| model | case | layers (vision / text) | one layer fwd+bwd (s, vision / text) | one layer saves "
          "(MiB, vision / text) | step full (s) | step labelled (s) | labelled / full | labelled: full less the "
          "head + loss saving (s) | labelled / full, so | head + loss share, full | share, labelled | forward only "
          "(eval): full (s) | labelled / full | step peak full (MiB) | labelled (MiB) | loss peak share of step "
          "peak, full |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
          "---: | ---: |")
    for row in rows:
        r = real_depth(row)
        (tv, sv, _), (tt, st, _) = r["layers"]["vision"], r["layers"]["language"]
        s, h, pk, by = r["step"], r["head"], r["peak"], r["step_by_saving"]
        print(f"| {row['title']} | {row['case']} | {r['depth'][0]} / {r['depth'][1]} | {tv:.2f} / {tt:.2f} | "
              f"{sv / MiB:.0f} / {st / MiB:.0f} | {s['full']:.0f} | {s['labelled']:.0f} | "
              f"{s['labelled'] / s['full']:.3f} | {by:.0f} | {by / s['full']:.3f} | {100 * h['full'] / s['full']:.1f}% | "
              f"{100 * h['labelled'] / by:.2f}% | {r['forward']:.0f} | "
              f"{(r['forward'] - r['forward_saving']) / r['forward']:.3f} | {pk['full'] / MiB:.0f} | "
              f"{pk['labelled'] / MiB:.0f} | {100 * row['loss_peak']['full'] / pk['full']:.0f}% |")
    print(flush=True)


