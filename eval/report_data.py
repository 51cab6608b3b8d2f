"""The data lines of the report (`eval.report`): what each scored split held, what was scored and lost, and
what the training streams skipped (``data.accounting``'s accounts)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def data_headline(data: Mapping[str, Any] | None) -> list[str]:
    """The report's first lines: how many examples of each scored split were scored, and any loss, with why."""
    from data.accounting import describe_loss, describe_train_loss

    if not data:
        return []
    lines = []
    evals = data.get("eval") or {}
    lost = [describe_loss(a) for a in evals.values() if a.get("lost_anything")]
    if lost:
        lines += [f"**Data lost, scores cover only what was read.** {'; '.join(lost)}."]
    elif evals:
        counts = ", ".join(f"{t} {a['scored']} of {a['wanted']}" for t, a in evals.items())
        lines.append(f"Scored every wanted example ({counts}, {next(iter(evals.values()))['split']} split); "
                     "nothing skipped.")
    for stage in ("base", "train"):
        for account in (data.get(stage) or {}).values():
            line = describe_train_loss(account)
            if line:
                lines.append(f"**Training data lost ({stage} stage):** {line}.")
    return [x for line in lines for x in (line, "")]  # one paragraph each


def data_section(data: Mapping[str, Any] | None) -> list[str]:
    """'## Data': per scored task what its split holds, what was scored and lost by reason; per training
    stream the totals and every epoch that lost something."""
    from data.accounting import KINDS, LABELS

    if not data:
        return []
    lines = ["", "## Data", ""]
    evals = data.get("eval") or {}
    if evals:
        kinds = ["shards_left_out", "damaged_shards_read", "corrupt_images", "bad_records"]
        lines += ["| task | split | examples held | wanted | scored | lost | " + " | ".join(LABELS[k] for k in kinds)
                  + " | skipped at prepare |", "|---|---|" + "---:|" * (5 + len(kinds))]
        for task, a in evals.items():
            cells = [str(a["skipped"].get(k, 0)) for k in kinds]
            lines.append(f"| {task} | {a['split']} | {a['holds']} | {a['wanted']} | {a['scored']} | {a['lost']} | "
                         + " | ".join(cells) + f" | {a.get('skipped_at_prepare', 0)} |")
        left = [s for a in evals.values() for s in a["shards_left_out"]]
        lines += [""] if left else []
        for a in evals.values():
            lines += [f"- {a['task']}: left out {s['shard']} ({s['reason']}; {s['images']} images, {s['units']} "
                      "captions / questions)" for s in a["shards_left_out"]]
    streams = [(stage, role, a) for stage in ("base", "train") for role, a in (data.get(stage) or {}).items()]
    if streams:
        kinds = ["shards_left_out", *KINDS]
        lines += ["", "Training streams (counts summed over ranks; per epoch in the stage's summary.json):", "",
                  "| stage | split | epoch | " + " | ".join(LABELS[k] for k in kinds) + " |",
                  "|---|---|---|" + "---:|" * len(kinds)]
        for stage, _, a in streams:
            rows = [("total", a["total"])] + [(str(r["epoch"]), {"shards_left_out": a["total"]["shards_left_out"], **r})
                                              for r in a["per_epoch"] if any(r.get(k) for k in KINDS)]
            for epoch, row in rows:
                lines.append(f"| {stage} | {a['split']} | {epoch} | " + " | ".join(str(row.get(k, 0)) for k in kinds)
                             + " |")
        made = [(stage, a) for stage, _, a in streams if (a.get("made") or {}).get("long_context_examples")]
        lines += [""] if made else []
        lines += [f"- {stage} ({a['split']}): {a['made']['long_context_examples']} long-context training examples "
                  f"built (data.long_context; {a['made'].get('long_context_no_pool', 0)} drawn before the filler "
                  "pool had another image's caption, kept short)" for stage, a in made]
    from data.data_card import render_card

    return lines + render_card(data.get("card"))
