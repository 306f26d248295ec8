"""The command line, run as a user runs it: `python -m minipaligemma ...` in a subprocess."""

import subprocess
import sys

import pytest
from PIL import Image

from minipaligemma import load
from minipaligemma.generate import generate
from minipaligemma.vqvae import TINY_CONFIG, MaskVQVAE, save_vqvae
from tiny_weights import tiny_weights_folder


def cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "minipaligemma", *map(str, args)], capture_output=True,
                            text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny model folder in transformers' layout, with a trained tokenizer and a VQ-VAE beside it."""
    folder = tiny_weights_folder(tmp_path_factory.mktemp("weights"))
    save_vqvae(MaskVQVAE(TINY_CONFIG), folder.parent / "vae-oid.npz")
    return folder


def test_generate_streams_the_answer_of_the_python_api(weights):
    out = cli("generate", "--weights", weights, "--image", weights.parent / "in.png", "--prompt", "caption en",
              "--max-new-tokens", 6, "--dtype", "float32")
    model = load(weights)
    expected = generate(model, model.tokenizer, [Image.open(weights.parent / "in.png")], ["caption en"],
                        max_new_tokens=6)[0]
    assert out.stdout.rstrip("\n") == expected


def test_generate_draws_detections(weights, tmp_path):
    out = cli("generate", "--weights", weights, "--image", weights.parent / "in.png", "--prompt", "detect circle",
              "--max-new-tokens", 4, "--draw", tmp_path / "boxes.png")
    assert "drew" in out.stdout and Image.open(tmp_path / "boxes.png").size == (64, 48)


def test_generate_with_beam_search_and_sampling(weights):
    for options in (["--beam", 2], ["--temperature", 0.8, "--top-p", 0.9, "--top-k", 5]):
        cli("generate", "--weights", weights, "--image", weights.parent / "in.png", "--prompt", "ocr",
            "--max-new-tokens", 3, *options)


def test_inspect_and_convert(weights, tmp_path):
    out = cli("inspect", weights).stdout
    assert "transformers (safetensors)" in out and "float32" in out
    total = sum(p.numel() for p in load(weights).parameters())
    assert f"{total:,} parameters" in out
    cli("convert", weights, tmp_path / "tiny.npz")
    assert "big_vision (.npz)" in cli("inspect", tmp_path / "tiny.npz").stdout


def test_bad_input_is_one_clear_line(weights, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    out = cli("generate", "--weights", weights, "--image", tmp_path / "notes.txt", "--prompt", "caption en", check=False)
    assert out.returncode == 2 and "notes.txt" in out.stderr and "Traceback" not in out.stderr
    out = cli("inspect", tmp_path / "missing.npz", check=False)
    assert out.returncode == 2 and "missing.npz: no such file" in out.stderr
