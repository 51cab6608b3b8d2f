"""The synthetic shapes world, written in the official COCO captions / VQAv2 / GQA formats.

`write_shapes_world(out, seed, num_images, size)` draws `num_images` images of 1-4 objects
(shape, colour, size, cell of a 3x3 grid; one object per cell) and writes:

    out/summary.json                                   counts per split and file (no absolute paths)
    out/images/{split}/{image_id:012d}.{png|jpg}
    out/annotations/captions_{split}.json              COCO captions: 5 captions per image
    out/annotations/vqav2_{split}_questions.json       VQAv2 questions
    out/annotations/vqav2_{split}_annotations.json     VQAv2 annotations: 10 answers each
    out/annotations/gqa_{split}_questions.json         GQA questions (dict keyed by question id)
    out/annotations/gqa_{split}_scene_graphs.json      GQA scene graphs (ground truth objects)
    out/classification/{split}/{shape}/{image_id:012d}.{png|jpg}   one folder per class

Splits: "base" (single objects; captions and questions about shape and colour only: what the
tiny base model is pretrained on) and "train" / "val" / "test" (1-4 objects; captions and
questions about count, size, position and relations too). Image ids run from 1 over all
splits in that order, so they are unique across splits; question ids are image_id * 1000 + k.
GQA `imageId` is str(image_id). The classification view keeps images with one unambiguous
largest object (the single object, or the only large one); its class is that object's shape.

Everything is a function of (seed, num_images, size, image_format): the same arguments give
byte-identical files. The world is written to a temporary sibling directory and renamed
into place when complete.
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path

from data import prompts
from data.errors import DataError
from data.files import json_bytes, replace_directory, staging_dir
from data.shapes_gqa import BASE_GQA_KINDS, GQA_EXTRA_WORDS, GQA_TEMPLATES, gqa_items
from data.shapes_scene import (
    BACKGROUND_NAME,
    COLOURS,
    PLURALS,
    POSITION_PHRASES,
    POSITIONS,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    holds,
    largest_object,
    object_box,
    render_scene,
    sample_scene,
)
from data.shapes_text import (
    CAPTION_TEMPLATES,
    CONNECTIVES,
    NOUNS,
    NUMBER_WORDS,
    base_captions,
    scene_captions,
    template_tokens,
    tokens,
)
from data.shapes_vqa import (
    BASE_VQA_KINDS,
    POSITION_SYNONYMS,
    VQA_TEMPLATES,
    YES_NO_VARIANTS,
    annotator_answers,
    most_common_answer,
    vqa_items,
)

SPLITS: tuple[str, ...] = ("base", "train", "val", "test")
# base: 20% of the images; the other 80% split 70 / 15 / 15.
SPLIT_FRACTIONS: dict[str, float] = {"base": 0.2, "train": 0.56, "val": 0.12, "test": 0.12}
SUMMARY_NAME = "summary.json"
WORLD_VERSION = 1

INFO = {
    "description": "StructLoRA-VLM synthetic shapes world",
    "contributor": "structlora-vlm",
    "version": str(WORLD_VERSION),
    "year": 2026,
    "url": "",
}
LICENSE = {"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}


def split_counts(num_images: int, fractions: dict[str, float] = SPLIT_FRACTIONS) -> dict[str, int]:
    """Images per split: largest-remainder rounding of the fractions, at least one each."""
    if num_images < len(fractions):
        raise DataError(f"--images must be at least {len(fractions)} (one per split), got {num_images}")
    raw = {s: num_images * f / sum(fractions.values()) for s, f in fractions.items()}
    counts = {s: max(1, int(v)) for s, v in raw.items()}
    by_remainder = sorted(fractions, key=lambda s: (-(raw[s] - int(raw[s])), list(fractions).index(s)))
    i = 0
    while sum(counts.values()) != num_images:
        split = by_remainder[i % len(by_remainder)]
        step = 1 if sum(counts.values()) < num_images else -1
        if counts[split] + step >= 1:
            counts[split] += step
        i += 1
    return counts


def world_vocabulary() -> list[str]:
    """Every token (see `data.shapes_text.tokens`) that captions, questions and answers can contain,
    plus the task prompts of `data.prompts`, sorted."""
    words: set[str] = set()
    for template in CAPTION_TEMPLATES + tuple(t for t, _ in VQA_TEMPLATES) + GQA_TEMPLATES:
        words.update(template_tokens(template))
    domain = (
        SHAPES + tuple(PLURALS.values()) + tuple(COLOURS) + SIZES + tuple(POSITIONS.values())
        + tuple(POSITION_PHRASES.values()) + RELATIONS + tuple(RELATION_PHRASES.values()) + NUMBER_WORDS
        + tuple(str(n) for n in range(len(NUMBER_WORDS))) + ("yes", "no") + tuple(POSITION_SYNONYMS.values())
        + tuple(v for pair in YES_NO_VARIANTS.values() for v in pair) + NOUNS + CONNECTIVES
        + GQA_EXTRA_WORDS + (BACKGROUND_NAME, prompts.CAPTION_PROMPT, prompts.SHORT_ANSWER_POSTPROMPT)
    )
    for phrase in domain:
        words.update(tokens(phrase))
    return sorted(words)


def _scene_graph(scene: Scene, size: int) -> dict:
    """GQA sceneGraphs entry: objects with a pixel box, attributes and relations by object id."""
    ids = [f"{scene.image_id}{k}" for k in range(len(scene.objects))]
    objects = {}
    for obj_id, obj in zip(ids, scene.objects):
        cx, cy, r = object_box(obj, size)
        relations = [{"name": RELATION_PHRASES[rel], "object": other_id}
                     for other_id, other in zip(ids, scene.objects) if other is not obj
                     for rel in RELATIONS if holds(rel, obj, other)]
        objects[obj_id] = {
            "name": obj.shape, "attributes": [obj.colour, obj.size], "relations": relations,
            "x": int(cx - r), "y": int(cy - r), "w": int(2 * r), "h": int(2 * r),
            "cell": [obj.row, obj.col], "position": obj.position,
        }
    return {"width": size, "height": size, "objects": objects}


class _SplitWriter:
    """Accumulates one split's annotations while its images are drawn."""

    def __init__(self, split: str, seed: int, size: int, image_format: str):
        self.split, self.seed, self.size, self.ext = split, seed, size, image_format
        self.images: list[dict] = []
        self.captions: list[dict] = []
        self.questions: list[dict] = []
        self.answers: list[dict] = []
        self.gqa: dict[str, dict] = {}
        self.scene_graphs: dict[str, dict] = {}
        self.classes: Counter[str] = Counter()

    def add(self, image_id: int, root: Path) -> None:
        base = self.split == "base"
        scene_rng = random.Random(f"shapes/{self.seed}/{image_id}/scene")
        text_rng = random.Random(f"shapes/{self.seed}/{image_id}/text")
        scene = sample_scene(scene_rng, image_id, self.split, 1 if base else scene_rng.randint(1, 4))
        file_name = f"{image_id:012d}.{self.ext}"
        data = render_scene(scene, self.size, self.ext)
        (root / "images" / self.split / file_name).write_bytes(data)
        largest = largest_object(scene)
        if largest is not None:
            class_dir = root / "classification" / self.split / largest.shape
            class_dir.mkdir(parents=True, exist_ok=True)
            (class_dir / file_name).write_bytes(data)
            self.classes[largest.shape] += 1

        self.images.append({"id": image_id, "file_name": file_name, "height": self.size, "width": self.size,
                            "license": LICENSE["id"]})
        captions = base_captions(scene, text_rng) if base else scene_captions(scene, text_rng)
        self.captions.extend({"id": image_id * 10 + k, "image_id": image_id, "caption": c}
                             for k, c in enumerate(captions))
        vqa = vqa_items(scene, text_rng, BASE_VQA_KINDS) if base else vqa_items(scene, text_rng)
        for k, item in enumerate(vqa):
            qid = image_id * 1000 + k
            answers = annotator_answers(item, text_rng)
            self.questions.append({"image_id": image_id, "question": item.question, "question_id": qid})
            self.answers.append({
                "question_id": qid, "image_id": image_id, "question_type": item.question_type,
                "answer_type": item.answer_type, "answers": answers,
                "multiple_choice_answer": most_common_answer([a["answer"] for a in answers]),
            })
        gqa = gqa_items(scene, text_rng, 2, BASE_GQA_KINDS) if base else gqa_items(scene, text_rng, 4)
        for k, item in enumerate(gqa):
            qid = str(image_id * 1000 + k)
            self.gqa[qid] = {
                "imageId": str(image_id), "question": item.question, "answer": item.answer,
                "fullAnswer": item.full_answer, "isBalanced": False,
                "types": {"structural": item.structural, "semantic": item.semantic, "detailed": item.detailed},
                "groups": {"global": None, "local": item.detailed}, "entailed": [], "equivalent": [qid],
                "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
            }
        self.scene_graphs[str(image_id)] = _scene_graph(scene, self.size)

    def balance_gqa(self) -> None:
        """Mark a balanced subset (GQA's `isBalanced`): per detailed type, each answer is kept at
        most as often as a uniform answer distribution would allow, first questions first."""
        by_type: dict[str, list[str]] = {}
        for qid in sorted(self.gqa, key=int):
            by_type.setdefault(self.gqa[qid]["types"]["detailed"], []).append(qid)
        for qids in by_type.values():
            answers = Counter(self.gqa[q]["answer"] for q in qids)
            cap = -(-len(qids) // len(answers))
            cap = min(cap, max(1, min(answers.values()) * 2)) if len(answers) > 1 else cap
            seen: Counter[str] = Counter()
            for q in qids:
                answer = self.gqa[q]["answer"]
                seen[answer] += 1
                self.gqa[q]["isBalanced"] = seen[answer] <= cap

    def documents(self) -> dict[str, object]:
        """File name (under annotations/) -> JSON document."""
        s = self.split
        vqa_head = {"info": INFO, "data_type": "shapes", "data_subtype": s, "license": LICENSE}
        return {
            f"captions_{s}.json": {"info": INFO, "licenses": [LICENSE], "images": self.images,
                                   "annotations": self.captions},
            f"vqav2_{s}_questions.json": {**vqa_head, "task_type": "Open-Ended", "questions": self.questions},
            f"vqav2_{s}_annotations.json": {**vqa_head, "annotations": self.answers},
            f"gqa_{s}_questions.json": self.gqa,
            f"gqa_{s}_scene_graphs.json": self.scene_graphs,
        }

    def counts(self) -> dict[str, object]:
        return {
            "images": len(self.images), "captions": len(self.captions), "vqav2_questions": len(self.questions),
            "gqa_questions": len(self.gqa), "gqa_balanced": sum(q["isBalanced"] for q in self.gqa.values()),
            "classification_images": sum(self.classes.values()), "classes": dict(sorted(self.classes.items())),
            "first_image_id": self.images[0]["id"] if self.images else None,
        }


def write_shapes_world(out: Path, seed: int, num_images: int, size: int, image_format: str = "png") -> dict:
    """Generate the shapes world into `out` (layout in the module docstring); return its summary.

    The returned summary is the content of out/summary.json plus the absolute output path.
    """
    out = Path(out)
    image_format = {"jpeg": "jpg"}.get(image_format, image_format)
    if image_format not in ("png", "jpg"):
        raise DataError(f"image format must be 'png' or 'jpg', got {image_format!r}")
    if size < 24:
        raise DataError(f"image size must be at least 24 pixels, got {size}")
    counts = split_counts(num_images)
    staging = staging_dir(out)
    summary: dict = {"generator": "structlora shapes world", "version": WORLD_VERSION, "seed": seed,
                     "size": size, "image_format": image_format, "num_images": num_images,
                     "splits": {}, "files": {}}
    try:
        next_id = 1
        for split in SPLITS:
            (staging / "images" / split).mkdir(parents=True)
            (staging / "classification" / split).mkdir(parents=True)
            writer = _SplitWriter(split, seed, size, image_format)
            for image_id in range(next_id, next_id + counts[split]):
                writer.add(image_id, staging)
            next_id += counts[split]
            writer.balance_gqa()
            (staging / "annotations").mkdir(exist_ok=True)
            names = {}
            for name, document in writer.documents().items():
                (staging / "annotations" / name).write_bytes(json_bytes(document, indent=None))
                names[name.replace(f"_{split}", "").removesuffix(".json")] = f"annotations/{name}"
            summary["splits"][split] = writer.counts()
            summary["files"][split] = {"images": f"images/{split}", "classification": f"classification/{split}",
                                       **names}
        (staging / SUMMARY_NAME).write_bytes(json_bytes(summary))
        replace_directory(staging, out, SUMMARY_NAME)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**summary, "out": str(out.resolve())}
