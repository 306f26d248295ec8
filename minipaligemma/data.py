"""Data: the procedural world's tasks, a multi-task stream that needs no download.

The world is PaliGemma's pretraining mixture in miniature (PaliGemma paper §3.2.5; docs/tasks.md §1
and §6, docs/training.md §1 and §5): every image is a `scenes.Scene` of a few coloured shapes and a
word or two, and every scene can be asked

    caption en                      -> a red circle and a blue square
    describe en                     -> a large red circle at the top left; a small blue square ...
    answer en what colour is the circle?             -> red        (also shape, count, presence,
    answer en is the red circle left of the blue square? -> yes     and spatial yes/no, VSR-style)
    detect circle ; blue square     -> <loc..><loc..><loc..><loc..> circle ; <loc..>x4 blue square
    segment red circle              -> <loc..>x4<seg..>x16 red circle
    ocr                             -> CAT MILK

This module holds those tasks' texts, the stage mixtures, `Example` and `World` (the seeded
stream, the held-out sets, the text corpus, the mask batches); `scenes` draws the pictures,
`jsonl` reads datasets of your own.

Design choices:
- Determinism: scene i of split s comes from `random.Random(f"{seed}/{s}/{i}/scene")`, the task
  and question from streams of their own. Only `Random.random()` is called, whose sequence Python
  promises to keep, so a seed gives the same pixels and text on every machine. Training uses split
  "train", the fixed held-out sets split "eval": different streams, never a shared scene.
- Answers are never a judgement call: scenes keep objects distinct and apart (see `scenes`), and
  spatial questions need centres RELATION_GAP apart on their axis.
- `Example` boxes and masks are in pixels of its image, as in `tasks`; loc tokens come from
  `tasks.box_to_loc_string` (detection's divisor 1024), so quantisation lives in one place. The
  `segment` target needs a VQ-VAE, which data knows nothing of: `World(segment_target=...)` takes
  a callback (mask, pixel box) -> 4 loc + 16 seg tokens, e.g. `tasks.mask_to_target` with the
  VQ-VAE bound, and hands it the mask at SEGMENT_MASK_SIZE px so that the 64x64 crop is sharp.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .scenes import TINY_WORLD, Box, Object, Scene, WorldConfig, choice, mask_crop, sample_scene
from .tasks import box_to_loc_string

SegmentTarget = Callable[[np.ndarray, Box], str]  # (mask [height, width] bool, pixel box) -> 4 loc + 16 seg tokens

TASKS = ("caption", "describe", "answer", "detect", "segment", "ocr")
STAGE1_MIXTURE = {"caption": 1.0, "describe": 1.0, "answer": 2.0, "detect": 1.0, "segment": 1.0, "ocr": 1.0}
STAGE2_MIXTURE = {"caption": 0.5, "describe": 0.5, "answer": 1.0, "detect": 2.0, "segment": 2.0, "ocr": 5.0}

# "a REL b" holds when a's centre minus b's has this sign along this axis (0 = y, down; 1 = x).
RELATIONS = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}

SEGMENT_MASK_SIZE = 256  # resolution of the mask handed to segment_target
RELATION_GAP = 0.1  # spatial questions need centres this far apart on the axis asked about
PRESENT = 0.8  # share of a `detect` prompt's later things that are in the image (the rest are negatives)


def _weighted_choice(rng: random.Random, weights: Mapping[str, float]) -> str:
    """A key drawn with probability proportional to its (positive) weight."""
    r = rng.random() * sum(weights.values())
    for key, weight in weights.items():
        r -= weight
        if r < 0:
            return key
    return key  # r == total after rounding: the last key


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


QUESTION_KINDS = {"colour": "what colour", "shape": "what shape", "count": "how many", "exists": "is there",
                  "spatial": "is the"}  # each kind of `answer` question and how its questions begin


def question_kind(prefix: str) -> str:
    """The kind of an `answer` prompt ("answer en what colour is the circle?" -> "colour")."""
    question = prefix.removeprefix("answer en ")
    return next(kind for kind, start in QUESTION_KINDS.items() if question.startswith(start))


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
    presence += [(f"is there {_article(choice(rng, absent))}?", "no") for _ in names]
    relation = []
    for a, b in itertools.permutations(scene.objects, 2):
        for rel, (axis, sign) in RELATIONS.items():
            offset = a.centre[axis] - b.centre[axis]
            if abs(offset) >= RELATION_GAP:
                relation.append((f"is the {a.name} {rel} the {b.name}?", "yes" if offset * sign > 0 else "no"))
    return [kind for kind in (colour, shape, count, presence, relation) if kind]


def _answer(scene, rng, world):
    """A question kind uniformly among those the scene can answer, then a question of that kind."""
    question, answer = choice(rng, choice(rng, _questions(scene, rng, world.config)))
    return f"answer en {question}", answer, []


def _matches(thing: str, obj: Object) -> bool:
    return thing in (obj.shape, obj.name)


def _detect(scene, rng, world):
    """1..max_detect things (a shape or a colour and shape): the first in the image, each later
    one present with probability PRESENT (the rest are negatives, which the answer leaves out).

    Every object matching a thing gets its box and label, in the order of the prompt and then
    the reading order. Two things never match the same object. The first thing is always
    present so that no answer is empty: a small model unsure where a box goes spreads the first
    token over several <loc> tokens, and greedy decoding then prefers a lone end-of-sequence
    (measured: every held-out detection came back empty, F1 0, while one prompt in eight had
    an empty answer).
    """
    config = world.config
    vocabulary = list(config.shapes) + [f"{c} {s}" for c in config.colours for s in config.shapes]
    things: list[str] = []
    for _ in range(1 + int(rng.random() * config.max_detect)):
        present = not things or rng.random() < PRESENT
        options = [t for t in vocabulary if t not in things
                   and any(_matches(t, o) for o in scene.objects) == present
                   and not any(_matches(t, o) and _matches(u, o) for u in things for o in scene.objects)]
        if options:
            things.append(choice(rng, options))
    found = [(thing, o) for thing in things for o in scene.reading_order() if _matches(thing, o)]
    suffix = " ; ".join(box_to_loc_string(o.box, (1, 1)) + " " + thing for thing, o in found)  # box in [0, 1]
    return "detect " + " ; ".join(things), suffix, found


def _segment(scene, rng, world):
    """One object, named by its shape when that is unique, else by colour and shape."""
    if world.segment_target is None:
        raise ValueError("the segment task needs World(segment_target=...), e.g. tasks.mask_to_target with a VQ-VAE")
    obj = choice(rng, scene.objects)
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
