"""The publish stage: register the merged model with the demo's registry (app/registry.py) and, for a run on
conversation data, write the demo's examples from held-out conversations."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.context import StageContext
from pipeline.errors import UserError


def conversation_examples(split_dir: Path, out: Path, limit: int = 6, verify: bool = True,
                          on_damaged: str = "error") -> int:
    """The demo's examples from held-out conversations: the first `limit` with exactly one image (the demo
    takes one), the image as `out/NN.png` and the last user turn (the one evaluation asks; tags removed) in
    `out/prompts.json`. The folder is written anew. Returns how many."""
    from data.files import write_json_atomic
    from data.prompts import IMAGE_TOKEN
    from data.stream import EvalStream, ShardSource

    if not (split_dir / "manifest.json").is_file():
        return 0
    source = ShardSource.from_dir(split_dir, verify=verify, on_damaged=on_damaged)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    prompts: dict[str, str] = {}
    for example in EvalStream(source, rank=0, world_size=1) if source.urls else []:
        if len(example.get("images") or []) != 1:
            continue
        name = f"{len(prompts):02d}.png"
        example["images"][0].convert("RGB").save(tmp / name)
        user = [m["content"] for m in example["messages"] if m["role"] == "user"][-1]
        prompts[name] = " ".join(user.replace(IMAGE_TOKEN, " ").split())
        if len(prompts) >= limit:
            break
    write_json_atomic(tmp / "prompts.json", prompts)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return len(prompts)


def stage_publish(ctx: StageContext) -> dict[str, Any]:
    """Register the merged model with the demo's registry and print the command that serves it."""
    import datetime as dt

    from app.registry import register_model
    from pipeline.stages.common import shards_root

    cfg = ctx.cfg
    if cfg.model.arch == "vit":
        return {"skipped": "the demo serves vision-language models; the merged classifier is in merge/model"}
    model_dir = (ctx.run_dir / "merge" / "model").resolve()
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no merged model: run the merge stage first (--stages merge)")
    from eval.report import headline_from_file

    metrics = headline_from_file(ctx.run_dir / "eval" / "metrics.json") or {}
    entry = {
        "name": cfg.publish.name or Path(ctx.run_dir).resolve().name,
        "base_model": cfg.model.name_or_path or str((ctx.run_dir / "base" / "model").resolve()),
        "task": "+".join(sorted(t for t, w in cfg.data.tasks.items() if w > 0)),
        "method": cfg.adapter.method,
        "metrics": metrics,
        "path": str(model_dir),
        "run_dir": str(Path(ctx.run_dir).resolve()),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    registry = Path(cfg.publish.registry)
    if cfg.data.tasks.get("conversations", 0) > 0:
        conversation_examples(shards_root(ctx) / "conversations" / cfg.eval.split, ctx.run_dir / "examples",
                              verify=cfg.data.verify_shards, on_damaged=cfg.data.damaged_shards)
    register_model(registry, entry)
    command = f"structlora demo --registry {registry}"
    print(f"published '{entry['name']}' to {registry}; serve it with:\n    {command}\n"
          f"or this model alone with:\n    structlora demo {model_dir}")
    return {"registry": str(registry), "name": entry["name"], "demo_command": command}
