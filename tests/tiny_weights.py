"""A tiny model folder as a user keeps one on disk, for the tests that run the command line and
`load` on files: weights in transformers' layout with a trained tokenizer beside them, and an
image `in.png` next to the folder."""

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minipaligemma import PaliGemma, get_config
from minipaligemma.checkpoint import to_hf_state_dict, write_hf_folder
from minipaligemma.data import World
from minipaligemma.tokenizer import train_tokenizer


def tiny_weights_folder(root: Path, randomize: Callable[[PaliGemma], None] | None = None) -> Path:
    """root/tiny: the tiny config with a 512-piece tokenizer trained on the world's text, its
    weights as initialised (seed 0), or as `randomize` overwrites them, and root/in.png."""
    folder = root / "tiny"
    folder.mkdir()
    tokenizer = train_tokenizer(World(0).text_corpus(300), 512, folder / "tokenizer.model")
    cfg = get_config("tiny")
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=tokenizer.vocab_size))
    torch.manual_seed(0)
    model = PaliGemma(cfg)
    if randomize is not None:
        randomize(model)
    write_hf_folder(to_hf_state_dict(model), cfg, folder)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "in.png")
    return folder
