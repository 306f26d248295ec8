"""Image loading and preprocessing: from a file, a PIL image or an array to pixels in [-1, 1].

PaliGemma sees an image as a square grid of RGB pixels scaled to [-1, 1] (docs/differences.md §11). This
module does exactly that and nothing more:

1. Load: `load_image` opens a file with PIL, applies the EXIF orientation (phones store photos
   sideways and record the rotation there; transformers' `load_image` does the same), and
   converts to RGB. A file PIL cannot read (not an image, truncated, corrupt, or so large
   that PIL suspects a decompression bomb) is a BadInput that names the path; a missing file is
   a MissingFile (both a BadInput and a FileNotFoundError).
2. Convert to RGB (`to_rgb`), whatever the PIL mode:
   - transparency (RGBA, LA, PA, premultiplied RGBa/La, or a palette/colour-key transparency) is
     composited onto a white background. Dropping the alpha channel instead would expose the
     colour hidden under transparent pixels, often black; white is what a viewer shows and is
     also what transformers' `convert_to_rgb` does, so both pipelines give the same pixels.
   - 16-bit grayscale (I;16, I;16L, I;16B, I;16N) is scaled from 0..65535 to 0..255. PIL's own
     conversion clips instead, turning most of a 16-bit image white.
   - every other mode (1, L, P, CMYK, YCbCr, LAB, HSV, I, F, ...) uses PIL's conversion; for the
     32-bit modes I and F that means values are read on the 8-bit scale and clipped to 0..255.
3. Resize to `size` x `size`, ignoring the aspect ratio: the official models were trained on
   squashed images, and detection coordinates are relative to the squashed image (PaliGemma
   paper §3.1 and App. C; docs/tasks.md §2). The resize runs in PIL on 8-bit pixels, like transformers' `SiglipImageProcessor`.
   - "bilinear" (default) is big_vision's method. PIL antialiases when it shrinks an image, which
     matches big_vision's `resize(..., antialias=True)` configs and its fine-tuning notebook;
     configs without antialiasing, and big_vision's uint8 truncation after resizing, are not
     reproduced (pretraining randomised the resize method anyway, P1 §3.2.6).
   - "bicubic" is transformers' default, so that our pixels equal its processor's.
4. Scale: x / 127.5 - 1 maps 0 -> -1 and 255 -> 1 exactly.

An image may be a PIL image, a uint8 numpy array (height, width) or (height, width, 1|3|4), or a
path. A batch is a list of images -> [B, 3, R, R]; a batch of several frames per example (video,
multi-image) is a list of equally long lists -> [B, F, 3, R, R].
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .files import BadInput, MissingFile

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to RGB (transparency composited on white, 16-bit scaled)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        eight_bit = np.round(np.asarray(image, dtype=np.float64) / 257.0)  # 65535 / 257 = 255
        image = Image.fromarray(eight_bit.astype(np.uint8))  # mode L
    elif image.mode == "La":
        image = image.convert("LA")  # PIL converts premultiplied La to nothing else
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an upright RGB PIL image; a file that is not an image is a BadInput.

    Animated formats (GIF, WebP, ...) give their first frame.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here, inside the try
            return to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise MissingFile(f"{os.fspath(path)}: image file not found") from None
    except MemoryError:
        raise
    except Exception as error:  # PIL's decoders raise OSError, ValueError, SyntaxError, ... on damaged data
        raise BadInput(f"cannot read an image from {os.fspath(path)!r}: {error}") from error


def _as_rgb_image(image: Image.Image | np.ndarray | str | os.PathLike) -> Image.Image:
    """Turn one PIL image, uint8 array or path into an RGB PIL image."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 in 0..255, got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]  # [height, width]
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)):
            return to_rgb(Image.fromarray(image))  # L, RGB or RGBA
        raise ValueError(f"image arrays must be (height, width) or (height, width, 1|3|4), got shape {image.shape}")
    raise TypeError(f"expected a PIL image, a uint8 numpy array or a path, got {type(image)}")


def _pixels(image: Image.Image | np.ndarray | str | os.PathLike, size: int, resample: str) -> torch.Tensor:
    """One image -> float32 [3, size, size] in [-1, 1]."""
    rgb = _as_rgb_image(image).resize((size, size), RESAMPLE[resample])
    pixels = torch.from_numpy(np.array(rgb))  # [R, R, 3] uint8
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # [3, R, R]


def preprocess(images: Sequence, size: int, resample: str = "bilinear") -> torch.Tensor:
    """Images -> pixel values for the model: float32 [B, 3, size, size] in [-1, 1].

    `images` is a list of images (PIL, uint8 array or path), or a list of equally long lists of
    images for several frames per example, which gives [B, F, 3, size, size]. `resample` is
    "bilinear" (big_vision) or "bicubic" (transformers).
    """
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("images must be a non-empty list (or a list of lists for several frames)")
    if not all(isinstance(example, (list, tuple)) for example in images):
        return torch.stack([_pixels(image, size, resample) for image in images])  # [B, 3, R, R]
    frame_counts = {len(example) for example in images}
    if len(frame_counts) != 1 or 0 in frame_counts:
        raise ValueError(f"every example needs the same number (>0) of frames, got {sorted(frame_counts)}")
    return torch.stack([preprocess(example, size, resample) for example in images])  # [B, F, 3, R, R]
