"""The prepare stage: the configured sources (the shapes world, official files, your conversation files)
into shards/{task}/{split}/ of the run directory, as `data.prepare` and `data.prepare_conversations` write them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.context import StageContext
from pipeline.errors import UserError

SPLIT_KEYS = {"train": "", "val": "val_", "test": "test_"}


def stage_prepare(ctx: StageContext) -> dict[str, Any]:
    from data import prepare

    cfg, out = ctx.cfg.data, ctx.stage_dir("prepare")
    shards = out / "shards"
    workers = cfg.prepare_workers or None
    result: dict[str, Any]
    if cfg.source == "shapes":
        from data.shapes import write_shapes_world

        world = write_shapes_world(out / "world", seed=cfg.shapes.seed, num_images=cfg.shapes.images,
                                   size=cfg.shapes.size, image_format=cfg.shapes.image_format)
        # 0 (auto) is one process for the small synthetic world; a count given is honoured
        index = prepare.prepare_shapes_shards(out / "world", shards, cfg.shard_size, cfg.prepare_workers or 1)
        result = {"world": world.get("counts", world), "shards": str(shards), "tasks": sorted(index["tasks"])}
        if cfg.shapes.conversations != "none":  # the world as conversation files, prepared as yours would be
            from data.shapes_conversations import write_shapes_conversations

            files = write_shapes_conversations(out / "world", out / "conversation_files", cfg.shapes.conversations)
            from pipeline.schema_data import ConversationsConfig

            result["conversations"] = _prepare_conversations(
                {split: f["file"] for split, f in files.items()}, ConversationsConfig(format=cfg.shapes.conversations),
                shards, cfg.shard_size, workers)
    elif cfg.source == "shards":
        root = Path(_path(cfg.paths, "root", "data.paths.root"))
        if not root.is_dir():
            raise UserError(f"data.paths.root: shard directory not found: {root}")
        return {"shards": str(root)}
    else:
        result = {"shards": str(shards), **_prepare_source(cfg.source, cfg.paths, cfg.conversations, shards,
                                                            cfg.shard_size, workers, "data.paths")}
    for i, extra in enumerate(cfg.sources):
        result.setdefault("sources", []).append(_prepare_source(extra.kind, extra.paths, extra.conversations, shards,
                                                                cfg.shard_size, workers, f"data.sources[{i}].paths"))
    return result


def _prepare_conversations(paths: dict[str, str], conv, shards: Path, shard_size: int, workers: int | None):
    """A conversation file (`file`), or a file per split (`train`, `val`, `test`), into shards/conversations/."""
    from data.prepare_conversations import prepare_conversations

    splits = {k: Path(v) for k, v in paths.items() if k in ("train", "val", "test")}
    summary = prepare_conversations(shards, file=Path(paths["file"]) if paths.get("file") else None,
                                    splits=splits or None, fmt=conv.format,
                                    images=Path(paths["images"]) if paths.get("images") else None,
                                    val_fraction=conv.val_fraction, test_fraction=conv.test_fraction,
                                    shard_size=shard_size, workers=workers, strict=conv.strict, tags=conv.tags,
                                    dedupe=conv.dedupe)
    splits = ", ".join(f"{s} {v['records']} records / {v['images']} images" for s, v in summary["splits"].items())
    print(f"[prepare] conversations: {summary['kept']} records kept ({splits}; split by {summary['split_by']}, "
          f"{summary['images_in_several_splits']} images in several splits), {summary['ids_reused']} ids reused "
          f"(kept under derived ids), {summary['skipped']} skipped {summary['skipped_by_reason'] or ''} "
          f"({shards / 'conversations' / 'prepare_summary.json'})")
    return {k: summary[k] for k in ("splits", "kept", "skipped", "skipped_by_reason", "format", "dedupe", "ids_reused",
                                    "duplicates", "split_by", "images_in_several_splits")}


def _prepare_source(kind: str, paths: dict[str, str], conv, shards: Path, shard_size: int, workers: int | None,
                    where: str) -> dict[str, Any]:
    """One source of official files (or a conversation file) into shards/{task}/{split}/."""
    from data import prepare

    if kind == "conversations":
        if not paths.get("file") and not any(paths.get(s) for s in ("train", "val", "test")):
            raise UserError(f"{where}: give `file` (one conversation file) or `train` / `val` / `test`")
        return {"task": "conversations", **_prepare_conversations(paths, conv, shards, shard_size, workers)}
    written = {}
    for split, prefix in SPLIT_KEYS.items():
        def p(role: str, prefix: str = prefix) -> Path | None:
            value = paths.get(prefix + role)
            return Path(value) if value else None

        dest = shards / _task_of(kind) / split
        if kind == "coco" and p("captions"):
            written[split] = prepare.prepare_coco(p("captions"), _need(p("images"), prefix + "images"), dest,
                                                  shard_size, workers)
        elif kind == "vqav2" and p("questions"):
            written[split] = prepare.prepare_vqav2(p("questions"), _need(p("annotations"), prefix + "annotations"),
                                                   _need(p("images"), prefix + "images"), dest, shard_size, workers)
        elif kind == "gqa" and p("questions"):
            written[split] = prepare.prepare_gqa(p("questions"), _need(p("images"), prefix + "images"), dest,
                                                 shard_size, workers)
        elif kind == "imagefolder" and p("root"):
            written[split] = prepare.prepare_imagefolder(p("root"), dest, shard_size, workers=workers)
    if "train" not in written:
        raise UserError(f"{where}: no training files given for source '{kind}'")
    return {"task": _task_of(kind), "splits": sorted(written)}


def _task_of(source: str) -> str:
    return {"coco": "caption", "imagefolder": "classification"}.get(source, source)


def _path(paths: dict[str, str], key: str, name: str) -> str:
    if key not in paths:
        raise UserError(f"{name} is required for this data source")
    return paths[key]


def _need(value: Path | None, role: str) -> Path:
    if value is None:
        raise UserError(f"data.paths.{role} is required")
    return value
