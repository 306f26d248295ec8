"""The synthetic world and JSONL datasets: deterministic, resolution-free, and every target true.

Targets are checked against the scene by code written here, not by the module's own helpers:
answers are recomputed from the object list, boxes from the rendered pixels.
"""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from minipaligemma.data import SEGMENT_MASK_SIZE, STAGE1_MIXTURE, TASKS, World, question_kind
from minipaligemma.jsonl import JsonlDataset
from minipaligemma.scenes import COLOURS, SMALL_WORLD, Scene, WorldConfig, mask_crop

LOC = re.compile(r"<loc(\d{4})>")


def fake_segment_target(mask, box):
    """Stands in for tasks.mask_to_target: loc tokens of the pixel box (divisor 1023) + 16 dummy codes."""
    assert mask.shape == (SEGMENT_MASK_SIZE, SEGMENT_MASK_SIZE) and mask.dtype == bool
    locs = "".join(f"<loc{round(c / SEGMENT_MASK_SIZE * 1023):04d}>" for c in box)
    return locs + "<seg007>" * 16


def ink(scene: Scene, size: int) -> np.ndarray:
    """[size, size] bool: pixels that differ clearly from the scene's bare background."""
    image = np.asarray(scene.render(size), dtype=int)
    background = np.asarray(replace(scene, objects=(), words=()).render(size), dtype=int)
    return np.abs(image - background).sum(-1) > 30


def pixel_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return rows.min(), cols.min(), rows.max() + 1, cols.max() + 1


def find(scene: Scene, colour: str | None = None, shape: str | None = None, size: str | None = None):
    return [o for o in scene.objects
            if colour in (None, o.colour) and shape in (None, o.shape) and size in (None, o.size)]


# ----------------------------------------------------------------------------- determinism and splits


def test_same_seed_and_index_give_identical_pixels_and_text():
    a, b = World(seed=5, segment_target=fake_segment_target), World(seed=5, segment_target=fake_segment_target)
    for task in TASKS:
        for index in (0, 17):
            x, y = a.example(index, task, 48), b.example(index, task, 48)
            assert (x.prefix, x.suffix) == (y.prefix, y.suffix)
            assert x.image.tobytes() == y.image.tobytes()
    assert World(seed=6).scene(0) != a.scene(0) and a.scene(1) != a.scene(0)


def test_text_is_the_same_on_every_machine():
    # Pinned output: only Random.random() drives the world, and Python keeps its sequence stable.
    assert World(seed=0).text_corpus(6) == [
        "caption en\na yellow triangle",
        "describe en\na small green triangle at the top; a small red triangle on the right",
        "answer en what shape is the large blue object?\nsquare",
        "detect blue diamond\n<loc0512><loc0768><loc0717><loc0973> blue diamond",  # corner (4/8, 6/8), side 0.2
        "ocr\nWEB",
        "caption en\na yellow circle and a yellow square",
    ]


def test_held_out_sets_are_fixed_and_disjoint_from_training():
    world = World(seed=0)
    train = {world.scene(i) for i in range(2000)}
    held_out = world.eval_set("caption", 32, 100)
    assert not train & {example.scene for example in held_out}
    again = World(seed=0).eval_set("caption", 32, 100)
    assert [e.image.tobytes() for e in again] == [e.image.tobytes() for e in held_out]


# ----------------------------------------------------------------------------- rendering


def test_any_resolution_renders_the_same_scene():
    world = World(seed=1)
    for index in range(10):
        scene, other = world.scene(index), world.scene(index + 100)
        low = np.asarray(scene.render(32), dtype=float)
        shrunk = np.asarray(scene.render(128).reduce(4), dtype=float)  # 4x4 box average -> 32 px
        assert np.abs(low - shrunk).mean() < 1.5
        assert np.abs(np.asarray(other.render(32), dtype=float) - shrunk).mean() > 5


# Area of each shape over the area of its box; the star: 5 * R * r * sin(36 deg) over its bounding
# box 2 R sin(72 deg) x R (1 + cos(36 deg)), with inner radius r = R cos(72 deg) / cos(36 deg).
_STAR = 5 * (np.cos(np.radians(72)) / np.cos(np.radians(36))) * np.sin(np.radians(36)) / (
    2 * np.sin(np.radians(72)) * (1 + np.cos(np.radians(36))))
FILL = {"circle": np.pi / 4, "square": 1.0, "diamond": 0.5, "triangle": 0.5, "star": _STAR}


@pytest.mark.parametrize("shape", SMALL_WORLD.shapes)
def test_every_shape_fills_its_box(shape):
    # What makes boxes exact at every resolution: the shape touches all four sides of its box.
    obj = next(o for i in range(100) for o in World(seed=2, config=SMALL_WORLD).scene(i).objects if o.shape == shape)
    crop = mask_crop(obj, 64)
    assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
    assert crop.mean() == pytest.approx(FILL[shape], abs=0.01)


def test_ocr_text_is_unreadable_at_32_px_and_readable_at_64_px():
    # 3x5 font, text height 1/8 of the side: 4 px (< 1 px per font row) at 32, 8 px at 64.
    world = World(seed=3)
    for index in range(20):
        scene = world.scene(index)
        text_only = replace(scene, objects=())
        for size, lowest, highest in ((32, 4, 4), (64, 8, 8), (224, 28, 28)):
            rows = np.nonzero(ink(text_only, size).any(axis=1))[0]
            assert lowest <= rows.max() + 1 - rows.min() <= highest, (index, size)


def test_tiny_world_corners_sit_on_the_lattice_and_free_placement_does_not():
    def corners(config):
        world = World(seed=8, config=config)
        scenes = [world.scene(i) for i in range(40)]
        return np.array([item.box[:2] for s in scenes for item in s.objects + s.words])  # [N, 2]

    on_lattice = corners(WorldConfig(grid=8)) * 8
    assert np.abs(on_lattice - np.round(on_lattice)).max() < 1e-9
    assert len(np.unique(np.round(on_lattice))) >= 6  # spread over the lattice, not stuck on one line
    free = corners(replace(WorldConfig(), grid=None)) * 8
    assert np.abs(free - np.round(free)).max() > 0.1
    # At 64 px a word then starts on an 8 px patch boundary and fits in one row of patches.
    world = World(seed=8, config=WorldConfig(grid=8))
    for index in range(20):
        text_only = replace(world.scene(index), objects=())
        rows = np.nonzero(ink(text_only, 64).any(axis=1))[0]
        assert rows.min() // 8 == rows.max() // 8, index


# ----------------------------------------------------------------------------- targets match the scene


def test_caption_and_describe_list_every_object():
    world = World(seed=4)
    for index in range(40):
        scene = world.scene(index)
        caption = world.example(index, "caption", 32).suffix
        assert sorted(re.findall(r"an? (\w+ \w+)", caption)) == sorted(o.name for o in scene.objects)
        parts = world.example(index, "describe", 32).suffix.split("; ")
        assert len(parts) == len(scene.objects)
        for part in parts:
            pattern = r"a (small|large) (\w+) (\w+) (?:at|on|in) the (.+)"
            size, colour, shape, place = re.fullmatch(pattern, part).groups()
            (obj,) = find(scene, colour, shape)
            y0, x0, y1, x1 = pixel_bbox(scene.mask(obj, 96))
            assert (x1 - x0 > 25) == (size == "large")  # 0.32 * 96 = 31 px against 0.2 * 96 = 19 px
            row = ("top", "", "bottom")[int((y0 + y1) / 2 / 32)]
            column = ("left", "", "right")[int((x0 + x1) / 2 / 32)]
            assert place == (f"{row} {column}".strip() or "centre")


def test_answers_are_true():
    world = World(seed=5, config=SMALL_WORLD)
    kinds = set()
    for index in range(300):
        scene = world.scene(index)
        example = world.example(index, "answer", 16)
        question, answer = example.prefix.removeprefix("answer en "), example.suffix
        if m := re.fullmatch(r"how many (\w+)s are there\?", question):
            kinds.add("count shape")
            kind = "count"
            assert answer == str(len(find(scene, shape=m[1])))
        elif m := re.fullmatch(r"how many (\w+) objects are there\?", question):
            kinds.add("count colour")
            kind = "count"
            assert answer == str(len(find(scene, colour=m[1])))
        elif m := re.fullmatch(r"what colour is the (?:(small|large) )?(\w+)\?", question):
            kinds.add("colour")
            kind = "colour"
            (obj,) = find(scene, shape=m[2], size=m[1])
            assert answer == obj.colour
        elif m := re.fullmatch(r"what shape is the (?:(small|large) )?(\w+) object\?", question):
            kinds.add("shape")
            kind = "shape"
            (obj,) = find(scene, colour=m[2], size=m[1])
            assert answer == obj.shape
        elif m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
            kinds.add(f"presence {answer}")
            kind = "exists"
            assert answer == ("yes" if find(scene, m[1], m[2]) else "no")
        else:
            m = re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", question)
            kinds.add(f"relation {answer}")
            kind = "spatial"
            (a,), (b,) = find(scene, m[1], m[2]), find(scene, m[4], m[5])
            (ay, ax), (by, bx) = [((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2) for o in (a, b)]
            truth = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[m[3]]
            assert answer == ("yes" if truth else "no")
            assert abs(ax - bx if m[3].endswith("of") else ay - by) >= 0.1  # never a close call
        assert question_kind(example.prefix) == kind  # the evaluation's per-kind accuracy groups by this
    assert kinds == {"count shape", "count colour", "colour", "shape", "presence yes", "presence no",
                     "relation yes", "relation no"}


def test_detect_boxes_are_tight_around_the_objects_pixels():
    world, size = World(seed=6, config=SMALL_WORLD), 128
    negatives = 0
    for index in range(60):
        example = world.example(index, "detect", size)
        scene = example.scene
        things = example.prefix.removeprefix("detect ").split(" ; ")
        pieces = [p for p in example.suffix.split(" ; ") if p]
        labels = [LOC.sub("", p).strip() for p in pieces]
        for thing in things:  # every matching object, and nothing else, is reported
            words = thing.split()
            expected = find(scene, *words) if len(words) == 2 else find(scene, shape=thing)
            assert labels.count(thing) == len(expected)
            negatives += not expected
        image, drawn = np.asarray(example.image, dtype=int), ink(scene, size)
        for piece, label in zip(pieces, labels):
            y0, x0, y1, x1 = (int(v) / 1024 * size for v in LOC.findall(piece))
            # A window one pixel wider than the box on every side (neighbours are >= 2.5 px away)
            # holds ink right up to the box's sides and none beyond.
            top, left = max(0, int(y0) - 1), max(0, int(x0) - 1)
            iy0, ix0, iy1, ix1 = pixel_bbox(drawn[top:int(np.ceil(y1)) + 1, left:int(np.ceil(x1)) + 1])
            assert np.allclose((iy0 + top, ix0 + left, iy1 + top, ix1 + left), (y0, x0, y1, x1), atol=1.5)
            if len(label.split()) == 2:  # the box's ink has the colour named
                inside = (slice(round(y0), round(y1)), slice(round(x0), round(x1)))
                colours = image[inside][drawn[inside]]  # [N, 3]
                assert np.abs(np.median(colours, axis=0) - COLOURS[label.split()[0]]).max() < 30
        assert labels and labels[0] == things[0]  # the first thing is always there: no answer is empty
        assert example.labels == labels
        assert example.boxes == [pytest.approx(tuple(int(v) / 1024 * size for v in LOC.findall(p)), abs=size / 1024)
                                 for p in pieces]
    assert negatives > 0  # later things may be absent, and are then left out


def test_segment_gives_the_object_mask_box_and_label():
    world, size = World(seed=7, segment_target=fake_segment_target), 64
    for index in range(30):
        example = world.example(index, "segment", size)
        thing = example.prefix.removeprefix("segment ")
        assert example.suffix.endswith(" " + thing) and example.suffix.count("<seg") == 16
        words = thing.split()
        (obj,) = find(example.scene, *words) if len(words) == 2 else find(example.scene, shape=thing)
        (mask,), (box,) = example.masks, example.boxes
        assert example.labels == [thing] and mask.shape == (size, size)
        y0, x0, y1, x1 = pixel_bbox(mask)
        assert box[0] - 1 <= y0 and y1 <= box[2] + 1 and box[1] - 1 <= x0 and x1 <= box[3] + 1
        drawn = ink(replace(example.scene, objects=(obj,), words=()), size)
        assert (mask & drawn).sum() / (mask | drawn).sum() > 0.7  # the mask is what is drawn


def test_ocr_reads_the_words_top_to_bottom():
    world = World(seed=8, config=SMALL_WORLD)
    for index in range(30):
        scene = world.scene(index)
        lines = sorted((w.box[0], w.box[2], w.text) for w in scene.words)  # (top, bottom, text)
        assert all(bottom <= next_top for (_, bottom, _), (next_top, _, _) in zip(lines, lines[1:]))  # one per line
        assert world.example(index, "ocr", 32).suffix == " ".join(text for _, _, text in lines)


def test_text_corpus_holds_every_task_and_no_newline_in_prefixes():
    texts = World(seed=9, segment_target=fake_segment_target).text_corpus(60)
    prefixes = {text.split("\n", 1)[0].split()[0] for text in texts}
    assert prefixes == set(TASKS) and all(text.count("\n") == 1 for text in texts)
    assert "segment" not in {t.split()[0] for t in World(seed=9).text_corpus(60)}


def test_mask_batches_for_the_vqvae():
    batch = next(World(seed=10).mask_batches(8))
    assert batch.shape == (8, 64, 64) and 0 <= batch.min() and batch.max() <= 1


# ----------------------------------------------------------------------------- mixtures


def test_mixture_weights_are_respected_and_can_be_reweighted():
    world, n = World(seed=11), 800
    stage1 = [e.task for _, e in zip(range(n), world.examples(16, {"caption": 1.0, "ocr": 3.0}))]
    stage2 = [e.task for _, e in zip(range(n), world.examples(16, {"caption": 3.0, "ocr": 1.0, "detect": 0.0}))]
    # binomial standard deviation sqrt(0.75 * 0.25 / 800) = 0.015; 4 of them
    assert abs(stage1.count("ocr") / n - 0.75) < 0.06
    assert abs(stage2.count("ocr") / n - 0.25) < 0.06
    first = next(world.examples(16, {"ocr": 1.0}, start=3))
    assert first.scene == world.scene(3)  # re-weighting changes the tasks asked, not the scenes


def test_bad_mixtures_are_errors():
    world = World(seed=0)
    for mixture in ({"dance": 1.0}, {"caption": -1.0}, {"caption": 0.0}):
        with pytest.raises(ValueError, match="mixture"):
            next(world.examples(16, mixture))
    with pytest.raises(ValueError, match="segment_target"):
        next(world.examples(16, STAGE1_MIXTURE))
    with pytest.raises(ValueError, match="unknown task"):
        world.example(0, "dance", 16)


# ----------------------------------------------------------------------------- JSONL


def test_jsonl_loads_relative_and_absolute_paths_in_any_mode(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("P", (10, 8)).save(tmp_path / "images" / "a.png")
    Image.new("LA", (5, 5)).save(tmp_path / "b.png")
    rows = [{"image": "images/a.png", "prefix": "caption en", "suffix": "a cat"},
            {"image": str(tmp_path / "b.png"), "prefix": "detect dog", "suffix": "", "id": 7}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    dataset = JsonlDataset(path)
    assert len(dataset) == 2
    first, second = dataset[0], dataset[1]
    assert (first.prefix, first.suffix, first.task, first.image.mode, first.image.size) == (
        "caption en", "a cat", "caption", "RGB", (10, 8))
    assert (second.task, second.suffix, second.image.mode) == ("detect", "", "RGB")
    epoch = [e.suffix for _, e in zip(range(4), dataset.examples(seed=0))]
    assert sorted(epoch[:2]) == sorted(epoch[2:]) == ["", "a cat"]


def test_jsonl_bad_rows_are_listed_with_their_line_numbers(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    good = json.dumps({"image": "ok.png", "prefix": "p", "suffix": "s"})
    lines = [
        good,  # 1
        "{not json",  # 2
        "",  # 3: blank, skipped
        json.dumps({"image": "ok.png", "prefix": "p"}),  # 4: no suffix
        json.dumps({"image": "ok.png", "prefix": 3, "suffix": "s"}),  # 5: prefix not a string
        json.dumps({"image": "gone.png", "prefix": "p", "suffix": "s"}),  # 6: no such file
        json.dumps(["ok.png", "p", "s"]),  # 7: not an object
        json.dumps({"image": "ok.png", "prefix": "two\nlines", "suffix": "s"}),  # 8: separator in prefix
        good,  # 9
        '{"image": "ok.png", "prefix": "caf\xe9", "suffix": "s"}',  # 10: Latin-1, not UTF-8
    ]
    path = tmp_path / "data.jsonl"
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    with pytest.raises(ValueError) as error:
        JsonlDataset(path)
    message = str(error.value)
    assert "7 bad row(s)" in message
    for number, what in ((2, "invalid JSON"), (4, '"suffix" is missing'), (5, '"prefix" must be a string'),
                         (6, "gone.png"), (7, "JSON object"), (8, "separator"), (10, "utf-8")):
        assert re.search(rf"line {number}: .*{re.escape(what)}", message), (number, message)
    assert not re.search(r"line (1|3|9):", message)


def test_jsonl_unreadable_image_names_the_line(tmp_path):
    (tmp_path / "fake.png").write_text("not an image")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"image": "fake.png", "prefix": "p", "suffix": "s"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):  # when the file is opened, before any training
        JsonlDataset(path)


def test_world_config_rejects_what_it_cannot_draw():
    for bad in (dict(shapes=("hexagon",)), dict(colours=("teal",)), dict(vocabulary=("cat",)), dict(objects=(0, 2)),
                dict(shapes=("circle",), colours=("red",), objects=(1, 2)), dict(grid=1), dict(grid=0.5)):
        with pytest.raises(ValueError):
            WorldConfig(**bad)
