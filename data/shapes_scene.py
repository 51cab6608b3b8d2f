"""Scenes of the shapes world: objects on a 3x3 grid, sampled from a seeded RNG and drawn with PIL.

A scene is pure data (`Scene`, `ShapeObject`); `render_scene` turns it into image bytes.
Images are drawn at 4x resolution and box-reduced, which anti-aliases edges cheaply, and
encoded with fixed writer parameters (no timestamps, no metadata) so that equal scenes
give byte-identical files.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses",
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 85, 225),
    "yellow": (245, 210, 35),
    "purple": (145, 60, 190),
    "orange": (250, 135, 20),
}
BACKGROUND = (118, 118, 118)
BACKGROUND_NAME = "gray"
SIZES: tuple[str, ...] = ("small", "large")
# Half-extent of an object as a fraction of half a grid cell, per size class.
SIZE_SCALE: dict[str, tuple[float, float]] = {"small": (0.48, 0.58), "large": (0.82, 0.95)}

# (row, col) -> short position name; rows go top to bottom, columns left to right.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
# Position phrase as it reads in a sentence ("a red circle in the top left corner").
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
SUPERSAMPLE = 4
MAX_OBJECTS = 4


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int
    scale: float  # half-extent / half-cell, within SIZE_SCALE[size]
    dx: float  # centre offset inside the cell, in [-1, 1] of the free margin
    dy: float

    @property
    def position(self) -> str:
        return POSITIONS[(self.row, self.col)]

    def attribute(self, name: str) -> str:
        return {"shape": self.shape, "colour": self.colour, "size": self.size}[name]


@dataclass(frozen=True)
class Scene:
    image_id: int
    split: str
    objects: tuple[ShapeObject, ...]  # in reading order (row, then column)

    def count(self, **attrs: str) -> int:
        return sum(all(o.attribute(k) == v for k, v in attrs.items()) for o in self.objects)


# --- relations (strict grid order: objects in the same column are neither left nor right) ---

RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
RELATION_PHRASES: dict[str, str] = {
    "left": "to the left of", "right": "to the right of", "above": "above", "below": "below",
}
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}


def holds(relation: str, a: ShapeObject, b: ShapeObject) -> bool:
    """Is `a` <relation> `b`? ("left": a is to the left of b)."""
    if relation == "left":
        return a.col < b.col
    if relation == "right":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise ValueError(f"unknown relation {relation!r}")


# --- sampling ---------------------------------------------------------------------------------


def sample_scene(rng: random.Random, image_id: int, split: str, num_objects: int) -> Scene:
    if not 1 <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in 1..{MAX_OBJECTS}, got {num_objects}")
    cells = sorted(rng.sample(range(9), num_objects))
    objects = []
    for cell in cells:
        size = rng.choice(SIZES)
        low, high = SIZE_SCALE[size]
        objects.append(ShapeObject(
            shape=rng.choice(SHAPES), colour=rng.choice(sorted(COLOURS)), size=size,
            row=cell // 3, col=cell % 3, scale=round(rng.uniform(low, high), 4),
            dx=round(rng.uniform(-1, 1), 4), dy=round(rng.uniform(-1, 1), 4),
        ))
    return Scene(image_id=image_id, split=split, objects=tuple(objects))


def absent_variant(scene: Scene, rng: random.Random, attrs: tuple[str, ...]) -> ShapeObject | None:
    """An object description (on `attrs`) that matches nothing in the scene."""
    for _ in range(30):
        fake = replace(scene.objects[0], shape=rng.choice(SHAPES), colour=rng.choice(sorted(COLOURS)),
                       size=rng.choice(SIZES))
        if scene.count(**{a: fake.attribute(a) for a in attrs}) == 0:
            return fake
    return None


# --- drawing ----------------------------------------------------------------------------------


def object_box(obj: ShapeObject, size: int) -> tuple[float, float, float]:
    """Centre (x, y) and half-extent r of an object in an image of side `size`, in pixels."""
    half_cell = size / 6
    r = obj.scale * half_cell
    margin = (half_cell - r) * 0.8
    cx = (2 * obj.col + 1) * half_cell + obj.dx * margin
    cy = (2 * obj.row + 1) * half_cell + obj.dy * margin
    return cx, cy, r


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, size: int) -> None:
    cx, cy, r = object_box(obj, size)
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        s = 0.82 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=fill)
    elif obj.shape == "cross":
        w = 0.33 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def draw_scene(scene: Scene, size: int) -> Image.Image:
    """The scene as an RGB image of side `size` (drawn at 4x, box-reduced: anti-aliased)."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, big)
    return image.reduce(SUPERSAMPLE)


def encode_image(image: Image.Image, image_format: str) -> bytes:
    """Encode with fixed parameters and no metadata, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", optimize=False, compress_level=6)
    elif image_format in ("jpg", "jpeg"):
        image.save(buffer, format="JPEG", quality=92, subsampling=0, optimize=False, progressive=False)
    else:
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    return buffer.getvalue()


def render_scene(scene: Scene, size: int, image_format: str) -> bytes:
    return encode_image(draw_scene(scene, size), image_format)


def largest_object(scene: Scene) -> ShapeObject | None:
    """The single large object when exactly one exists (a single object always qualifies).

    The classification view needs an unambiguous label; scenes with several large objects
    (or none, besides single-object scenes) have no well-defined largest one and are skipped.
    """
    if len(scene.objects) == 1:
        return scene.objects[0]
    large = [o for o in scene.objects if o.size == "large"]
    return large[0] if len(large) == 1 else None
