"""The handlers of the `structlora` subcommands: each turns parsed arguments into one call.

Each handler is a thin adapter: it calls one function in the package that owns the work, named by
a "module:function" string and imported lazily so that `structlora --help` stays fast.
pipeline.cli_parser builds the subcommands that dispatch to them; pipeline.cli runs them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from pipeline.errors import UserError


def _call(target: str, **kwargs):
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, func_name)(**kwargs)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def split_csv(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated argument."""
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_run(args: argparse.Namespace) -> int:
    _call(
        "pipeline.stages.runner:run_config",
        config_path=Path(args.config),
        overrides=args.set or [],
        stages=args.stages.split(",") if args.stages else None,
        from_stage=args.from_stage,
        run_dir=Path(args.run_dir) if args.run_dir else None,
    )
    return 0


def cmd_prepare_shapes(args: argparse.Namespace) -> int:
    summary = _call(
        "data.shapes:write_shapes_world",
        out=Path(args.out), seed=args.seed, num_images=args.images, size=args.size,
        image_format=args.format,
    )
    if args.as_ == "conversations":
        summary["conversation_files"] = _call("data.shapes_conversations:write_shapes_conversations",
                                              world_dir=Path(args.out), out_dir=Path(args.out) / "conversation_files",
                                              fmt=args.conversation_format)
    if args.shards:
        summary["shards"] = _call("data.prepare:prepare_shapes_shards", world_dir=Path(args.out),
                                  out=Path(args.shards), shard_size=args.shard_size, workers=args.workers or 1)
    _print_json(summary)
    return 0


def cmd_prepare_conversations(args: argparse.Namespace) -> int:
    splits = {s: Path(getattr(args, s)) for s in ("train", "val", "test") if getattr(args, s)}
    _print_json(_call("data.prepare_conversations:prepare_conversations", out=Path(args.out),
                      file=Path(args.file) if args.file else None, splits=splits or None, fmt=args.format,
                      images=Path(args.images) if args.images else None, val_fraction=args.val_fraction,
                      test_fraction=args.test_fraction, shard_size=args.shard_size, workers=args.workers,
                      strict=args.strict, tags=args.tags, dedupe=args.dedupe))
    if args.config:  # the data card for the model a run would train
        from data.data_card import render_card, token_card, write_card
        from pipeline.config import load_config
        from pipeline.models.door import open_processor
        from pipeline.schema import RunConfig

        cfg = load_config(RunConfig, Path(args.config), args.set)
        processor, context = open_processor(cfg.model, cfg.data.image_fit)
        card = token_card(Path(args.out) / "conversations", processor, cfg.data.max_length, context)
        paths = write_card(card, Path(args.out) / "conversations")
        print("\n".join(render_card(card)[1:]) + f"\n\n({paths['md']})", file=sys.stderr)
    return 0


def _shard_dir(args: argparse.Namespace, task: str) -> Path:
    """--out as given, or --out/{task}/{split}/ with --split: the layout `--data` and `data.source: shards` read."""
    return Path(args.out) / task / args.split if args.split else Path(args.out)


def cmd_prepare_coco(args: argparse.Namespace) -> int:
    _print_json(_call("data.prepare:prepare_coco", captions=Path(args.captions), images=Path(args.images),
                      out=_shard_dir(args, "caption"), shard_size=args.shard_size, workers=args.workers))
    return 0


def cmd_prepare_vqav2(args: argparse.Namespace) -> int:
    _print_json(_call("data.prepare:prepare_vqav2", questions=Path(args.questions),
                      annotations=Path(args.annotations), images=Path(args.images),
                      out=_shard_dir(args, "vqav2"), shard_size=args.shard_size, workers=args.workers))
    return 0


def cmd_prepare_gqa(args: argparse.Namespace) -> int:
    _print_json(_call("data.prepare:prepare_gqa", questions=Path(args.questions), images=Path(args.images),
                      out=_shard_dir(args, "gqa"), shard_size=args.shard_size, workers=args.workers))
    return 0


def cmd_prepare_imagefolder(args: argparse.Namespace) -> int:
    _print_json(_call("data.prepare:prepare_imagefolder", root=Path(args.root), out=_shard_dir(args, "classification"),
                      shard_size=args.shard_size, workers=args.workers))
    return 0


def cmd_score_caption(args: argparse.Namespace) -> int:
    _print_json(_call("eval.scoring:score_caption_files", references=Path(args.references),
                      predictions=Path(args.predictions)))
    return 0


def cmd_score_vqa(args: argparse.Namespace) -> int:
    _print_json(_call("eval.scoring:score_vqa_files", questions=Path(args.questions),
                      annotations=Path(args.annotations), predictions=Path(args.predictions)))
    return 0


def cmd_score_gqa(args: argparse.Namespace) -> int:
    _print_json(_call("eval.scoring:score_gqa_files", questions=Path(args.questions),
                      predictions=Path(args.predictions)))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    _print_json(_call("pipeline.stages.merge:merge_run", run_dir=Path(args.run_dir), out=Path(args.out),
                      overwrite=args.overwrite))
    return 0


def eval_quantization(args: argparse.Namespace) -> str | None:
    if args.load_in_4bit and args.quantization not in (None, "nf4"):
        raise UserError(f"--load-in-4bit means --quantization nf4, not {args.quantization}: give one of them")
    return args.quantization or ("nf4" if args.load_in_4bit else None)


def cmd_eval(args: argparse.Namespace) -> int:
    result = _call(
        "pipeline.eval_command:run_eval",
        models=args.models, data=Path(args.data), tasks=split_csv(args.tasks), adapters=args.adapter or [],
        split=args.split, max_samples=args.max_samples,
        lengths=args.lengths, out=args.out,
        registry=Path(args.registry) if args.registry else None, distractor=args.distractor,
        batch_size=args.batch_size, long_context_samples=args.long_context_samples, reference=args.reference,
        dtype=args.dtype, revision=args.revision, damaged_shards=args.damaged_shards,
        verify_shards=not args.no_verify_shards, timeout_minutes=args.timeout_minutes,
        conversation_metric=args.conversation_metric, quantization=eval_quantization(args),
        double_quant=not args.no_double_quant, chat_template=args.chat_template,
        max_new_tokens=args.max_new_tokens,
    )
    if result:  # the main process: show the report
        print(Path(result["report"]).read_text(encoding="utf-8"))
        _print_json(result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.model_dir and not args.registry:
        raise UserError("structlora demo: give a MODEL_DIR or --registry DIR")
    _call("app.demo:launch", model_dir=Path(args.model_dir) if args.model_dir else None,
          registry=Path(args.registry) if args.registry else None, host=args.host, port=args.port,
          share=args.share, chat_template=args.chat_template)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    _call("pipeline.compare.command:compare_command", config=args.config, methods=args.methods, ranks=args.ranks,
          seeds=args.seeds, lr_grid=args.lr_grid, tune_seeds=args.tune_seeds, metric=args.metric, out=args.out,
          jobs=args.jobs, threads=args.threads, launcher=args.launcher, report_only=args.report_only,
          partial=args.partial, plan_file=args.plan, quick=args.quick, phases=args.phases,
          accelerate_config=args.accelerate_config, sbatch=args.sbatch, overrides=args.set or [],
          diagnostics=args.diagnostics, forgetting=args.forgetting_split, results=args.results,
          rerun_other_base=args.rerun_other_base, primary_arms=args.primary_arms,
          reuse_tune_seeds=args.reuse_tune_seeds, pool=args.pool, per_rank=args.per_rank, tau2=args.tau2,
          command="structlora " + " ".join(sys.argv[1:]))
    return 0
