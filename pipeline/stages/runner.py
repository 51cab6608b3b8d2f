"""The staged runner: prepare -> base -> train -> eval -> merge -> publish in one run directory.

Each stage reads what earlier stages wrote and records itself in `manifest.json` with a hash
of the config slice it depends on. A finished stage whose hash (and whose upstream) is
unchanged is skipped; a changed upstream invalidates everything downstream.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eval.budget import default_budgets
from pipeline.config import load_config, save_config, to_dict
from pipeline.context import StageContext
from pipeline.errors import UserError
from pipeline.schema import RunConfig

log = logging.getLogger("structlora.runner")

STAGES = ["prepare", "base", "train", "eval", "merge", "publish"]

# The config sections each stage's result depends on (its own and, through the chain, upstream).
STAGE_SLICES: dict[str, list[str]] = {
    "prepare": ["data"],
    "base": ["model", "base", "seed"],
    "train": ["adapter", "train"],
    "eval": ["eval"],
    "merge": ["merge"],
    "publish": ["publish"],
}


# Read-side checks that change no stage's output when they pass: left out of every hash, so that a
# stage stopped by a damaged shard can be re-run with `data.damaged_shards: skip` without preparing,
# pretraining and training again (which would also overwrite the damaged shards being reported).
UNHASHED = {"data": ("verify_shards", "damaged_shards")}
# Keys of a section that only the train stage reads: left out of the earlier stages' hashes (changing them
# re-runs train and what follows it, not prepare and base). `structlora compare` lets a cell set them.
TRAIN_ONLY = {"data": ("long_context",), "model": ("quantization", "double_quant")}

# Keys added after runs existed, left out of every hash while they hold the value that behaves as before (so a
# run made before them is not re-run by an upgrade): (section, key[, subkey]) -> that value. `double_quant` means
# nothing without quantization, so it goes with it.
NEUTRAL_NEW_KEYS = {("model", "quantization"): "none", ("merge", "quantization_paths"): "auto",
                    ("data", "long_context", "per"): "example", ("eval", "max_new_tokens"): default_budgets()}

StageFn = Callable[[StageContext], dict[str, Any]]


def _drop_neutral(full: dict[str, Any]) -> None:
    if full.get("model", {}).get("quantization") == "none":
        full["model"].pop("double_quant", None)
    for path, value in NEUTRAL_NEW_KEYS.items():
        *parents, key = path
        node = full
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(key) == value:
            node.pop(key)


def config_hash(cfg: RunConfig, stage: str) -> str:
    """Hash of the config slices `stage` and every stage before it depend on."""
    full = to_dict(cfg)
    _drop_neutral(full)
    for section, keys in UNHASHED.items():
        full[section] = {k: v for k, v in full[section].items() if k not in keys}
    if STAGES.index(stage) < STAGES.index("train"):
        for section, keys in TRAIN_ONLY.items():
            full[section] = {k: v for k, v in full[section].items() if k not in keys}
    upto = STAGES[: STAGES.index(stage) + 1]
    relevant = {key: full[key] for s in upto for key in STAGE_SLICES[s]}
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Manifest:
    """manifest.json: per stage status, hash, times and outputs; written atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = {"stages": {}}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: corrupt manifest ({err.msg} at line {err.lineno}); "
                                "delete it to re-run every stage") from None

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {})

    def update(self, name: str, **fields: Any) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()

    def invalidate_from(self, name: str) -> None:
        for later in STAGES[STAGES.index(name):]:
            self.data["stages"].pop(later, None)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
        tmp.replace(self.path)


def environment() -> dict[str, Any]:
    """Package versions and the git revision of the code that ran, for the manifest."""
    import platform
    import subprocess
    from importlib import metadata

    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", "webdataset", "pycocoevalcap", "gradio", "timm"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5,
                                    cwd=Path(__file__).resolve().parent).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        rev, dirty = None, None
    return {"python": platform.python_version(), "packages": versions, "git_revision": rev, "git_dirty": dirty}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _stage_functions() -> dict[str, StageFn]:
    from pipeline.stages import base, evaluate, merge, prepare, publish, train

    found: dict[str, StageFn] = {}
    for module in (prepare, base, train, evaluate, merge, publish):
        found.update({name: getattr(module, f"stage_{name}") for name in STAGES if hasattr(module, f"stage_{name}")})
    return found


def run_config(config_path: Path, overrides: list[str], stages: list[str] | None = None,
               from_stage: str | None = None, run_dir: Path | None = None) -> Path:
    """Run (or resume) the pipeline for a config file. Returns the run directory."""
    cfg = load_config(RunConfig, config_path, overrides)
    for name in (stages or []) + ([from_stage] if from_stage else []):
        if name not in STAGES:
            raise UserError(f"unknown stage '{name}': choose from {', '.join(STAGES)}")
    run_dir = Path(run_dir or cfg.run_dir)
    if run_dir != Path(cfg.run_dir):
        cfg.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_stages(cfg, run_dir, stages, from_stage)


# Stages that one process does for all (files on disk); the others wait at a barrier.
MAIN_PROCESS_ONLY = {"prepare", "merge", "publish"}


def run_stages(cfg: RunConfig, run_dir: Path, stages: list[str] | None = None,
               from_stage: str | None = None) -> Path:
    import datetime

    from accelerate import PartialState

    # prepare (converting COCO), merge (folding and saving 7B) and scoring run on rank 0 while the
    # other ranks wait at a barrier: the default 10-minute NCCL timeout would kill such a run
    state = PartialState(cpu=not _cuda(), timeout=datetime.timedelta(minutes=cfg.distributed_timeout_minutes))
    main = state.is_main_process
    functions = _stage_functions()
    wanted = [s for s in STAGES if (stages is None or s in stages)]
    if "train" in wanted:  # refuse now what the train stage could not honour, not after prepare and base
        from pipeline.stages.sharding import preflight

        preflight(cfg.train.precision, cfg.train.sharding, cfg.adapter.method, cfg.model.quantization)
        if cfg.model.name_or_path and Path(cfg.model.name_or_path).expanduser().is_dir():  # not after prepare
            from pipeline.models.quantize import check_saved

            check_saved(Path(cfg.model.name_or_path).expanduser(), cfg.model.quantization, cfg.model.revision,
                        cfg.model.name_or_path)
    if from_stage and main:
        Manifest(run_dir / "manifest.json").invalidate_from(from_stage)
    state.wait_for_everyone()
    ctx = StageContext(cfg=cfg, run_dir=run_dir)
    for name in wanted:
        manifest = Manifest(run_dir / "manifest.json")  # re-read: rank 0 may have written it
        digest = config_hash(cfg, name)
        record = manifest.stage(name)
        if record.get("status") == "done" and record.get("hash") == digest:
            log.info("stage %s: unchanged, skipped", name)
            if main:
                print(f"[{name}] done earlier with the same config: skipped")
            continue
        if main:
            # A stage killed mid-way with the same config resumes from its checkpoints; anything else
            # (a changed slice, an upstream re-run, --from) starts afresh, and so does everything after it.
            resume = record.get("status") == "running" and record.get("hash") == digest
            for later in STAGES[STAGES.index(name):]:
                if (later != name or not resume) and (run_dir / later).is_dir():
                    import shutil

                    shutil.rmtree(run_dir / later)
            manifest.invalidate_from(name)
            print(f"[{name}] running")
            manifest.update(name, status="running", hash=digest, started=_now(), pid=os.getpid(),
                            env=environment(), world_size=state.num_processes)
        state.wait_for_everyone()
        outputs: dict[str, Any] = {}
        if name in MAIN_PROCESS_ONLY:
            from eval.harness import on_main

            outputs = on_main(state, lambda fn=functions[name]: fn(ctx), f"stage '{name}'") or {}
        else:
            outputs = functions[name](ctx) or {}
        state.wait_for_everyone()
        if main:
            manifest.update(name, status="done", finished=_now(), outputs=outputs)
            print(f"[{name}] done")
        state.wait_for_everyone()
    return run_dir


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
