"""Captions of the shapes world and the helpers every text generator shares.

Every sentence comes from a template constant in this module, in `data.shapes_vqa` or in
`data.shapes_gqa`, and every slot is filled from a closed word list, which is what lets
`world_vocabulary()` list every token the world can emit without generating anything.
"""

from __future__ import annotations

import random
import re

from data.shapes_scene import (
    BACKGROUND_NAME,
    PLURALS,
    POSITION_PHRASES,
    RELATION_PHRASES,
    RELATIONS,
    Scene,
    ShapeObject,
    holds,
)

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_SLOT_RE = re.compile(r"\{\w+\}")

# Referring expressions, shortest first: an object is named by the first attribute set that
# picks it out uniquely in its scene.
REFERRING_ATTRS: tuple[tuple[str, ...], ...] = (
    ("shape",), ("colour",), ("size",), ("colour", "shape"), ("size", "shape"), ("size", "colour"),
    ("size", "colour", "shape"),
)

# --- caption templates (slots: be, count, noun, items, a, b, relation, obj, groups, colours, background) ---

COUNT_CAPTIONS = (
    "There {be} {count} {noun} in the image.",
    "{count} {noun} on a {background} background.",
    "A picture of {count} {noun}.",
    "An image containing {count} {noun}.",
)
INVENTORY_CAPTIONS = ("{items}.", "The image shows {items}.", "In this picture we can see {items}.")
POSITION_CAPTIONS = ("{items}.", "The image shows {items}.", "From top to bottom: {items}.")
RELATION_CAPTIONS = ("{a} is {relation} {b}.", "There is {a} {relation} {b}.", "{a} can be seen {relation} {b}.")
SINGLE_CAPTIONS = ("{a} and nothing else.", "Only {a} on a {background} background.", "A single {obj} {position}.")
GROUP_CAPTIONS = ("{groups}.", "{groups} on a {background} background.", "The image contains {groups}.")
COLOUR_CAPTIONS = ("The {noun} {be} {colours}.", "{colours} {noun} on a {background} background.")
BASE_CAPTIONS = (
    "{a}.", "There is {a} in the image.", "{a} on a {background} background.", "A picture of {a}.",
    "The image shows {a}.", "A single {obj}.", "Only one {obj} is visible.",
)
CAPTION_TEMPLATES = (
    COUNT_CAPTIONS + INVENTORY_CAPTIONS + POSITION_CAPTIONS + RELATION_CAPTIONS + SINGLE_CAPTIONS
    + GROUP_CAPTIONS + COLOUR_CAPTIONS + BASE_CAPTIONS
)
NOUNS = ("shape", "shapes", "object", "objects")
CONNECTIVES = ("a", "an", "and", ",", "is", "are")


# --- small text helpers -------------------------------------------------------------------------


def tokens(text: str) -> list[str]:
    """The tokenisation the vocabulary is defined by: lower-case, words and single punctuation."""
    return TOKEN_RE.findall(text.lower())


def template_tokens(template: str) -> list[str]:
    return tokens(_SLOT_RE.sub(" ", template))


def article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def plural(phrase: str) -> str:
    words = phrase.split()
    words[-1] = PLURALS.get(words[-1], words[-1] + "s")
    return " ".join(words)


def describe(obj: ShapeObject, attrs: tuple[str, ...] = ("size", "colour", "shape")) -> str:
    """'large red circle'; without 'shape' in attrs the noun is 'object' ('small red object')."""
    words = [obj.attribute(name) for name in ("size", "colour") if name in attrs]
    words.append(obj.shape if "shape" in attrs else "object")
    return " ".join(words)


def refer(obj: ShapeObject, scene: Scene, exclude: tuple[str, ...] = ()) -> str | None:
    """Shortest description naming `obj` uniquely in `scene` without the excluded attributes."""
    for attrs in REFERRING_ATTRS:
        if any(name in exclude for name in attrs):
            continue
        if scene.count(**{name: obj.attribute(name) for name in attrs}) == 1:
            return describe(obj, attrs)
    return None


def named_objects(scene: Scene, rng: random.Random, exclude: tuple[str, ...] = ()) -> list[tuple[ShapeObject, str]]:
    """Objects that can be named uniquely (without `exclude`), with their names, in random order."""
    named = [(o, refer(o, scene, exclude)) for o in scene.objects]
    named = [(o, name) for o, name in named if name is not None]
    rng.shuffle(named)
    return named


def fill(template: str, **slots: str) -> str:
    return capitalise(template.format(background=BACKGROUND_NAME, **slots))


# --- captions -----------------------------------------------------------------------------------


def _count_caption(scene: Scene, rng: random.Random) -> str:
    n = len(scene.objects)
    noun = rng.choice(("shape", "object")) + ("" if n == 1 else "s")
    return fill(rng.choice(COUNT_CAPTIONS), be="is" if n == 1 else "are", count=NUMBER_WORDS[n], noun=noun)


def _inventory_caption(scene: Scene, rng: random.Random) -> str:
    items = join_and([with_article(describe(o)) for o in scene.objects])
    return fill(rng.choice(INVENTORY_CAPTIONS), items=items)


def _position_caption(scene: Scene, rng: random.Random) -> str:
    attrs = rng.choice((("colour", "shape"), ("size", "colour", "shape")))
    items = join_and([f"{with_article(describe(o, attrs))} {POSITION_PHRASES[o.position]}" for o in scene.objects])
    # "From top to bottom" needs at least two objects.
    templates = POSITION_CAPTIONS if len(scene.objects) > 1 else POSITION_CAPTIONS[:2]
    return fill(rng.choice(templates), items=items)


def _relation_caption(scene: Scene, rng: random.Random) -> str:
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        return fill(rng.choice(SINGLE_CAPTIONS), a=with_article(describe(obj)), obj=describe(obj),
                    position=POSITION_PHRASES[obj.position])
    a, b = rng.sample(scene.objects, 2)
    relation = rng.choice([r for r in RELATIONS if holds(r, a, b)])
    attrs = rng.choice((("colour", "shape"), ("size", "colour", "shape")))
    return fill(rng.choice(RELATION_CAPTIONS), a=with_article(describe(a, attrs)),
                relation=RELATION_PHRASES[relation], b=with_article(describe(b, attrs)))


def _group_caption(scene: Scene, rng: random.Random) -> str:
    n = len(scene.objects)
    if rng.random() < 0.5:
        shapes = list(dict.fromkeys(o.shape for o in scene.objects))
        groups = []
        for shape in shapes:
            k = scene.count(shape=shape)
            groups.append(f"{NUMBER_WORDS[k]} {shape if k == 1 else PLURALS[shape]}")
        return fill(rng.choice(GROUP_CAPTIONS), groups=join_and(groups))
    colours = join_and(list(dict.fromkeys(o.colour for o in scene.objects)))
    noun = rng.choice(("shape", "object")) + ("" if n == 1 else "s")
    template = COLOUR_CAPTIONS[0] if n == 1 else rng.choice(COLOUR_CAPTIONS)  # "Red shape on ..." lacks an article
    return fill(template, noun=noun, be="is" if n == 1 else "are", colours=colours)


CAPTION_KINDS = (_count_caption, _inventory_caption, _position_caption, _relation_caption, _group_caption)


def scene_captions(scene: Scene, rng: random.Random) -> list[str]:
    """Five true captions of different kinds (count, inventory, positions, relation, groups)."""
    captions = [kind(scene, rng) for kind in CAPTION_KINDS]
    rng.shuffle(captions)
    return captions


def base_captions(scene: Scene, rng: random.Random, count: int = 5) -> list[str]:
    """Captions of a single-object base image: shape and colour only, `count` different wordings."""
    obj = scene.objects[0]
    plain = describe(obj, ("colour", "shape"))
    return [fill(t, a=with_article(plain), obj=plain) for t in rng.sample(BASE_CAPTIONS, count)]
