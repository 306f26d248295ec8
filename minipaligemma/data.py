"""Data: a procedural multi-task world that needs no download, and JSONL datasets of your own.

The world is PaliGemma's pretraining mixture in miniature (PaliGemma paper §3.2.5; docs/tasks.md §1, docs/training.md §1 and §5): every
image is a scene of a few coloured shapes and a word or two, and every scene can be asked

    caption en                      -> a red circle and a blue square
    describe en                     -> a large red circle at the top left; a small blue square ...
    answer en what colour is the circle?             -> red        (also shape, count, presence,
    answer en is the red circle left of the blue square? -> yes     and spatial yes/no, VSR-style)
    detect circle ; blue square     -> <loc..><loc..><loc..><loc..> circle ; <loc..>x4 blue square
    segment red circle              -> <loc..>x4<seg..>x16 red circle
    ocr                             -> CAT MILK

Design choices:
- A `Scene` is a vector description: boxes in [0, 1] image coordinates, shapes, colours, sizes,
  words. `Scene.render(size)` rasterises it at any size, antialiased (4x4 sub-samples per pixel),
  so every resolution shows the same scene. Each shape touches all four sides of its box (the
  star is stretched to), so object boxes are exact at every resolution.
- Determinism: scene i of split s comes from `random.Random(f"{seed}/{s}/{i}/scene")`, the task
  and question from streams of their own. Only `Random.random()` is called, whose sequence Python
  promises to keep, so a seed gives the same pixels and text on every machine. Training uses split
  "train", the fixed held-out sets split "eval": different streams, never a shared scene.
- OCR needs resolution. Words are drawn in a 3x5 pixel font defined here (no font file, the same
  everywhere), `text_height` of the image side tall. TINY_WORLD (32 -> 64 px): 3/32, i.e. 3 px at
  32 px (0.6 px per font row: unreadable) and 6 px at 64 px (1.2 px per row: readable), so stage 2
  can beat stage 1 at OCR. SMALL_WORLD (112 -> 224 px, a GPU): 1/32, i.e. 3.5 px, then 7 px.
- A toy model learns in minutes only what repeats. TINY_WORLD puts the top-left corner of every
  object and word on a lattice of 1/8 of the side (`grid`): at 64 px with 8 px patches each word
  then starts on a patch boundary, so a glyph always falls on the same pixels of a patch (with
  free placement the tiny ViT did not learn to read in 300 OCR-only steps; on the lattice it
  reached 36 % of 32 words), and a box corner takes one of 8 locations, so its `<loc>` token is
  seen often. Sizes stay free, so the far corner still varies. SMALL_WORLD places freely.
- Answers are never a judgement call: no two objects share colour and shape, nothing overlaps,
  object centres keep GRID_MARGIN from the lines cutting the image in thirds ("top left" is
  clear), words never share a text line (raster order is top to bottom), and spatial questions
  need centres RELATION_GAP apart on their axis.
- `Example` boxes and masks are in pixels of its image, as in `tasks`; loc tokens come from
  `tasks.box_to_loc_string` (detection's divisor 1024), so quantisation lives in one place. The
  `segment` target needs a VQ-VAE, which data knows nothing of: `World(segment_target=...)` takes
  a callback (mask, pixel box) -> 4 loc + 16 seg tokens, e.g. `tasks.mask_to_target` with the
  VQ-VAE bound, and hands it the mask at SEGMENT_MASK_SIZE px so that the 64x64 crop is sharp.
- JSONL files are checked whole when opened: one error lists every bad line by number.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .files import BadInput, MissingFile
from .image import load_image
from .tasks import box_to_loc_string

Box = tuple[float, float, float, float]  # (y_min, x_min, y_max, x_max)
SegmentTarget = Callable[[np.ndarray, Box], str]  # (mask [height, width] bool, pixel box) -> 4 loc + 16 seg tokens

TASKS = ("caption", "describe", "answer", "detect", "segment", "ocr")
STAGE1_MIXTURE = {"caption": 1.0, "describe": 1.0, "answer": 2.0, "detect": 1.0, "segment": 1.0, "ocr": 1.0}
STAGE2_MIXTURE = {"caption": 0.5, "describe": 0.5, "answer": 1.0, "detect": 2.0, "segment": 2.0, "ocr": 5.0}

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
           "yellow": (235, 195, 20), "purple": (150, 60, 190), "orange": (245, 130, 20)}
TEXT_RGB = (25, 25, 25)
PLACES = (("at the top left", "at the top", "at the top right"),  # [row][column] of the 3x3 grid
          ("on the left", "in the centre", "on the right"),
          ("at the bottom left", "at the bottom", "at the bottom right"))
# "a REL b" holds when a's centre minus b's has this sign along this axis (0 = y, down; 1 = x).
RELATIONS = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}
WORDS = ("CAT", "DOG", "SUN", "MAP", "BOX", "CUP", "KEY", "PEN", "HAT", "BUS", "FOX", "OWL", "BEE", "JAM",
         "ZOO", "EGG", "INK", "TOY", "VAN", "GYM", "JET", "WEB", "NUT", "QUIZ", "FISH", "BIRD", "TREE",
         "LAMP", "MILK", "ROSE", "WOLF", "FROG")

SUPERSAMPLE = 4  # sub-samples per pixel side when rasterising
SEGMENT_MASK_SIZE = 256  # resolution of the mask handed to segment_target
EDGE = 0.02  # nothing is placed closer than this to the image border
GAP = 0.02  # or to another object or word
GRID_MARGIN = 0.04  # object centres stay this far from the lines at 1/3 and 2/3
RELATION_GAP = 0.1  # spatial questions need centres this far apart on the axis asked about
PRESENT = 0.8  # share of `detect` things that are in the image (the rest are negatives)
PLACEMENT_TRIES = 200

# A 3x5 font of capital letters, designed for this module; rows top to bottom, "#" is ink.
FONT = {
    "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.", "C": ".## #.. #.. #.. .##",
    "D": "##. #.# #.# #.# ##.", "E": "### #.. ##. #.. ###", "F": "### #.. ##. #.. #..",
    "G": ".## #.. #.# #.# .##", "H": "#.# #.# ### #.# #.#", "I": "### .#. .#. .#. ###",
    "J": "..# ..# ..# #.# .#.", "K": "#.# #.# ##. #.# #.#", "L": "#.. #.. #.. #.. ###",
    "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#", "O": ".#. #.# #.# #.# .#.",
    "P": "##. #.# ##. #.. #..", "Q": ".#. #.# #.# ##. .##", "R": "##. #.# ##. #.# #.#",
    "S": ".## #.. .#. ..# ##.", "T": "### .#. .#. .#. .#.", "U": "#.# #.# #.# #.# ###",
    "V": "#.# #.# #.# #.# .#.", "W": "#.# #.# ### ### #.#", "X": "#.# #.# .#. #.# #.#",
    "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###",
}
FONT_ROWS, FONT_COLUMNS = 5, 4  # a glyph is 3 columns wide plus 1 of spacing


# ----------------------------------------------------------------------------- shapes and words
# Each shape is a test on coordinates (u, v) in [-1, 1] across its box (v points down), and
# touches all four sides of the box.

_SIN72, _COS36 = math.sin(math.radians(72)), math.cos(math.radians(36))
_STAR_INNER = math.cos(math.radians(72)) / _COS36  # inner / outer radius of a regular 5-point star


def _star(u, v):
    """A regular 5-point star, point up, stretched to its box."""
    x, y = u * _SIN72, -1 + (v + 1) * (1 + _COS36) / 2  # star units: outer radius 1, top point (0, -1)
    angle = np.abs((np.arctan2(x, -y) + math.pi / 5) % (2 * math.pi / 5) - math.pi / 5)  # from nearest point
    r = np.hypot(x, y)
    px, py = r * np.cos(angle), r * np.sin(angle)  # folded onto the edge from (1, 0) to the inner vertex
    ix, iy = _STAR_INNER * _COS36, _STAR_INNER * math.sin(math.radians(36))
    return (ix - 1) * py - iy * (px - 1) >= 0  # on the centre's side of that edge


SHAPES = {
    "circle": lambda u, v: u * u + v * v <= 1,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 1,
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1,
    "triangle": lambda u, v: np.abs(u) <= (v + 1) / 2,  # apex at the top
    "star": _star,
}


def _glyphs(text: str) -> np.ndarray:
    """The font bitmap of a word: [5, 4 * len - 1] bool."""
    rows = [" ".join(FONT[letter].split()[row] for letter in text) for row in range(FONT_ROWS)]
    return np.array([[c == "#" for c in row.replace(" ", ".")] for row in rows])


@dataclass(frozen=True)
class Object:
    """One shape in a scene; `box` is in [0, 1] image coordinates."""

    shape: str
    colour: str
    size: str  # "small" or "large"
    box: Box

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2  # (y, x)

    @property
    def place(self) -> str:
        """Where it is, from the 3x3 grid cell of its centre: "at the top left", "in the centre"."""
        y, x = self.centre
        return PLACES[int(y * 3)][int(x * 3)]

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    def inside(self, u, v):
        return SHAPES[self.shape](u, v)


@dataclass(frozen=True)
class Word:
    """A word in capitals, drawn in the 3x5 font to fill `box`."""

    text: str
    box: Box
    rgb: tuple[int, int, int] = TEXT_RGB

    def inside(self, u, v):
        glyphs = _glyphs(self.text)  # [5, columns]
        rows = np.clip(((v + 1) / 2 * FONT_ROWS).astype(int), 0, FONT_ROWS - 1)
        columns = np.clip(((u + 1) / 2 * glyphs.shape[1]).astype(int), 0, glyphs.shape[1] - 1)
        return glyphs[rows, columns]


# ----------------------------------------------------------------------------- rasterising


def _samples(start: int, stop: int, size: int, low: float, high: float) -> np.ndarray:
    """Sub-pixel sample positions of pixels start..stop-1 (of `size`), mapped so low -> -1, high -> 1."""
    t = (np.arange(start * SUPERSAMPLE, stop * SUPERSAMPLE) + 0.5) / (size * SUPERSAMPLE)
    return 2 * (t - low) / (high - low) - 1


def _coverage(item: Object | Word, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Fraction of each pixel's sub-samples inside the item: u [4 * columns] across, v [4 * rows] down -> [rows, columns]."""
    u, v = u[None, :], v[:, None]
    hit = item.inside(u, v) & (np.abs(u) <= 1) & (np.abs(v) <= 1)
    return hit.reshape(v.size // SUPERSAMPLE, SUPERSAMPLE, u.size // SUPERSAMPLE, SUPERSAMPLE).mean(axis=(1, 3))


def _footprint(item: Object | Word, size: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """The pixels of a size x size image that the item's box touches, and its coverage of them."""
    y_min, x_min, y_max, x_max = item.box
    rows = slice(math.floor(y_min * size), min(size, math.ceil(y_max * size)))
    columns = slice(math.floor(x_min * size), min(size, math.ceil(x_max * size)))
    u = _samples(columns.start, columns.stop, size, x_min, x_max)
    v = _samples(rows.start, rows.stop, size, y_min, y_max)
    return (rows, columns), _coverage(item, u, v)


def mask_crop(item: Object | Word, size: int = 64) -> np.ndarray:
    """The item's mask cropped to its box at size x size, float in [0, 1]: what the VQ-VAE encodes."""
    grid = _samples(0, size, size, 0.0, 1.0)
    return _coverage(item, grid, grid).astype(np.float32)


@dataclass(frozen=True)
class Scene:
    """A resolution-free scene: a background gradient, objects and words."""

    background: tuple[tuple[int, int, int], tuple[int, int, int], float]  # start colour, end colour, angle
    objects: tuple[Object, ...]
    words: tuple[Word, ...] = ()

    def render(self, size: int) -> Image.Image:
        """The scene as a size x size RGB image; antialiased, so any size shows the same scene."""
        start, end, angle = self.background
        centres = (np.arange(size) + 0.5) / size - 0.5
        t = np.clip(0.5 + centres[None, :] * math.cos(angle) + centres[:, None] * math.sin(angle), 0, 1)
        pixels = np.array(start) + (np.array(end) - np.array(start)) * t[..., None]  # [size, size, 3]
        for item in self.objects + self.words:
            where, alpha = _footprint(item, size)
            pixels[where] += (np.array(item.rgb) - pixels[where]) * alpha[..., None]
        return Image.fromarray(np.round(pixels).astype(np.uint8))

    def mask(self, item: Object | Word, size: int) -> np.ndarray:
        """The item's binary mask [size, size] (pixels at least half covered)."""
        mask = np.zeros((size, size), dtype=bool)
        where, alpha = _footprint(item, size)
        mask[where] = alpha >= 0.5
        return mask

    def reading_order(self) -> list[Object]:
        """Objects by grid row, then grid column, then position: the order captions list them."""
        return sorted(self.objects, key=lambda o: (int(o.centre[0] * 3), int(o.centre[1] * 3), o.centre))


# ----------------------------------------------------------------------------- sampling scenes


@dataclass(frozen=True)
class WorldConfig:
    """What scenes contain. Object sizes and text height are fractions of the image side."""

    shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    objects: tuple[int, int] = (1, 3)  # fewest and most objects per scene
    words: tuple[int, int] = (1, 1)  # fewest and most words per scene
    small: float = 0.2
    large: float = 0.32
    text_height: float = 3 / 32
    vocabulary: tuple[str, ...] = WORDS
    max_detect: int = 2  # at most this many things in one `detect` prompt
    grid: int | None = None  # object and word corners on multiples of 1/grid (None: anywhere)

    def __post_init__(self):
        unknown = (set(self.shapes) - set(SHAPES)) | (set(self.colours) - set(COLOURS))
        unknown |= {letter for word in self.vocabulary for letter in word} - set(FONT)
        if unknown:
            raise ValueError(f"unknown shapes, colours or letters (words are in capitals): {sorted(unknown)}")
        if not 1 <= self.objects[0] <= self.objects[1] <= len(self.shapes) * len(self.colours):
            raise ValueError(f"objects=(fewest, most) needs 1 <= fewest <= most <= shapes x colours: {self.objects}")
        if self.grid is not None and not (isinstance(self.grid, int) and self.grid >= 2):
            raise ValueError(f"grid is the number of lattice steps per side (an integer >= 2) or None: {self.grid!r}")


TINY_WORLD = WorldConfig(grid=8)  # CPU: 32 -> 64 px, a 1-5 M parameter model
SMALL_WORLD = WorldConfig(shapes=("circle", "square", "triangle", "diamond", "star"), colours=tuple(COLOURS),
                          objects=(2, 6), words=(1, 2), small=0.12, large=0.2, text_height=1 / 32)  # GPU: 112 -> 224 px


def _uniform(rng: random.Random, low: float, high: float) -> float:
    return low + (high - low) * rng.random()


def _choice(rng: random.Random, options):
    return options[int(rng.random() * len(options))]


def _count(rng: random.Random, fewest_most: tuple[int, int]) -> int:
    fewest, most = fewest_most
    return fewest + int(rng.random() * (most - fewest + 1))


def _weighted_choice(rng: random.Random, weights: Mapping[str, float]) -> str:
    """A key drawn with probability proportional to its (positive) weight."""
    r = rng.random() * sum(weights.values())
    for key, weight in weights.items():
        r -= weight
        if r < 0:
            return key
    return key  # r == total after rounding: the last key


def _corner(rng: random.Random, side: float, grid: int | None) -> float:
    """A box's first coordinate, leaving EDGE to both borders: anywhere, or a multiple of 1/grid."""
    if grid is None:
        return _uniform(rng, EDGE, 1 - EDGE - side)
    low, high = math.ceil(EDGE * grid), math.floor((1 - EDGE - side) * grid)
    return (low + int(rng.random() * (high - low + 1))) / grid


def _place(rng: random.Random, height: float, width: float, taken: list[Box], fits,
           grid: int | None = None) -> Box | None:
    """A random box of this size inside the image, GAP from every taken box and passing `fits`
    (its top-left corner on the 1/grid lattice when grid is given)."""
    for _ in range(PLACEMENT_TRIES):
        y, x = _corner(rng, height, grid), _corner(rng, width, grid)
        box = (y, x, y + height, x + width)
        apart = all(box[0] >= b[2] + GAP or b[0] >= box[2] + GAP or box[1] >= b[3] + GAP or b[1] >= box[3] + GAP
                    for b in taken)
        if apart and fits(box):
            return box
    return None


def _clear_of_grid(box: Box) -> bool:
    """Whether the box centre is GRID_MARGIN away from the lines at 1/3 and 2/3 in both directions."""
    return all(abs(c - line) >= GRID_MARGIN for c in ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
               for line in (1 / 3, 2 / 3))


def sample_scene(config: WorldConfig, rng: random.Random) -> Scene:
    """Draw a scene: background, then words (each on its own text line), then objects.

    No two objects share colour and shape; an item that finds no free spot in PLACEMENT_TRIES
    tries is left out (never the first object, which always has room).
    """
    light = [tuple(int(_uniform(rng, 170, 240)) for _ in range(3)) for _ in range(2)]
    background = (light[0], light[1], _uniform(rng, 0, 2 * math.pi))
    taken: list[Box] = []
    words = []
    for _ in range(_count(rng, config.words)):
        text = _choice(rng, config.vocabulary)
        width = (FONT_COLUMNS * len(text) - 1) / FONT_ROWS * config.text_height
        box = _place(rng, config.text_height, width, taken,
                     fits=lambda box: all(box[0] >= w.box[2] or w.box[0] >= box[2] for w in words),  # own line
                     grid=config.grid)
        if box is not None:
            words.append(Word(text, box))
            taken.append(box)
    kinds = [(colour, shape) for colour in config.colours for shape in config.shapes]
    objects = []
    for _ in range(_count(rng, config.objects)):
        colour, shape = kinds.pop(int(rng.random() * len(kinds)))
        size = _choice(rng, ("small", "large"))
        side = config.small if size == "small" else config.large
        box = _place(rng, side, side, taken, _clear_of_grid, config.grid)
        if box is not None:
            objects.append(Object(shape, colour, size, box))
            taken.append(box)
    return Scene(background, tuple(objects), tuple(words))


# ----------------------------------------------------------------------------- tasks
# Each task maps (scene, rng, world) to (prefix, suffix, the objects the suffix localises).


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _caption(scene, rng, world):
    names = [_article(o.name) for o in scene.reading_order()]
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return "caption en", listing, []


def _describe(scene, rng, world):
    return "describe en", "; ".join(f"a {o.size} {o.name} {o.place}" for o in scene.reading_order()), []


def _unique(scene: Scene, obj: Object, fields: tuple[str, ...]) -> bool:
    return sum(all(getattr(o, f) == getattr(obj, f) for f in fields) for o in scene.objects) == 1


def _questions(scene: Scene, rng: random.Random, config: WorldConfig) -> list[list[tuple[str, str]]]:
    """The (question, answer) pairs the scene settles, one list per kind: colour, shape, count,
    presence (as many yes as no), spatial relation. Kinds with nothing to ask are left out."""
    colour = [(f"what colour is the {ref}?", o.colour) for o in scene.objects
              for ref, fields in ((o.shape, ("shape",)), (f"{o.size} {o.shape}", ("size", "shape")))
              if _unique(scene, o, fields)]
    shape = [(f"what shape is the {ref} object?", o.shape) for o in scene.objects
             for ref, fields in ((o.colour, ("colour",)), (f"{o.size} {o.colour}", ("size", "colour")))
             if _unique(scene, o, fields)]
    count = [(f"how many {s}s are there?", str(sum(o.shape == s for o in scene.objects))) for s in config.shapes]
    count += [(f"how many {c} objects are there?", str(sum(o.colour == c for o in scene.objects)))
              for c in config.colours]
    names = [o.name for o in scene.objects]
    absent = [f"{c} {s}" for c in config.colours for s in config.shapes if f"{c} {s}" not in names]
    presence = [(f"is there {_article(name)}?", "yes") for name in names]
    presence += [(f"is there {_article(_choice(rng, absent))}?", "no") for _ in names]
    relation = []
    for a, b in itertools.permutations(scene.objects, 2):
        for rel, (axis, sign) in RELATIONS.items():
            offset = a.centre[axis] - b.centre[axis]
            if abs(offset) >= RELATION_GAP:
                relation.append((f"is the {a.name} {rel} the {b.name}?", "yes" if offset * sign > 0 else "no"))
    return [kind for kind in (colour, shape, count, presence, relation) if kind]


def _answer(scene, rng, world):
    """A question kind uniformly among those the scene can answer, then a question of that kind."""
    question, answer = _choice(rng, _choice(rng, _questions(scene, rng, world.config)))
    return f"answer en {question}", answer, []


def _matches(thing: str, obj: Object) -> bool:
    return thing in (obj.shape, obj.name)


def _detect(scene, rng, world):
    """1..max_detect things (a shape or a colour and shape), each present with probability PRESENT.

    Every object matching a thing gets its box and label, in the order of the prompt and then
    the reading order. Two things never match the same object.
    """
    config = world.config
    vocabulary = list(config.shapes) + [f"{c} {s}" for c in config.colours for s in config.shapes]
    things: list[str] = []
    for _ in range(1 + int(rng.random() * config.max_detect)):
        present = rng.random() < PRESENT
        options = [t for t in vocabulary if t not in things
                   and any(_matches(t, o) for o in scene.objects) == present
                   and not any(_matches(t, o) and _matches(u, o) for u in things for o in scene.objects)]
        if options:
            things.append(_choice(rng, options))
    found = [(thing, o) for thing in things for o in scene.reading_order() if _matches(thing, o)]
    suffix = " ; ".join(box_to_loc_string(o.box, (1, 1)) + " " + thing for thing, o in found)  # box in [0, 1]
    return "detect " + " ; ".join(things), suffix, found


def _segment(scene, rng, world):
    """One object, named by its shape when that is unique, else by colour and shape."""
    if world.segment_target is None:
        raise ValueError("the segment task needs World(segment_target=...), e.g. tasks.mask_to_target with a VQ-VAE")
    obj = _choice(rng, scene.objects)
    thing = obj.shape if _unique(scene, obj, ("shape",)) else obj.name
    pixel_box = tuple(c * SEGMENT_MASK_SIZE for c in obj.box)
    tokens = world.segment_target(scene.mask(obj, SEGMENT_MASK_SIZE), pixel_box)
    return f"segment {thing}", f"{tokens} {thing}", [(thing, obj)]


def _ocr(scene, rng, world):
    return "ocr", " ".join(w.text for w in sorted(scene.words, key=lambda w: w.box[0])), []


_TASK_FUNCTIONS = {"caption": _caption, "describe": _describe, "answer": _answer,
                   "detect": _detect, "segment": _segment, "ocr": _ocr}


# ----------------------------------------------------------------------------- the world


@dataclass
class Example:
    """One training or evaluation example. `boxes` (pixels, y_min x_min y_max x_max) and `labels`
    are the objects of a detect or segment suffix; `masks` ([height, width] bool) only for segment."""

    image: Image.Image
    prefix: str
    suffix: str
    task: str
    boxes: list[Box] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    scene: Scene | None = None


class World:
    """A seeded, endless supply of scenes and multi-task examples; see the module docstring."""

    SPLITS = ("train", "eval")

    def __init__(self, seed: int = 0, config: WorldConfig = TINY_WORLD, segment_target: SegmentTarget | None = None):
        self.seed, self.config, self.segment_target = seed, config, segment_target

    def _rng(self, split: str, index: int, purpose: str) -> random.Random:
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        return random.Random(f"{self.seed}/{split}/{index}/{purpose}")

    def scene(self, index: int, split: str = "train") -> Scene:
        """Scene `index` of a split; the same (seed, split, index) always gives the same scene."""
        return sample_scene(self.config, self._rng(split, index, "scene"))

    def _text(self, index: int, task: str, split: str):
        scene = self.scene(index, split)
        return scene, *_TASK_FUNCTIONS[task](scene, self._rng(split, index, task), self)

    def example(self, index: int, task: str, size: int, split: str = "train") -> Example:
        """Task `task` asked of scene `index`, with the image rendered at size x size px."""
        if task not in _TASK_FUNCTIONS:
            raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
        scene, prefix, suffix, found = self._text(index, task, split)
        return Example(
            scene.render(size), prefix, suffix, task,
            boxes=[tuple(c * size for c in o.box) for _, o in found],
            labels=[thing for thing, _ in found],
            masks=[scene.mask(o, size) for _, o in found] if task == "segment" else [],
            scene=scene,
        )

    def _check(self, mixture: Mapping[str, float]) -> dict[str, float]:
        """The mixture without zero weights; unknown tasks, negative or all-zero weights, and
        segment without a segment_target are errors."""
        unknown = set(mixture) - set(TASKS)
        if unknown or any(w < 0 for w in mixture.values()) or not any(w > 0 for w in mixture.values()):
            raise ValueError(f"a mixture maps tasks {TASKS} to weights >= 0, not all 0; got {dict(mixture)}")
        if mixture.get("segment", 0) > 0 and self.segment_target is None:
            raise ValueError("the mixture has segment but the World has no segment_target")
        return {task: w for task, w in mixture.items() if w > 0}

    def examples(self, size: int, mixture: Mapping[str, float] = STAGE1_MIXTURE, start: int = 0) -> Iterator[Example]:
        """Endless training examples from scene `start` on, each task drawn with probability
        proportional to its weight. Stage 2 passes other weights (STAGE2_MIXTURE): the scenes stay
        the same, only the tasks asked change. {"caption": 1} gives SigLIP-style image-text pairs."""
        mixture = self._check(mixture)
        for index in itertools.count(start):
            yield self.example(index, _weighted_choice(self._rng("train", index, "mixture"), mixture), size)

    def eval_set(self, task: str, size: int, n: int) -> list[Example]:
        """A fixed held-out set: task `task` on the first n scenes of split "eval"."""
        return [self.example(index, task, size, split="eval") for index in range(n)]

    def text_corpus(self, n: int) -> list[str]:
        """n texts "prefix\\nsuffix" of training scenes 0..n-1, the tasks taken in turn, for
        training a tokenizer and pretraining the language model. No image is rendered. Segment
        is included only when the World has a segment_target."""
        tasks = [t for t in TASKS if t != "segment" or self.segment_target is not None]
        texts = []
        for index in range(n):
            _, prefix, suffix, _ = self._text(index, tasks[index % len(tasks)], "train")
            texts.append(f"{prefix}\n{suffix}")
        return texts

    def mask_batches(self, batch_size: int, size: int = 64) -> Iterator[torch.Tensor]:
        """Endless batches [batch_size, size, size] of training objects' masks cropped to their
        boxes, float in [0, 1], for `vqvae.train_vqvae`. Objects fill their boxes, so the crops
        are the world's few shapes: the VQ-VAE learns exactly what segment targets need."""
        objects = (o for index in itertools.count() for o in self.scene(index).objects)
        while True:
            yield torch.from_numpy(np.stack([mask_crop(next(objects), size) for _ in range(batch_size)]))


# ----------------------------------------------------------------------------- JSONL datasets


MAX_LISTED_ROWS = 10  # bad rows named in one error; the rest are counted


def _read_row(line: bytes, folder: Path) -> tuple[Path, str, str]:
    """(image path, prefix, suffix) of one JSONL line; a BadInput says what is wrong with it."""
    try:
        row = json.loads(line.rstrip(b"\r\n"))  # bytes: text that is not UTF-8 is a BadInput of this line too
    except json.JSONDecodeError as error:
        raise BadInput(f"invalid JSON ({error.msg} at column {error.colno})") from None
    except UnicodeDecodeError as error:
        raise BadInput(f"not utf-8 text ({error.reason} at byte {error.start})") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise BadInput(f"invalid JSON ({error})") from None
    except RecursionError:
        raise BadInput("JSON nested too deeply to read") from None
    if not isinstance(row, dict):
        raise BadInput(f"expected a JSON object, got {type(row).__name__}")
    problems = [f'"{key}" is missing' if key not in row else f'"{key}" must be a string'
                for key in ("image", "prefix", "suffix") if not isinstance(row.get(key), str)]
    for key in ("image", "prefix", "suffix"):
        if isinstance(row.get(key), str):
            try:
                row[key].encode("utf-8")
            except UnicodeEncodeError:  # JSON can spell a lone surrogate, "\ud800", which is not text
                problems.append(f'"{key}" holds a lone surrogate, which is not text')
    if problems:
        raise BadInput(", ".join(problems))
    if "\n" in row["prefix"]:
        raise BadInput('"prefix" must not contain "\\n", the separator between prefix and suffix')
    path = folder / row["image"]  # an absolute path stays as it is
    if not path.is_file():
        raise BadInput(f"image file {str(path)!r} not found")
    return path, row["prefix"], row["suffix"]


def _image_error(path: Path) -> str | None:
    """Why `image.load_image` cannot read `path`, or None if it can."""
    try:
        load_image(path)
    except BadInput as error:
        return str(error)
    return None


class JsonlDataset:
    """Your own data: one JSON object per line, {"image": path, "prefix": str, "suffix": str}.

    Image paths are relative to the JSONL file's folder, or absolute. Other keys are ignored and
    blank lines skipped. Every line is checked when the file is opened, so that no bad row
    surfaces in the middle of training: if any is bad, a single BadInput names the file, then
    each bad line by number and what is wrong with it (invalid JSON, a missing or non-string
    field, "\\n" in the prefix, a missing image file, an image that `image.load_image` cannot
    decode), the first MAX_LISTED_ROWS of them and how many more. Opening therefore decodes
    every image once (each file once, however many rows use it). Images are read again when an
    example is asked for (any PIL mode becomes RGB); one that became unreadable since is then a
    BadInput naming the line. `task` is the first word of the prefix ("caption", "detect", ...).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[tuple[int, Path, str, str]] = []  # (line number, image, prefix, suffix)
        problems = []
        image_errors: dict[Path, str | None] = {}  # each image decoded once
        try:
            lines = open(self.path, "rb")
        except FileNotFoundError:
            raise MissingFile(f"{self.path}: file not found") from None
        except OSError as error:  # a folder, no permission, ...
            raise BadInput(f"{self.path}: cannot read ({error.strerror or error})") from None
        with lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = _read_row(line, self.path.parent)
                    if row[0] not in image_errors:
                        image_errors[row[0]] = _image_error(row[0])
                    if image_errors[row[0]]:
                        raise BadInput(image_errors[row[0]])
                    self.rows.append((number, *row))
                except BadInput as error:
                    problems.append(f"line {number}: {error}")
        if problems:
            more = len(problems) - MAX_LISTED_ROWS
            raise BadInput(f"{self.path}: {len(problems)} bad row(s): " + "; ".join(problems[:MAX_LISTED_ROWS])
                           + (f"; and {more} more bad row(s)" if more > 0 else ""))
        if not self.rows:
            raise BadInput(f"{self.path} holds no examples")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Example:
        number, path, prefix, suffix = self.rows[i]
        try:
            image = load_image(path)
        except BadInput as error:
            raise BadInput(f"{self.path} line {number}: {error}") from error
        return Example(image, prefix, suffix, task=prefix.split(" ", 1)[0])

    def examples(self, seed: int = 0) -> Iterator[Example]:
        """Endless examples, each epoch in a new order drawn from (seed, epoch)."""
        for epoch in itertools.count():
            rng = random.Random(f"{seed}/{epoch}")
            yield from (self[i] for i in sorted(range(len(self)), key=lambda _: rng.random()))
