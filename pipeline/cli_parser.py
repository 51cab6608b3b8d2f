"""The `structlora` argument parser: every subcommand, its arguments and their help (DESIGN.md section 6).

`build_parser` sets each subcommand's handler (pipeline.cli_handlers); pipeline.cli parses and runs it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pipeline.cli_handlers import (
    cmd_compare,
    cmd_demo,
    cmd_eval,
    cmd_merge,
    cmd_prepare_coco,
    cmd_prepare_conversations,
    cmd_prepare_gqa,
    cmd_prepare_imagefolder,
    cmd_prepare_shapes,
    cmd_prepare_vqav2,
    cmd_run,
    cmd_score_caption,
    cmd_score_gqa,
    cmd_score_vqa,
    split_csv,
)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _lengths(text: str) -> list[int]:
    return [_positive(part) for part in split_csv(text)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structlora",
        description="StructLoRA for vision-language models: prepare shards, train, evaluate, merge, demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(subparsers, name: str, help_: str, handler: Callable[[argparse.Namespace], int]):
        p = subparsers.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    p = add(sub, "run", "run the staged pipeline (prepare, base, train, eval, merge, publish) for a config", cmd_run)
    p.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("--stages", help="comma-separated subset of stages to run, e.g. prepare,train")
    p.add_argument("--from", dest="from_stage", help="re-run from this stage on, even if finished")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override, e.g. train.max_steps=10")
    p.add_argument("--run-dir", help="run directory (default: the config's run_dir)")

    p = add(sub, "compare", "compare methods fairly on a config: the same lr candidates per arm, paired seeds, "
            "t intervals, Holm within declared families, power; --pool: a meta-analysis of comparisons", cmd_compare)
    p.add_argument("config", nargs="?", help="YAML config every cell shares (data, model, base), e.g. configs/tiny.yaml")
    p.add_argument("--methods", help="comma-separated arms, the first is the reference, e.g. lora,structlora,dora")
    p.add_argument("--ranks", default="8", help="comma-separated adapter ranks of the grid (default 8)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per arm and rank (default 3)")
    p.add_argument("--lr-grid", default="0.5,1,2", help="multiples of each arm's configured lr, chosen on validation "
                   "loss (default 0.5,1,2; one value: no search)")
    p.add_argument("--tune-seeds", type=int, default=1, help="seeds per lr candidate (default 1; seeds 1000, 1001, ...: "
                   "never grid seeds)")
    p.add_argument("--reuse-tune-seeds", action="store_true", help="tune on the grid's first seeds (0, 1, ...), as "
                   "before issue 42: those grid cells inherit the lr selection (the report repeats the primary family "
                   "without them)")
    p.add_argument("--primary-arms", metavar="ARMS", help="the primary family: these arms' primary metric against the "
                   "reference at each rank (default: every arm but the ablations); every other test is secondary")
    p.add_argument("--pool", nargs="+", metavar="DIR", help="no CONFIG, nothing trains: pool these results folders "
                   "(DIR or DIR:REF,ARM) by a random-effects meta-analysis of --methods REF,ARM (default lora,structlora), "
                   "with a forest plot, into --out (default runs/pool)")
    p.add_argument("--per-rank", action="store_true", help="with --pool: one comparison per folder and rank (they "
                   "share seeds and base: not independent) instead of one per folder (each seed averaged over its ranks)")
    p.add_argument("--tau2", choices=["reml", "dl"], default="reml", help="with --pool: the between-comparison "
                   "variance's estimator, REML (default) or DerSimonian-Laird")
    p.add_argument("--metric", default="test_loss", help="primary metric: test_loss (default), caption.CIDEr, "
                   "vqav2.overall, gqa.accuracy, conversations.exact_match, ...")
    p.add_argument("--out", help="folder of the cells' run directories (default runs/compare-CONFIG)")
    p.add_argument("--results", help="folder of the cells' results and the report (default OUT/results): "
                   "small files, to commit")
    p.add_argument("--forgetting-split", metavar="SPLIT", help="also score every model on this split, the one the base "
                   "learned from (the shapes world's `base`), before and after adaptation")
    p.add_argument("--jobs", type=int, default=1, help="cells run side by side here, each in its own process")
    p.add_argument("--threads", type=int, help="torch threads per cell (default: cores / jobs)")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="slurm: write a job array (one cell per task) for the next unfinished phase, no training here")
    p.add_argument("--accelerate-config", help="launch each cell with `accelerate launch --config_file FILE`")
    p.add_argument("--sbatch", action="append", metavar="OPTION", help="an #SBATCH line, e.g. --sbatch=--gres=gpu:1")
    p.add_argument("--report-only", action="store_true", help="no training: report the finished cells")
    p.add_argument("--partial", action="store_true", help="with --report-only: report what is finished so far")
    p.add_argument("--rerun-other-base", action="store_true",
                   help="run again (replacing their results) the finished cells made on another base model")
    p.add_argument("--plan", help="a plan file instead of --methods... (gate search, ablations, low data; "
                   "see bench/study_v2.yaml)")
    p.add_argument("--quick", action="store_true", help="with --plan: the file's quick section")
    p.add_argument("--phases", help="run only these phases (gate, lr, grid, lowdata); the others must be done")
    p.add_argument("--diagnostics", action="store_true", help="also measure the update structure of every grid cell")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override of CONFIG, e.g. train.max_steps=300")

    prep = sub.add_parser("prepare", help="convert datasets (official formats) into WebDataset shards",
                          description="convert datasets (official formats) into WebDataset shards")
    prep_sub = prep.add_subparsers(dest="dataset", metavar="DATASET", required=True)

    p = add(prep_sub, "shapes", "generate the synthetic shapes world in COCO / VQAv2 / GQA formats", cmd_prepare_shapes)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=2000, help="number of images over all splits")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--format", choices=["png", "jpg"], default="png", help="image file format")
    p.add_argument("--as", dest="as_", choices=["world", "conversations"], default="world",
                   help="conversations: also write the world as conversation files, OUT/conversation_files/"
                        "shapes_{train,val,test}.json[l] (the offline example of bringing your own data)")
    p.add_argument("--conversation-format", choices=["llava", "sharegpt", "messages"], default="llava",
                   help="format of those files (default llava)")
    p.add_argument("--shards", metavar="DIR", help="also convert every split into DIR/{task}/{split}/ shards "
                                                   "(what `structlora eval --data` and data.source: shards read)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (with --shards)")
    p.add_argument("--workers", type=int, default=None, help="processes writing shards (with --shards; default 1)")

    p = add(prep_sub, "conversations", "your own conversation file (LLaVA, ShareGPT or messages format) -> "
            "shards in OUT/conversations/{train,val,test}/", cmd_prepare_conversations)
    p.add_argument("--file", help="the conversation file (JSON array or JSONL), split by image: records that share "
                                  "an image stay in one split")
    p.add_argument("--train", help="instead of --file: the training file (and --val, --test)")
    p.add_argument("--val", help="the validation file")
    p.add_argument("--test", help="the test file")
    p.add_argument("--format", default="auto", choices=["auto", "llava", "sharegpt", "messages"],
                   help="auto (default): from the first records")
    p.add_argument("--images", help="folder of relative image paths (default: the data file's own folder)")
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=float, default=0.05, help="with --file: share for val (default 0.05)")
    p.add_argument("--test-fraction", type=float, default=0.05, help="with --file: share for test (default 0.05)")
    p.add_argument("--shard-size", type=int, default=1000, help="conversations per shard")
    p.add_argument("--workers", type=int, default=None, help="processes writing shards (default: one per core, at "
                                                             "most 8); a killed prepare resumes")
    p.add_argument("--strict", action="store_true", help="the first bad record is an error, before any shard is "
                                                         "written (default: counted and skipped)")
    p.add_argument("--dedupe", default="content", choices=["content", "id", "off"],
                   help="content (default): a record repeating an earlier one word for word and image for image is a "
                        "duplicate; a reused id with other content is kept under ID#<8 hex>; id: a repeated id is a "
                        "duplicate; off: keep every record")
    p.add_argument("--tags", help="field / role names, e.g. role=from,content=value,user=human,assistant=gpt")
    p.add_argument("--config", help="a run config: also write the data card for its model (samples' length in its "
                                    "tokens, how many exceed data.max_length, suggested max_length / max_new_tokens) "
                                    "to OUT/conversations/data_card.{json,md,png}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --config: override a field")

    p = add(prep_sub, "coco", "COCO captions JSON + image folder -> shards", cmd_prepare_coco)
    p.add_argument("--captions", required=True, help="captions_*.json")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--out", required=True)
    p.add_argument("--split", help="write the shards into OUT/{task}/{split}/ (e.g. test), the layout of "
                                   "`structlora eval --data OUT` and data.source: shards; default: into OUT itself")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=None, help="processes writing shards (default: one per core, at most 8); a killed prepare resumes")

    p = add(prep_sub, "vqav2", "VQAv2 questions + annotations JSON + image folder -> shards", cmd_prepare_vqav2)
    p.add_argument("--questions", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", help="write the shards into OUT/{task}/{split}/ (e.g. test), the layout of "
                                   "`structlora eval --data OUT` and data.source: shards; default: into OUT itself")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=None, help="processes writing shards (default: one per core, at most 8); a killed prepare resumes")

    p = add(prep_sub, "gqa", "GQA questions JSON + image folder -> shards", cmd_prepare_gqa)
    p.add_argument("--questions", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", help="write the shards into OUT/{task}/{split}/ (e.g. test), the layout of "
                                   "`structlora eval --data OUT` and data.source: shards; default: into OUT itself")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=None, help="processes writing shards (default: one per core, at most 8); a killed prepare resumes")

    p = add(prep_sub, "imagefolder", "one folder per class -> classification shards (ViT path)",
            cmd_prepare_imagefolder)
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", help="write the shards into OUT/{task}/{split}/ (e.g. test), the layout of "
                                   "`structlora eval --data OUT` and data.source: shards; default: into OUT itself")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=None, help="processes writing shards (default: one per core, at most 8); a killed prepare resumes")

    score = sub.add_parser("score", help="score a predictions file (prints JSON)",
                           description="score a predictions file against official annotations (prints JSON)")
    score_sub = score.add_subparsers(dest="task", metavar="TASK", required=True)
    p = add(score_sub, "caption", "CIDEr-D, BLEU-1..4, METEOR, ROUGE-L (pycocoevalcap)", cmd_score_caption)
    p.add_argument("--references", required=True, help="COCO captions JSON")
    p.add_argument("--predictions", required=True, help='[{"image_id", "caption"}] JSON or JSONL')
    p = add(score_sub, "vqa", "VQAv2 accuracy (official vqaEval rules)", cmd_score_vqa)
    p.add_argument("--questions", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--predictions", required=True, help='[{"question_id", "answer"}] JSON or JSONL')
    p = add(score_sub, "gqa", "GQA accuracy (exact match, balanced questions)", cmd_score_gqa)
    p.add_argument("--questions", required=True)
    p.add_argument("--predictions", required=True, help='[{"questionId", "prediction"}] JSON or JSONL')

    p = add(sub, "merge", "fold a run's adapter into the base weights; write a transformers model and a PEFT adapter",
            cmd_merge)
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = add(sub, "eval", "score vision-language models (any family) side by side on the same samples (captions, VQAv2, "
            "GQA, long context)",
            cmd_eval)
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="[NAME=]hub id, model directory, run directory (its merged model) or --registry entry name")
    p.add_argument("--data", required=True, help="shards folder ({task}/{split}/ inside) or a run directory")
    p.add_argument("--tasks", default="caption,vqav2,gqa",
                   help="comma-separated: caption, vqav2, gqa, conversations (your own data: the last answer of "
                        "each held-out conversation), long_context, test_loss (the teacher-forced loss of the other "
                        "tasks' reference answers) (default: caption,vqav2,gqa)")
    p.add_argument("--conversation-metric", default="auto",
                   choices=["auto", "exact_match", "token_f1", "anls", "bleu4", "cider"],
                   help="headline of the conversations task (auto: exact match for short answers, CIDEr for "
                        "sentences); every metric is reported")
    p.add_argument("--max-new-tokens", metavar="TASK=N,...",
                   help="generation budgets, e.g. conversations=auto,caption=32 (auto, for conversations: measured "
                        "on the --data's conversations train split in each model's tokens); a task not named keeps "
                        "its default (64 caption and conversations, 16 short answers)")
    p.add_argument("--adapter", action="append", metavar="[NAME=]PEFT_DIR",
                   help="also score the first MODEL with this PEFT adapter (folder or hub id) on top, unmerged "
                        "(repeatable); the first MODEL must be the adapter's base, not a run's merged model")
    p.add_argument("--split", default="test", help="shard split to score (default: test)")
    p.add_argument("--max-samples", type=_positive, default=None, help="first N samples of each task (default: all)")
    p.add_argument("--lengths", type=_lengths, help="long-context prompt lengths in tokens, e.g. 256,512,1024,2048 (default: "
                                     "those, scaled down to the first model's context when they do not fit)")
    p.add_argument("--long-context-samples", type=_positive, default=48, help="images captioned at every length")
    p.add_argument("--distractor", default="captions",
                   help="long-context filler: 'captions' (other images' reference captions), 'neutral' (the shipped "
                        "data/neutral_filler.txt: the shapes world's words, no scene described) or a text file")
    p.add_argument("--reference", help="model the others are compared with (default: the first)")
    p.add_argument("--batch-size", type=_positive, default=8, help="samples per generate call")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: the checkpoint's own on a GPU, float32 on a CPU)")
    p.add_argument("--quantization", choices=["nf4", "fp4", "int8"],
                   help="load every model (and the base under each --adapter) with its language model quantized "
                        "(bitsandbytes; vision tower, connector and lm_head kept) as a run with model.quantization "
                        "trained it; a checkpoint saved quantized loads so without it")
    p.add_argument("--load-in-4bit", action="store_true", help="= --quantization nf4")
    p.add_argument("--chat-template", help="a Jinja chat template file for models whose processor has none "
                                           "(e.g. PaliGemma's hub checkpoints); every prompt is rendered through it")
    p.add_argument("--no-double-quant", action="store_true",
                   help="4-bit without double quant (for a run trained with model.double_quant: false)")
    p.add_argument("--revision", help="hub revision of hub-id models")
    p.add_argument("--registry", help="model registry folder, to name its entries as MODEL")
    p.add_argument("--out", help="output folder (default: runs/eval-DATE-TIME)")
    p.add_argument("--damaged-shards", choices=["error", "skip"], default="error",
                   help="a shard that fails its manifest check (size, sha256): error = stop naming it (default); "
                        "skip = leave it out and report its examples as lost in report.md and metrics.json")
    p.add_argument("--no-verify-shards", action="store_true",
                   help="check shard sizes only, not their sha256 (misses a shard damaged in place)")
    p.add_argument("--timeout-minutes", type=_positive, default=240,
                   help="collective timeout under torchrun / accelerate launch: the other ranks wait while "
                        "rank 0 scores (default 240, as structlora run)")

    p = add(sub, "demo", "serve a merged model in a Gradio app", cmd_demo)
    p.add_argument("model_dir", nargs="?", help="merged model directory")
    p.add_argument("--registry", help="model registry folder written by the publish stage")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="ask Gradio for a public share link (off by default)")
    p.add_argument("--chat-template", help="a Jinja chat template file for models whose processor has none; "
                                           "without one such a model is refused at start")
    return parser
