"""Procedural VQA scenes for the LLaVA-576 yardstick: several objects, textured backgrounds, short text; seeded.

One scene is a 336 x 336 RGB image (24 x 24 = 576 patches of 14 px) holding 1 to 8 objects of varied shape,
colour and size (from about one patch up to a quarter of the image), non-overlapping, on a procedurally textured
background, and in about half of the scenes a short string (a number or a word) on a plain plate. Every scene is
a pure function of its seed (``random.Random(seed)``; no data files), and its questions are read off the scene's
own object list, so every answer is right by construction.

Question families (short answers, one word or number):

========== ===================================================== ==========================================
family     question                                              answers
========== ===================================================== ==========================================
count      how many red shapes are there? / how many circles...  0 - 8
exist      is there a blue triangle?                             yes, no (balanced per scene)
attribute  what colour is the small triangle?                    a colour (the object is unique by the words)
relation   where is the red circle relative to the blue square?  left, right, above, below (clear-cut only)
position   which quadrant is the green square in?                top-left, top-right, bottom-left, bottom-right
reading    what is written in the image?                         the number or word (scenes with text)
compare    which is bigger, the red circle or the blue square?   the bigger one's shape (sizes differ 2x+)
========== ===================================================== ==========================================

Splits use disjoint seed ranges (:data:`SPLIT_SEEDS`); :func:`chance_rates` gives each family's majority-answer
rate on a set of questions (what always answering the most frequent answer would score).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIZE = 336
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
#: Size classes: (name, smallest side, largest side) in pixels; "large" reaches a quarter of the image (168 px).
SIZES = (("small", 14, 24), ("medium", 36, 60), ("large", 84, 168))
WORDS = ("cat", "dog", "sun", "box", "car", "hat", "map", "pen", "cup", "key")
FAMILIES = ("count", "exist", "attribute", "relation", "position", "reading", "compare")
#: First seed of each split; a split's scene ``i`` has seed ``SPLIT_SEEDS[split] + i`` (ranges never meet).
SPLIT_SEEDS = {"train": 0, "val": 100_000_000, "test": 200_000_000}
MAX_OBJECTS = 8


class SceneObject(NamedTuple):
    """One object: its words and its box ``(x0, y0, x1, y1)`` in pixels."""

    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def side(self) -> int:
        return self.box[2] - self.box[0]


@dataclass(frozen=True)
class Question:
    family: str
    question: str
    answer: str


@dataclass
class Scene:
    """A rendered scene and what is in it."""

    seed: int
    image: Image.Image
    objects: list[SceneObject]
    text: str | None
    text_box: tuple[int, int, int, int] | None


# ----------------------------------------------------------------------------- drawing
def _background(rng: random.Random) -> Image.Image:
    """A muted texture: a dark base tone, blurred random blobs and faint stripes (never a plain fill)."""
    base = tuple(rng.randint(50, 110) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), base)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(20, 40)):  # soft blobs, within +-35 of the base tone
        x, y, r = rng.randrange(SIZE), rng.randrange(SIZE), rng.randint(10, 60)
        tone = tuple(max(0, min(255, c + rng.randint(-35, 35))) for c in base)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tone)
    image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(4, 10)))
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:  # faint stripes, horizontal or vertical
        step, horizontal = rng.randint(12, 40), rng.random() < 0.5
        tone = tuple(max(0, c - 18) for c in base)
        for p in range(0, SIZE, step):
            draw.line((0, p, SIZE, p) if horizontal else (p, 0, p, SIZE), fill=tone, width=2)
    return image


def _polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "star":  # five points, inner radius 0.45 r
        points = []
        for k in range(10):
            angle = -math.pi / 2 + k * math.pi / 5
            radius = r if k % 2 == 0 else 0.45 * r
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    return None


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    colour = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse(obj.box, fill=colour)
    elif obj.shape == "square":
        draw.rectangle(obj.box, fill=colour)
    else:
        draw.polygon(_polygon(obj.shape, obj.box), fill=colour)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int = 6) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _place(rng: random.Random, side: int, taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    for _ in range(200):
        x, y = rng.randint(2, SIZE - side - 2), rng.randint(2, SIZE - side - 2)
        box = (x, y, x + side, y + side)
        if not any(_overlaps(box, other) for other in taken):
            return box
    return None


def _text(rng: random.Random) -> str:
    return str(rng.randint(0, 99)) if rng.random() < 0.5 else rng.choice(WORDS)


def make_scene(seed: int) -> Scene:
    """The scene of ``seed``: background, objects (largest placed first), maybe a text plate."""
    rng = random.Random(seed)
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    taken: list[tuple[int, int, int, int]] = []
    text, text_box = None, None
    if rng.random() < 0.5:  # a plate with dark text, large enough to read at 14 px patches
        text = _text(rng)
        font = ImageFont.load_default(size=rng.randint(40, 52))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        width, height = right - left + 16, bottom - top + 12
        x, y = rng.randint(2, SIZE - width - 2), rng.randint(2, SIZE - height - 2)
        text_box = (x, y, x + width, y + height)
        draw.rectangle(text_box, fill=(235, 235, 225))
        draw.text((x + 8 - left, y + 6 - top), text, font=font, fill=(15, 15, 15))
        taken.append(text_box)
    count = rng.randint(1, MAX_OBJECTS)
    # A third of the scenes favour one colour or one shape, so counts reach 8 (not only 0-2).
    theme = rng.choice(("colour", "shape", None, None, None, None)) if count > 2 else None
    theme_colour, theme_shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    wanted = []
    for _ in range(count):
        size, low, high = rng.choice(SIZES)
        if count > 5 and size == "large" and rng.random() < 0.7:  # many objects: mostly small and medium
            size, low, high = rng.choice(SIZES[:2])
        colour = theme_colour if theme == "colour" and rng.random() < 0.8 else rng.choice(list(COLOURS))
        shape = theme_shape if theme == "shape" and rng.random() < 0.8 else rng.choice(SHAPES)
        wanted.append((shape, colour, size, rng.randint(low, high)))
    objects = []
    for shape, colour, size, side in sorted(wanted, key=lambda w: -w[3]):
        box = _place(rng, side, taken)
        if box is None:
            continue  # no room left: the scene holds fewer objects (its questions count what is drawn)
        taken.append(box)
        obj = SceneObject(shape, colour, size, box)
        _draw(draw, obj)
        objects.append(obj)
    return Scene(seed, image, objects, text, text_box)


# ----------------------------------------------------------------------------- questions
def _unique(objects: list[SceneObject], *keys: str) -> list[SceneObject]:
    """Objects no other object shares the ``keys`` words with (so the words name exactly one)."""
    words = Counter(tuple(getattr(o, k) for k in keys) for o in objects)
    return [o for o in objects if words[tuple(getattr(o, k) for k in keys)] == 1]


def _name(obj: SceneObject) -> str:
    return f"{obj.colour} {obj.shape}"


def _direction(a: SceneObject, b: SceneObject) -> str | None:
    """Where ``a`` is relative to ``b``, when one axis clearly dominates (and they are 20+ px apart on it)."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if max(abs(dx), abs(dy)) < 20 or max(abs(dx), abs(dy)) < 2 * min(abs(dx), abs(dy)):
        return None
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _quadrant(obj: SceneObject) -> str | None:
    x, y = obj.centre
    middle = SIZE / 2
    if abs(x - middle) < 16 or abs(y - middle) < 16:
        return None  # too close to a midline to say
    return f"{'top' if y < middle else 'bottom'}-{'left' if x < middle else 'right'}"


def questions_for(scene: Scene, rng: random.Random | None = None) -> list[Question]:
    """One question per family the scene can ask (reading only with text), in :data:`FAMILIES` order."""
    rng = rng or random.Random(scene.seed + 1)
    objects, out = scene.objects, []
    # count: by colour or by shape (the answer may be 0)
    by_colour = rng.random() < 0.5
    values = list(COLOURS) if by_colour else list(SHAPES)
    seen = [o.colour if by_colour else o.shape for o in objects]
    # mostly a colour or shape the scene has, its most frequent one half of those times (0 stays possible)
    pick = rng.random()
    if pick < 0.4 and seen:
        value = Counter(seen).most_common(1)[0][0]
    elif pick < 0.8 and seen:
        value = rng.choice(seen)
    else:
        value = rng.choice(values)
    n = seen.count(value)
    words = f"{value} shapes" if by_colour else f"{value}s"
    out.append(Question("count", f"how many {words} are there?", str(n)))
    # exist: a present or an absent colour-shape pair, half each
    present = sorted({(o.colour, o.shape) for o in objects})
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    if rng.random() < 0.5 and present:
        colour, shape = rng.choice(present)
        out.append(Question("exist", f"is there a {colour} {shape}?", "yes"))
    else:
        colour, shape = rng.choice(absent)
        out.append(Question("exist", f"is there a {colour} {shape}?", "no"))
    # attribute: the colour of the only object of its size and shape
    candidates = _unique(objects, "size", "shape")
    if candidates:
        obj = rng.choice(candidates)
        out.append(Question("attribute", f"what colour is the {obj.size} {obj.shape}?", obj.colour))
    named = _unique(objects, "colour", "shape")
    # relation: two uniquely named objects, clearly apart on one axis
    pairs = [(a, b, d) for a in named for b in named if a is not b and (d := _direction(a, b)) is not None]
    if pairs:
        a, b, direction = rng.choice(pairs)
        out.append(Question("relation", f"where is the {_name(a)} relative to the {_name(b)}?", direction))
    # position: the quadrant of a uniquely named object
    placed = [(o, q) for o in named if (q := _quadrant(o)) is not None]
    if placed:
        obj, quadrant = rng.choice(placed)
        out.append(Question("position", f"which quadrant is the {_name(obj)} in?", quadrant))
    if scene.text is not None:
        out.append(Question("reading", "what is written in the image?", scene.text))
    # compare: two uniquely named objects of different shapes, one at least twice the other's side
    pairs = [(a, b) for a in named for b in named if a.shape != b.shape and a.side >= 2 * b.side]
    if pairs:
        big, small = rng.choice(pairs)
        first, second = (big, small) if rng.random() < 0.5 else (small, big)
        out.append(Question("compare", f"which is bigger, the {_name(first)} or the {_name(second)}?", big.shape))
    return out


def split_scenes(split: str, count: int, start: int = 0) -> list[int]:
    """Seeds of scenes ``start .. start + count - 1`` of ``split`` (``train``, ``val`` or ``test``)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLIT_SEEDS)}")
    if count < 0 or start < 0 or start + count > 100_000_000:
        raise ValueError(f"scenes {start} .. {start + count - 1} are outside a split's 100,000,000 seeds")
    return [SPLIT_SEEDS[split] + start + i for i in range(count)]


def chance_rates(questions: list[Question]) -> dict[str, float]:
    """Per family: the share of its questions the family's most frequent answer gets right."""
    by_family: dict[str, Counter] = {}
    for q in questions:
        by_family.setdefault(q.family, Counter())[q.answer] += 1
    return {f: c.most_common(1)[0][1] / sum(c.values()) for f, c in by_family.items()}


def answer_vocabulary() -> list[str]:
    """Every answer a question can have (for a word-level tokenizer)."""
    numbers = [str(n) for n in range(100)]
    directions = ["left", "right", "above", "below"]
    quadrants = [f"{v}-{h}" for v in ("top", "bottom") for h in ("left", "right")]
    return sorted({*numbers, "yes", "no", *COLOURS, *SHAPES, *directions, *quadrants, *WORDS})
