"""Questions of the shapes world: VQAv2-style questions with 10 noisy annotator answers and
GQA-style relational questions with structural / semantic / detailed types.

Each generator takes a scene and a seeded RNG and returns one item, or None when the scene
cannot support that kind of question (e.g. no object can be named uniquely).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from data.shapes_scene import (
    COLOURS,
    MAX_OBJECTS,
    PLURALS,
    POSITIONS,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    holds,
)
from data.shapes_text import NUMBER_WORDS, capitalise, describe, fill, refer, with_article

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

# --- GQA templates: question, then the full answer(s) ----------------------------------------------

REL_QUERY_COLOUR = ("What color is the {subject} {relation} the {anchor}?", "The {subject} {relation} the {anchor} is {answer}.")
REL_QUERY_SHAPE = ("Which shape is {relation} the {anchor}?", "The shape {relation} the {anchor} is {answer}.")
REL_VERIFY = ("Is the {a} {relation} the {b}?", "Yes, the {a} is {relation} the {b}.", "No, the {a} is not {relation} the {b}.")
LOGIC_AND = ("Are there both {x} and {y}?", "Yes, there are both {x} and {y}.", "No, there is no {missing}.")
LOGIC_OR = ("Is there {x} or {y}?", "Yes, there is {present}.", "No, there is neither {x} nor {y}.")
SAME_ATTR = ("Are the {a} and the {b} the same {attr}?", "Yes, they are both {value}.", "No, the {a} is {va} and the {b} is {vb}.")
CHOOSE_HORIZONTAL = ("Is the {a} to the left or to the right of the {b}?", "The {a} is {relation} the {b}.")
CHOOSE_VERTICAL = ("Is the {a} above or below the {b}?", "The {a} is {relation} the {b}.")
CHOOSE_ATTR = ("Is the {a} {x} or {y}?", "The {a} is {answer}.")
VERIFY_ATTR = ("Is the {a} {value}?", "Yes, the {a} is {value}.", "No, the {a} is {actual}.")
GQA_TEMPLATES = (REL_QUERY_COLOUR + REL_QUERY_SHAPE + REL_VERIFY + LOGIC_AND + LOGIC_OR + SAME_ATTR
                 + CHOOSE_HORIZONTAL + CHOOSE_VERTICAL + CHOOSE_ATTR + VERIFY_ATTR)
GQA_EXTRA_WORDS = ("color",)  # the {attr} slot of SAME_ATTR


@dataclass(frozen=True)
class VqaItem:
    question: str
    answer: str
    question_type: str
    answer_type: str  # "yes/no" | "number" | "other"
    kind: str  # colour | shape | count | exist | position


@dataclass(frozen=True)
class GqaItem:
    question: str
    answer: str
    full_answer: str
    structural: str  # query | verify | logical | compare | choose
    semantic: str  # rel | attr | obj
    detailed: str


def plural(phrase: str) -> str:
    words = phrase.split()
    words[-1] = PLURALS.get(words[-1], words[-1] + "s")
    return " ".join(words)


def _named(scene: Scene, rng: random.Random, exclude: tuple[str, ...] = ()) -> list[tuple[ShapeObject, str]]:
    """Objects that can be named uniquely (without `exclude`), with their names, in random order."""
    named = [(o, refer(o, scene, exclude)) for o in scene.objects]
    named = [(o, name) for o, name in named if name is not None]
    rng.shuffle(named)
    return named


def _absent_variant(scene: Scene, rng: random.Random, attrs: tuple[str, ...]) -> ShapeObject | None:
    """An object description (on `attrs`) that matches nothing in the scene."""
    for _ in range(30):
        fake = replace(scene.objects[0], shape=rng.choice(SHAPES), colour=rng.choice(sorted(COLOURS)),
                       size=rng.choice(SIZES))
        if scene.count(**{a: fake.attribute(a) for a in attrs}) == 0:
            return fake
    return None


# --- VQAv2 generators -------------------------------------------------------------------------------


def _vqa_colour(scene: Scene, rng: random.Random) -> VqaItem | None:
    named = _named(scene, rng, exclude=("colour",))
    if not named:
        return None
    obj, ref = named[0]
    template, qtype = rng.choice(COLOUR_QUESTIONS)
    return VqaItem(fill(template, ref=ref), obj.colour, qtype, "other", "colour")


def _vqa_shape(scene: Scene, rng: random.Random) -> VqaItem | None:
    named = _named(scene, rng, exclude=("shape",))
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
    target = _absent_variant(scene, rng, attrs) if rng.random() < 0.5 else None
    answer = "no" if target is not None else "yes"
    target = target or rng.choice(scene.objects)
    thing = describe(target, attrs)
    template, qtype = rng.choice(EXIST_QUESTIONS)
    return VqaItem(fill(template, thing=with_article(thing), things=plural(thing)), answer, qtype, "yes/no", "exist")


def _vqa_position(scene: Scene, rng: random.Random) -> VqaItem | None:
    named = _named(scene, rng)
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


# --- GQA generators ----------------------------------------------------------------------------------


def _gqa_rel_query(scene: Scene, rng: random.Random) -> GqaItem | None:
    for anchor, anchor_ref in _named(scene, rng):
        for relation in rng.sample(RELATIONS, len(RELATIONS)):
            targets = [o for o in scene.objects if o is not anchor and holds(relation, o, anchor)]
            if len(targets) != 1:
                continue
            target, phrase = targets[0], RELATION_PHRASES[relation]
            if rng.random() < 0.5:
                subject = rng.choice(("shape", "object"))
                q, full = REL_QUERY_COLOUR
                slots = {"subject": subject, "relation": phrase, "anchor": anchor_ref}
                return GqaItem(fill(q, **slots), target.colour, fill(full, answer=target.colour, **slots),
                               "query", "rel", "relColor")
            q, full = REL_QUERY_SHAPE
            slots = {"relation": phrase, "anchor": anchor_ref}
            return GqaItem(fill(q, **slots), target.shape, fill(full, answer=with_article(target.shape), **slots),
                           "query", "rel", "relShape")
    return None


def _two_named(scene: Scene, rng: random.Random, exclude: tuple[str, ...] = ()):
    named = _named(scene, rng, exclude)
    return named[:2] if len(named) >= 2 else None


def _gqa_rel_verify(scene: Scene, rng: random.Random) -> GqaItem | None:
    pair = _two_named(scene, rng)
    if pair is None:
        return None
    (a, ra), (b, rb) = pair
    true = [r for r in RELATIONS if holds(r, a, b)]
    false = [r for r in RELATIONS if not holds(r, a, b)]
    answer = "yes" if rng.random() < 0.5 else "no"
    relation = RELATION_PHRASES[rng.choice(true if answer == "yes" else false)]
    q, yes, no = REL_VERIFY
    slots = {"a": ra, "b": rb, "relation": relation}
    return GqaItem(fill(q, **slots), answer, fill(yes if answer == "yes" else no, **slots), "verify", "rel", "relVerify")


def _gqa_logic(scene: Scene, rng: random.Random) -> GqaItem | None:
    attrs = ("colour", "shape")
    present = list(dict.fromkeys(describe(o, attrs) for o in scene.objects))
    absent_obj = _absent_variant(scene, rng, attrs)
    if absent_obj is None:
        return None
    absent = describe(absent_obj, attrs)
    if rng.random() < 0.5:  # and
        q, yes, no = LOGIC_AND
        if len(present) >= 2 and rng.random() < 0.5:
            x, y = rng.sample(present, 2)
            answer, full = "yes", fill(yes, x=with_article(x), y=with_article(y))
        else:
            x, y = rng.sample([rng.choice(present), absent], 2)
            answer, full = "no", fill(no, missing=absent)
        return GqaItem(fill(q, x=with_article(x), y=with_article(y)), answer, full, "logical", "obj", "logicAnd")
    q, yes, no = LOGIC_OR
    other = _absent_variant(scene, rng, attrs)
    if rng.random() < 0.5 or other is None or describe(other, attrs) == absent:
        x, y = rng.sample([rng.choice(present), absent], 2)
        found = x if x in present else y
        answer, full = "yes", fill(yes, present=with_article(found))
    else:
        x, y = absent, describe(other, attrs)
        answer, full = "no", fill(no, x=with_article(x), y=with_article(y))
    return GqaItem(fill(q, x=with_article(x), y=with_article(y)), answer, full, "logical", "obj", "logicOr")


def _gqa_same(scene: Scene, rng: random.Random) -> GqaItem | None:
    attr = rng.choice(("colour", "shape"))
    pair = _two_named(scene, rng, exclude=(attr,))
    if pair is None:
        return None
    (a, ra), (b, rb) = pair
    va, vb = a.attribute(attr), b.attribute(attr)
    q, yes, no = SAME_ATTR
    slots = {"a": ra, "b": rb}
    if va == vb:
        answer, full = "yes", fill(yes, value=va if attr == "colour" else PLURALS[va])
    else:
        if attr == "shape":
            va, vb = with_article(va), with_article(vb)
        answer, full = "no", fill(no, va=va, vb=vb, **slots)
    question = fill(q, attr="color" if attr == "colour" else "shape", **slots)
    return GqaItem(question, answer, full, "compare", "attr", "sameColor" if attr == "colour" else "sameShape")


def _gqa_choose_rel(scene: Scene, rng: random.Random) -> GqaItem | None:
    pair = _two_named(scene, rng)
    if pair is None:
        return None
    (a, ra), (b, rb) = pair
    axes = ([CHOOSE_HORIZONTAL] if a.col != b.col else []) + ([CHOOSE_VERTICAL] if a.row != b.row else [])
    q, full = rng.choice(axes)
    relation = next(r for r in (RELATIONS[:2] if q == CHOOSE_HORIZONTAL[0] else RELATIONS[2:]) if holds(r, a, b))
    return GqaItem(fill(q, a=ra, b=rb), relation, fill(full, a=ra, b=rb, relation=RELATION_PHRASES[relation]),
                   "choose", "rel", "relChooser")


def _gqa_attr(scene: Scene, rng: random.Random, choose: bool) -> GqaItem | None:
    attr = rng.choice(("colour", "shape"))
    named = _named(scene, rng, exclude=(attr,))
    if not named:
        return None
    obj, ref = named[0]
    pool = sorted(COLOURS) if attr == "colour" else list(SHAPES)
    value = obj.attribute(attr)
    other = rng.choice([v for v in pool if v != value])
    def spoken(v: str) -> str:
        return v if attr == "colour" else with_article(v)
    if choose:
        x, y = rng.sample([value, other], 2)
        q, full = CHOOSE_ATTR
        return GqaItem(fill(q, a=ref, x=spoken(x), y=spoken(y)), value, fill(full, a=ref, answer=spoken(value)),
                       "choose", "attr", "chooseAttr")
    asked = value if rng.random() < 0.5 else other
    q, yes, no = VERIFY_ATTR
    answer = "yes" if asked == value else "no"
    full = fill(yes, a=ref, value=spoken(value)) if answer == "yes" else fill(no, a=ref, actual=spoken(value))
    return GqaItem(fill(q, a=ref, value=spoken(asked)), answer, full, "verify", "attr", "verifyAttr")


GQA_KINDS: dict[str, Callable[[Scene, random.Random], GqaItem | None]] = {
    "relQuery": _gqa_rel_query, "relVerify": _gqa_rel_verify, "logic": _gqa_logic, "same": _gqa_same,
    "relChoose": _gqa_choose_rel,
    "chooseAttr": lambda s, r: _gqa_attr(s, r, choose=True),
    "verifyAttr": lambda s, r: _gqa_attr(s, r, choose=False),
}
RELATIONAL_GQA_KINDS = ("relQuery", "relVerify", "same", "relChoose")
BASE_GQA_KINDS = ("chooseAttr", "verifyAttr")


def gqa_items(scene: Scene, rng: random.Random, max_items: int = 4,
              kinds: tuple[str, ...] = tuple(GQA_KINDS)) -> list[GqaItem]:
    """Up to `max_items` questions of different kinds, relational ones first when possible."""
    relational = [k for k in kinds if k in RELATIONAL_GQA_KINDS]
    other = [k for k in kinds if k not in RELATIONAL_GQA_KINDS]
    rng.shuffle(relational)
    rng.shuffle(other)
    items = []
    for kind in relational + other:
        item = GQA_KINDS[kind](scene, rng)
        if item is not None:
            items.append(item)
        if len(items) == max_items:
            break
    return items
