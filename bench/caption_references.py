"""What each training-reference rule (`data.caption_reference`) can score at best: every image's chosen reference,
used as the caption, scored with the official CIDEr-D (pycocoevalcap) against the image's OTHER references
(leave-one-out: a reference scored against itself would say nothing). A model trained on a rule learns to write
that rule's reference at best, so this is the ceiling the rule puts on the caption score.

    python bench/caption_references.py runs/tiny                 # a run (or its prepare/world) on the shapes world
    python bench/caption_references.py path/to/captions_val.json  # any COCO captions file

Prints one line per rule (and writes a JSON with --out)."""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def references(path: Path, split: str) -> dict:
    """image_id -> captions of a COCO captions file, or of a run's shapes world (`{split}` split)."""
    if path.is_dir():
        for candidate in (path / "prepare" / "world" / "annotations", path / "world" / "annotations", path):
            if (candidate / f"captions_{split}.json").is_file():
                path = candidate / f"captions_{split}.json"
                break
        else:
            raise SystemExit(f"{path}: no captions_{split}.json under prepare/world/annotations, world/annotations "
                             "or the folder itself")
    refs: dict = defaultdict(list)
    for ann in json.loads(path.read_text())["annotations"]:
        refs[ann["image_id"]].append(ann["caption"])
    return dict(refs)


def ceilings(refs: dict, seed: int = 0) -> dict[str, dict[str, float]]:
    from data.collate import conversation
    from eval.caption_metrics import score_captions

    out = {}
    for rule in ("random", "longest", "consensus"):
        rng = random.Random(seed)
        chosen, others = {}, {}
        for image_id, captions in refs.items():
            if len(captions) < 2:
                continue
            _, answer = conversation({"task": "caption", "captions": captions}, rng, rule)
            chosen[image_id] = answer
            rest = list(captions)
            rest.remove(answer)
            others[image_id] = rest
        scores = score_captions(others, chosen, metrics=["CIDEr", "Bleu_4", "METEOR", "ROUGE_L"])["metrics"]
        out[rule] = {k: round(float(v), 4) for k, v in scores.items()} | {
            "mean_words": round(sum(len(c.split()) for c in chosen.values()) / len(chosen), 2), "images": len(chosen)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a run directory, a prepared world or a COCO captions json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    found = ceilings(references(args.source, args.split))
    for rule, scores in found.items():
        print(f"{rule:10s} CIDEr-D {scores['CIDEr']:.3f}  BLEU-4 {scores['Bleu_4']:.3f}  METEOR {scores['METEOR']:.3f}  "
              f"ROUGE-L {scores['ROUGE_L']:.3f}  {scores['mean_words']:.1f} words  ({scores['images']} images)")
    if args.out:
        args.out.write_text(json.dumps({"source": str(args.source), "split": args.split, "rules": found}, indent=1))


if __name__ == "__main__":
    main()
