"""Scenes: what the procedural world holds and how it looks, apart from the tasks asked of it.

The world of `data` is PaliGemma's pretraining mixture in miniature (PaliGemma paper §3.2.5;
docs/tasks.md §6, docs/training.md §5): every image is a scene of a few coloured shapes and a
word or two. This module holds what a scene is (colours, shapes, the font, `Object`, `Word`,
`Scene`), how it is drawn (rasterising, masks) and how one is sampled (`WorldConfig`, its
presets, `sample_scene`); `data` turns scenes into the tasks' texts.

Design choices:
- A `Scene` is a vector description: boxes in [0, 1] image coordinates, shapes, colours, sizes,
  words. `Scene.render(size)` rasterises it at any size, antialiased (4x4 sub-samples per pixel),
  so every resolution shows the same scene. Each shape touches all four sides of its box (the
  star is stretched to), so object boxes are exact at every resolution.
- Determinism: `sample_scene` calls only `Random.random()`, whose sequence Python promises to
  keep, so a seeded stream gives the same pixels on every machine (`data.World` seeds it).
- OCR needs resolution. Words are drawn in a 3x5 pixel font defined here (no font file, the same
  everywhere), `text_height` of the image side tall. TINY_WORLD (32 -> 64 px): 1/8, i.e. 4 px at
  32 px (0.8 px per font row: unreadable) and 8 px at 64 px (1.6 px per row, one row of patches:
  readable), so stage 2 can beat stage 1 at OCR. At 3/32 (1.2 px per row at 64 px) the tiny
  model learned to read in one run and not in another of the same length; at 1/8 it read 72 %
  of the words after 900 stage-2 steps. SMALL_WORLD (112 -> 224 px, a GPU): 1/28, the same
  4 px, then 8 px.
- A toy model learns in minutes only what repeats. TINY_WORLD puts the top-left corner of every
  object and word on a lattice of 1/8 of the side (`grid`): at 64 px with 8 px patches each word
  then starts on a patch boundary, so a glyph always falls on the same pixels of a patch (with
  free placement the tiny ViT did not learn to read in 300 OCR-only steps; on the lattice it
  reached 36 % of 32 words), and a box corner takes one of 8 locations, so its `<loc>` token is
  seen often. Sizes stay free, so the far corner still varies. SMALL_WORLD places freely.
- Scenes leave no answer to judgement: no two objects share colour and shape, nothing overlaps,
  object centres keep GRID_MARGIN from the lines cutting the image in thirds ("top left" is
  clear), and words never share a text line (raster order is top to bottom).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .tasks import Box  # here in fractions of the image side, 0..1

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
           "yellow": (235, 195, 20), "purple": (150, 60, 190), "orange": (245, 130, 20)}
TEXT_RGB = (25, 25, 25)
PLACES = (("at the top left", "at the top", "at the top right"),  # [row][column] of the 3x3 grid
          ("on the left", "in the centre", "on the right"),
          ("at the bottom left", "at the bottom", "at the bottom right"))
WORDS = ("CAT", "DOG", "SUN", "MAP", "BOX", "CUP", "KEY", "PEN", "HAT", "BUS", "FOX", "OWL", "BEE", "JAM",
         "ZOO", "EGG", "INK", "TOY", "VAN", "GYM", "JET", "WEB", "NUT", "QUIZ", "FISH", "BIRD", "TREE",
         "LAMP", "MILK", "ROSE", "WOLF", "FROG")

SUPERSAMPLE = 4  # sub-samples per pixel side when rasterising
EDGE = 0.02  # nothing is placed closer than this to the image border
GAP = 0.02  # or to another object or word
GRID_MARGIN = 0.04  # object centres stay this far from the lines at 1/3 and 2/3
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
    text_height: float = 1 / 8
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
                          objects=(2, 6), words=(1, 2), small=0.12, large=0.2, text_height=1 / 28)  # GPU: 112 -> 224 px


def _uniform(rng: random.Random, low: float, high: float) -> float:
    return low + (high - low) * rng.random()


def choice(rng: random.Random, options):
    """An option drawn uniformly with one `Random.random()` call (see the module docstring)."""
    return options[int(rng.random() * len(options))]


def _count(rng: random.Random, fewest_most: tuple[int, int]) -> int:
    fewest, most = fewest_most
    return fewest + int(rng.random() * (most - fewest + 1))


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
        text = choice(rng, config.vocabulary)
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
        size = choice(rng, ("small", "large"))
        side = config.small if size == "small" else config.large
        box = _place(rng, side, side, taken, _clear_of_grid, config.grid)
        if box is not None:
            objects.append(Object(shape, colour, size, box))
            taken.append(box)
    return Scene(background, tuple(objects), tuple(words))
