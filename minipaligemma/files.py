"""Files in and out, safely: one error type for bad input, and one way to write a file.

Every reader in the package (checkpoints, the VQ-VAE, tokenizers, images, datasets, training
checkpoints) raises `BadInput` when a file is not what it should be; the message names the
file, the key or line, what was expected and what was found. The command line catches it once
and prints that one line.

Every artefact the package writes goes through `atomic_write`: the bytes go to a temporary
file in the same folder, which is then renamed over the target. A rename within one folder is
atomic, so a crash (even `kill -9`) leaves either the old file or the new one, never half.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class BadInput(ValueError):
    """A file or value given by the user is not what it should be; the message says what."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # same folder, so the rename is atomic
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MissingFile(BadInput, FileNotFoundError):
    """A file the user named is not there. Also a FileNotFoundError, for callers that catch that."""


def read_json(path: str | os.PathLike) -> object:
    """The parsed contents of a JSON file; BadInput (naming the file and the place) if it is
    missing, not UTF-8, not JSON or nested too deeply to parse."""
    try:
        return json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise MissingFile(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise BadInput(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise BadInput(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise BadInput(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise BadInput(f"{path}: JSON nested too deeply to read") from None
    except OSError as err:  # a folder, no permission, ...
        raise BadInput(f"{path}: cannot read ({err.strerror or err})") from None
