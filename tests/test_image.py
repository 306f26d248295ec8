"""Image tests: every PIL mode becomes RGB, value range, shapes, and equality with transformers'
SigLIP processor (expected pixel values derived by hand where possible)."""

import numpy as np
import pytest
import torch
from PIL import Image

from minipaligemma.image import load_image, preprocess, to_rgb

ALL_MODES = [
    "1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
    "I", "I;16", "I;16L", "I;16B", "I;16N", "F",
]  # fmt: skip


def random_image(height, width, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_mode_converts_to_rgb(mode):
    rgb = to_rgb(Image.new(mode, (5, 3)))
    assert rgb.mode == "RGB" and rgb.size == (5, 3)


@pytest.mark.parametrize(
    "mode, color, expected",
    [
        ("L", 72, (72, 72, 72)),
        ("1", 1, (255, 255, 255)),
        ("I;16", 40000, (156, 156, 156)),  # 40000 / 257 = 155.6: scaled, not clipped to 255
        ("I;16B", 65535, (255, 255, 255)),
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),  # opaque: colour kept
        ("RGBA", (10, 20, 30, 0), (255, 255, 255)),  # transparent: white shows through
        ("RGBA", (0, 0, 0, 51), (204, 204, 204)),  # 20 % black over white: 255 * 0.8
        ("LA", (0, 0), (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (0, 0, 0, 255), (0, 0, 0)),
    ],
)
def test_mode_conversion_values(mode, color, expected):
    assert to_rgb(Image.new(mode, (2, 2), color)).getpixel((1, 1)) == expected


def test_palette_transparency_is_white():
    image = Image.new("P", (2, 1))
    image.putpalette([200, 0, 0, 0, 0, 200])  # index 0 red, index 1 blue
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    rgb = to_rgb(image)
    assert rgb.getpixel((0, 0)) == (200, 0, 0) and rgb.getpixel((1, 0)) == (255, 255, 255)


def test_load_image_files(tmp_path):
    Image.fromarray(np.full((4, 6), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")  # 16-bit PNG
    image = load_image(tmp_path / "deep.png")
    assert image.mode == "RGB" and image.size == (6, 4) and image.getpixel((0, 0)) == (156, 156, 156)

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels must be turned 90 degrees to be upright
    Image.new("RGB", (6, 4)).save(tmp_path / "sideways.png", exif=exif)
    assert load_image(tmp_path / "sideways.png").size == (4, 6)


def test_load_image_errors_name_the_path(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt"):
        load_image(text)

    png = tmp_path / "cut.png"
    Image.fromarray(random_image(64, 64)).save(png)
    png.write_bytes(png.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match="cut.png"):
        load_image(png)

    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
def test_black_and_white_map_exactly_to_minus_one_and_one(resample):
    black, white = np.zeros((10, 7, 3), np.uint8), np.full((5, 9, 3), 255, np.uint8)
    pixels = preprocess([black, white], size=8, resample=resample)
    assert pixels.dtype == torch.float32 and pixels.shape == (2, 3, 8, 8)
    assert torch.all(pixels[0] == -1.0) and torch.all(pixels[1] == 1.0)


def test_bilinear_antialiases_when_shrinking():
    # 4x4 -> 1x1. Without antialiasing, bilinear samples the centre and reads the black 2x2 core
    # (0). PIL's bilinear is a triangle filter as wide as the scale factor: per axis the pixel
    # centres sit at distances 1.5, 0.5, 0.5, 1.5 from the output centre, weights 1 - d/4
    # = 0.625, 0.875, 0.875, 0.625 (sum 3). The core gets (1.75 / 3)^2 = 0.340 of the weight, so
    # the pixel is 255 * 0.660 = 168.2 -> 168.
    image = np.full((4, 4, 3), 255, np.uint8)
    image[1:3, 1:3] = 0
    value = preprocess([image], size=1)[0, 0, 0, 0].item()
    assert abs((value + 1) * 127.5 - 168) <= 1


def test_inputs_and_shapes(tmp_path):
    Image.fromarray(random_image(20, 30)).save(tmp_path / "a.png")
    gray = random_image(12, 12, channels=1)
    inputs = [Image.fromarray(random_image(9, 16)), random_image(30, 20), gray, gray[:, :, 0]]
    inputs.append(tmp_path / "a.png")  # PIL image, RGB array, (H, W, 1) and (H, W) arrays, path
    assert preprocess(inputs, size=14).shape == (5, 3, 14, 14)
    frames = preprocess([inputs[:3], inputs[2:]], size=14)
    assert frames.shape == (2, 3, 3, 14, 14)
    assert torch.equal(frames[0, 2], frames[1, 0])  # the same image, wherever it sits
    grays = preprocess([gray, gray[:, :, 0]], size=14)
    assert torch.equal(grays[0], grays[1]) and torch.equal(grays[0, 0], grays[0, 2])  # R == B


def test_bad_inputs():
    image = random_image(4, 4)
    with pytest.raises(ValueError, match="same number"):
        preprocess([[image, image], [image]], size=4)
    with pytest.raises(ValueError, match="uint8"):
        preprocess([image.astype(np.float32)], size=4)
    with pytest.raises(ValueError, match="shape"):
        preprocess([random_image(4, 4, channels=2)], size=4)
    with pytest.raises(ValueError, match="resample"):
        preprocess([image], size=4, resample="lanczos")
    with pytest.raises(ValueError, match="non-empty"):
        preprocess([], size=4)


@pytest.mark.parametrize("height, width, size", [(50, 70, 32), (17, 9, 28), (300, 200, 224)])
@pytest.mark.parametrize("channels", [3, 4])
def test_bicubic_equals_transformers_siglip_processor(height, width, size, channels):
    transformers = pytest.importorskip("transformers")
    # transformers 5 has a torchvision and a PIL backend; without torchvision installed
    # SiglipImageProcessor falls back to the PIL one, which we name directly.
    processor = transformers.SiglipImageProcessorPil(
        size={"height": size, "width": size},
        resample=Image.Resampling.BICUBIC,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    image = Image.fromarray(random_image(height, width, channels, seed=size))  # RGB or RGBA
    theirs = processor(image, return_tensors="pt")["pixel_values"]
    ours = preprocess([image], size, resample="bicubic")
    # Both resize in PIL on uint8 and composite alpha on white; they differ only in the float
    # arithmetic of the scaling (x / 127.5 - 1 vs (x / 255 - 0.5) / 0.5): measured 0.0.
    assert ours.shape == theirs.shape == (1, 3, size, size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
