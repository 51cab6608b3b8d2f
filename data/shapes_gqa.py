"""GQA-style relational questions of the shapes world, with structural / semantic / detailed types.

Each generator takes a scene and a seeded RNG and returns one `GqaItem` (a short answer and
the full-sentence answer), or None when the scene cannot support that kind of question (e.g.
fewer than two objects can be named uniquely). VQAv2-style questions: `data.shapes_vqa`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from data.shapes_scene import (
    COLOURS,
    PLURALS,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    Scene,
    absent_variant,
    holds,
)
from data.shapes_text import describe, fill, named_objects, with_article

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
class GqaItem:
    question: str
    answer: str
    full_answer: str
    structural: str  # query | verify | logical | compare | choose
    semantic: str  # rel | attr | obj
    detailed: str


# --- GQA generators ----------------------------------------------------------------------------------


def _gqa_rel_query(scene: Scene, rng: random.Random) -> GqaItem | None:
    for anchor, anchor_ref in named_objects(scene, rng):
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


def _twonamed_objects(scene: Scene, rng: random.Random, exclude: tuple[str, ...] = ()):
    named = named_objects(scene, rng, exclude)
    return named[:2] if len(named) >= 2 else None


def _gqa_rel_verify(scene: Scene, rng: random.Random) -> GqaItem | None:
    pair = _twonamed_objects(scene, rng)
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
    absent_obj = absent_variant(scene, rng, attrs)
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
    other = absent_variant(scene, rng, attrs)
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
    pair = _twonamed_objects(scene, rng, exclude=(attr,))
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
    pair = _twonamed_objects(scene, rng)
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
    named = named_objects(scene, rng, exclude=(attr,))
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
