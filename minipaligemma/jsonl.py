"""JSONL datasets: your own images and texts, one JSON object per line, checked whole when opened.

A row is {"image": path, "prefix": str, "suffix": str}, the prefix and suffix of PaliGemma's
prefix-LM layout (docs/sequence-and-masks.md); rows come out as `data.Example`s, like the
procedural world's, so training takes either. Every line is checked when the file is opened:
one BadInput lists every bad line by number, so that no bad row surfaces in the middle of
training.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

from .data import Example
from .files import BadInput, MissingFile
from .image import load_image


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
