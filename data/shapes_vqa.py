"""VQAv2-style questions of the shapes world, with 10 noisy annotator answers.

Each generator takes a scene and a seeded RNG and returns one `VqaItem` (colour, shape, count,
exist or position), or None when the scene cannot support that kind of question (e.g. no
object can be named uniquely); `annotator_answers` gives the ten answers of an item, mostly
the truth, sometimes a wrong or differently worded one. GQA-style questions: `data.shapes_gqa`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from data.shapes_scene import COLOURS, MAX_OBJECTS, POSITIONS, SHAPES, Scene, absent_variant
from data.shapes_text import NUMBER_WORDS, capitalise, describe, fill, named_objects, plural, with_article

# --- VQAv2 templates: (question, question_type) ---------------------------------------------------

COLOUR_QUESTIONS = (("What color is the {ref}?", "what color is the"),
                    ("What is the color of the {ref}?", "what is the color of the"))
SHAPE_QUESTIONS = (("What shape is the {ref}?", "what shape is the"), ("Which shape is the {ref}?", "which"))
COUNT_QUESTIONS = (("How many shapes are there?", "how many"), ("How many objects are in the image?", "how many"),
                   ("How many {things} are there?", "how many"), ("How many {things} are in the image?", "how many"))
EXIST_QUESTIONS = (("Is there {thing}?", "is there a"), ("Are there any {things}?", "are there any"))
POSITION_QUESTIONS = (("Where is the {ref}?", "where is the"),
                      ("In which part of the image is the {ref}?", "in which part of the"))
VQA_TEMPLATES = COLOUR_QUESTIONS + SHAPE_QUESTIONS + COUNT_QUESTIONS + EXIST_QUESTIONS + POSITION_QUESTIONS

# Annotator noise: answers given in another wording that means the same thing.
POSITION_SYNONYMS = {"top": "upper", "bottom": "lower", "center": "middle"}
YES_NO_VARIANTS = {"yes": ("Yes", "yeah"), "no": ("No", "nope")}
NOISE_RATE = 0.35  # fraction of questions where 1-2 of the 10 annotators deviate
NUM_ANSWERS = 10


@dataclass(frozen=True)
class VqaItem:
    question: str
    answer: str
    question_type: str
    answer_type: str  # "yes/no" | "number" | "other"
    kind: str  # colour | shape | count | exist | position


# --- VQAv2 generators -------------------------------------------------------------------------------


def _vqa_colour(scene: Scene, rng: random.Random) -> VqaItem | None:
    named = named_objects(scene, rng, exclude=("colour",))
    if not named:
        return None
    obj, ref = named[0]
    template, qtype = rng.choice(COLOUR_QUESTIONS)
    return VqaItem(fill(template, ref=ref), obj.colour, qtype, "other", "colour")


def _vqa_shape(scene: Scene, rng: random.Random) -> VqaItem | None:
    named = named_objects(scene, rng, exclude=("shape",))
    if not named:
        return None
    obj, ref = named[0]
    template, qtype = rng.choice(SHAPE_QUESTIONS)
    return VqaItem(fill(template, ref=ref), obj.shape, qtype, "other", "shape")


def _vqa_count(scene: Scene, rng: random.Random) -> VqaItem | None:
    template, qtype = rng.choice(COUNT_QUESTIONS)
    if "{things}" not in template:
        return VqaItem(fill(template), str(len(scene.objects)), qtype, "number", "count")
    probe = rng.choice(scene.objects)
    if rng.random() < 0.3:  # ask about something that may be absent, so that 0 is a possible answer
        probe = replace(probe, shape=rng.choice(SHAPES), colour=rng.choice(sorted(COLOURS)))
    attrs = rng.choice((("shape",), ("colour",), ("colour", "shape")))
    things = plural(describe(probe, attrs)).replace("objects", "shapes")
    count = scene.count(**{a: probe.attribute(a) for a in attrs})
    return VqaItem(fill(template, things=things), str(count), qtype, "number", "count")


def _vqa_exist(scene: Scene, rng: random.Random) -> VqaItem | None:
    attrs = rng.choice((("shape",), ("colour", "shape"), ("size", "colour", "shape")))
    target = absent_variant(scene, rng, attrs) if rng.random() < 0.5 else None
    answer = "no" if target is not None else "yes"
    target = target or rng.choice(scene.objects)
    thing = describe(target, attrs)
    template, qtype = rng.choice(EXIST_QUESTIONS)
    return VqaItem(fill(template, thing=with_article(thing), things=plural(thing)), answer, qtype, "yes/no", "exist")


def _vqa_position(scene: Scene, rng: random.Random) -> VqaItem | None:
    named = named_objects(scene, rng)
    if not named:
        return None
    obj, ref = named[0]
    template, qtype = rng.choice(POSITION_QUESTIONS)
    return VqaItem(fill(template, ref=ref), obj.position, qtype, "other", "position")


VQA_KINDS: dict[str, Callable[[Scene, random.Random], VqaItem | None]] = {
    "colour": _vqa_colour, "shape": _vqa_shape, "count": _vqa_count, "exist": _vqa_exist,
    "position": _vqa_position,
}
BASE_VQA_KINDS = ("colour", "shape")


def vqa_items(scene: Scene, rng: random.Random, kinds: tuple[str, ...] = tuple(VQA_KINDS)) -> list[VqaItem]:
    """One question of each kind the scene supports."""
    items = [VQA_KINDS[kind](scene, rng) for kind in kinds]
    return [item for item in items if item is not None]


def _wrong_answer(item: VqaItem, rng: random.Random) -> str:
    if item.answer_type == "yes/no":
        return "no" if item.answer == "yes" else "yes"
    if item.answer_type == "number":
        n = int(item.answer)
        return str(rng.choice([m for m in (n - 1, n + 1) if 0 <= m <= MAX_OBJECTS]))
    pool = {"colour": sorted(COLOURS), "shape": SHAPES, "position": tuple(POSITIONS.values())}[item.kind]
    return rng.choice([a for a in pool if a != item.answer])


def _variant_answer(item: VqaItem, rng: random.Random) -> str:
    if item.answer_type == "yes/no":
        return rng.choice(YES_NO_VARIANTS[item.answer])
    if item.answer_type == "number":
        return NUMBER_WORDS[int(item.answer)]
    words = item.answer.split()
    if item.kind == "position" and any(w in POSITION_SYNONYMS for w in words):
        return " ".join(POSITION_SYNONYMS.get(w, w) for w in words)
    return capitalise(item.answer)


def annotator_answers(item: VqaItem, rng: random.Random, noise_rate: float = NOISE_RATE) -> list[dict]:
    """Ten annotator answers: mostly the truth, sometimes 1-2 wrong or differently worded ones."""
    answers = [item.answer] * NUM_ANSWERS
    confidence = ["maybe" if rng.random() < 0.1 else "yes" for _ in range(NUM_ANSWERS)]
    if rng.random() < noise_rate:
        for index in rng.sample(range(NUM_ANSWERS), rng.choice((1, 2))):
            if rng.random() < 0.5:
                answers[index], confidence[index] = _wrong_answer(item, rng), rng.choice(("maybe", "no"))
            else:
                answers[index] = _variant_answer(item, rng)
    return [{"answer": a, "answer_confidence": c, "answer_id": i + 1}
            for i, (a, c) in enumerate(zip(answers, confidence))]


def most_common_answer(answers: list[str]) -> str:
    """The most frequent answer; ties go to the one given first."""
    counts = Counter(answers)
    return max(counts, key=lambda a: (counts[a], -answers.index(a)))
