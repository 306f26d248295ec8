"""Files in and out, safely: one error type for bad input, and one way to write a file.

Every reader in the package (checkpoints, the VQ-VAE, tokenizers, images, datasets, training
checkpoints) raises `BadInput` when a file is not what it should be; the message names the
file, the key or line, what was expected and what was found. The command line catches it once
and prints that one line.

Every artefact the package writes goes through `atomic_write`: the bytes go to a temporary
file in the same folder, which is then renamed over the target. A rename within one folder is
atomic, so a crash (even `kill -9`) leaves either the old file or the new one, never half.
"""

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
