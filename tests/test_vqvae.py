"""The mask VQ-VAE: official key layout, strict loading, shapes, quantisation, and training.

The official `vae-oid.npz` is not available here, so a file with its exact keys and shapes is
written from random values (the shapes below are typed in from docs/tasks.md §4.1 and the original AiT
config, not taken from our model) and loaded back.
"""

import contextlib
import time

import numpy as np
import pytest
import torch
from torch import nn

from minipaligemma.vqvae import (
    TINY_CONFIG,
    MaskVQVAE,
    VQVAEConfig,
    load_vqvae,
    save_vqvae,
    synthetic_mask_batches,
    synthetic_masks,
    train_vqvae,
)


def _res_block_shapes(prefix: str, width: int) -> dict:
    return {
        f"{prefix}.net.0.weight": (width, width, 3, 3), f"{prefix}.net.0.bias": (width,),
        f"{prefix}.net.2.weight": (width, width, 3, 3), f"{prefix}.net.2.bias": (width,),
        f"{prefix}.net.4.weight": (width, width, 1, 1), f"{prefix}.net.4.bias": (width,),
    }


OFFICIAL_SHAPES = {
    "_vq_vae._embedding": (128, 512),
    "encoder.0.weight": (16, 1, 4, 4), "encoder.0.bias": (16,),
    "encoder.2.weight": (32, 16, 4, 4), "encoder.2.bias": (32,),
    "encoder.4.weight": (64, 32, 4, 4), "encoder.4.bias": (64,),
    "encoder.6.weight": (128, 64, 4, 4), "encoder.6.bias": (128,),
    **_res_block_shapes("encoder.8", 128),
    **_res_block_shapes("encoder.9", 128),
    "encoder.10.weight": (512, 128, 1, 1), "encoder.10.bias": (512,),
    "decoder.0.weight": (128, 512, 1, 1), "decoder.0.bias": (128,),
    **_res_block_shapes("decoder.2", 128),
    **_res_block_shapes("decoder.3", 128),
    "decoder.4.weight": (128, 128, 4, 4), "decoder.4.bias": (128,),  # ConvTranspose2d: [in, out, k, k]
    "decoder.6.weight": (128, 64, 4, 4), "decoder.6.bias": (64,),
    "decoder.8.weight": (64, 32, 4, 4), "decoder.8.bias": (32,),
    "decoder.10.weight": (32, 16, 4, 4), "decoder.10.bias": (16,),
    "decoder.12.weight": (1, 16, 1, 1), "decoder.12.bias": (1,),
}


def _random_official_weights(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (0.05 * rng.standard_normal(shape)).astype(np.float32) for k, shape in OFFICIAL_SHAPES.items()}


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae-oid.npz"
    weights = _random_official_weights()
    np.savez(path, **weights)
    return path, weights


@contextlib.contextmanager
def _one_thread():
    """Tiny convolutions gain nothing from threads, and one thread keeps the timing steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ious(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    intersection = (predicted & target).flatten(1).sum(1)
    union = (predicted | target).flatten(1).sum(1)
    return intersection / union


# ----------------------------------------------------------------------------- official layout


def test_official_layout_loads_with_every_key_and_value(official_file):
    path, weights = official_file
    model = load_vqvae(path)
    assert model.config == VQVAEConfig()  # the defaults are the official sizes
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == OFFICIAL_SHAPES
    for key, value in weights.items():
        assert torch.equal(state[key], torch.from_numpy(value)), key
    assert not model.training


def test_official_model_encodes_and_decodes_with_the_right_shapes(official_file):
    model = load_vqvae(official_file[0])
    masks = torch.from_numpy(synthetic_masks(3, seed=1)).float()  # [3, 64, 64]
    latents = model.encode(masks)
    assert latents.shape == (3, 16, 512)
    codes = model.encode_masks(masks)
    assert codes.shape == (3, 16) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < 128
    logits = model.decode_codes(codes)
    assert logits.shape == (3, 64, 64) and torch.isfinite(logits).all()


def test_decoder_doubles_the_grid_four_times():
    model = MaskVQVAE(TINY_CONFIG)
    sizes = []
    for layer in model.decoder:
        layer.register_forward_hook(lambda module, inputs, output: sizes.append(tuple(output.shape[-2:])))
    model.decode_codes(torch.zeros(2, 16, dtype=torch.long))
    up_sizes = [size for layer, size in zip(model.decoder, sizes) if isinstance(layer, nn.ConvTranspose2d)]
    assert sizes[0] == (4, 4) and up_sizes == [(8, 8), (16, 16), (32, 32), (64, 64)]


def test_ema_training_statistics_in_the_file_are_ignored():
    weights = _random_official_weights()
    weights["_vq_vae._ema_w"] = np.zeros((128, 512), np.float32)
    weights["_vq_vae._ema_cluster_size"] = np.zeros(128, np.float32)
    assert load_vqvae(weights).config == VQVAEConfig()


@pytest.mark.parametrize(
    "key", ["encoder.8.net.2.bias", "decoder.12.weight", "_vq_vae._embedding", "encoder.4.weight"]
)
def test_a_missing_tensor_is_an_error_naming_it(key):
    weights = _random_official_weights()
    del weights[key]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_vqvae(weights)


def test_a_misshaped_tensor_is_an_error_naming_it_and_both_shapes(tmp_path):
    weights = _random_official_weights()
    weights["encoder.9.net.4.weight"] = np.zeros((128, 128, 3, 3), np.float32)
    path = tmp_path / "bad.npz"
    np.savez(path, **weights)
    with pytest.raises(ValueError) as error:
        load_vqvae(path)
    message = str(error.value)
    assert "encoder.9.net.4.weight" in message and str(path) in message
    assert "(128, 128, 3, 3)" in message and "(128, 128, 1, 1)" in message


def test_a_codebook_width_that_disagrees_with_the_encoder_is_an_error():
    weights = _random_official_weights()
    weights["_vq_vae._embedding"] = np.zeros((128, 64), np.float32)
    with pytest.raises(ValueError, match=r"encoder\.10\.weight.*\(512, 128, 1, 1\).*\(64, 128, 1, 1\)"):
        load_vqvae(weights)


def test_an_unexpected_tensor_is_an_error_naming_it():
    weights = _random_official_weights()
    weights["decoder.14.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"decoder\.14\.weight"):
        load_vqvae(weights)


def test_a_corrupt_or_missing_file_is_a_clear_error(tmp_path):
    path = tmp_path / "vae-oid.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="vae-oid.npz"):
        load_vqvae(path)
    with pytest.raises(FileNotFoundError):
        load_vqvae(tmp_path / "absent.npz")


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_and_load_round_trip(tmp_path, suffix):
    model = MaskVQVAE(TINY_CONFIG)
    save_vqvae(model, tmp_path / f"tiny{suffix}")
    loaded = load_vqvae(tmp_path / f"tiny{suffix}")
    assert loaded.config == TINY_CONFIG
    for (key, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), key


# ----------------------------------------------------------------------------- quantisation


def _narrow_config(embed_dim: int) -> VQVAEConfig:
    return VQVAEConfig(num_codes=128, embed_dim=embed_dim, encoder_widths=(4,) * 4, decoder_widths=(4,) * 5)


def test_nearest_code_is_the_brute_force_argmin():
    model = MaskVQVAE(_narrow_config(embed_dim=8))
    z = torch.randn(500, 8)
    codebook = model.codebook.vectors.detach()
    brute_force = [min(range(128), key=lambda k: float(((row - codebook[k]) ** 2).sum())) for row in z]
    assert model.codebook.nearest(z).tolist() == brute_force


class _Constant(nn.Module):
    """Stands in for the encoder: the same grid [1, E, 4, 4] for every input."""

    def __init__(self, grid: torch.Tensor):
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid.expand(x.shape[0], -1, -1, -1)


def test_codes_follow_the_grid_in_row_major_order():
    # Replace the CNNs so that grid cell (row, col) holds code vector perm[row * 4 + col] and the
    # decoder passes the grid through: the codes must come out in that order, and back.
    model = MaskVQVAE(_narrow_config(embed_dim=16))
    with torch.no_grad():
        model.codebook.vectors.copy_(torch.arange(128.0)[:, None] * torch.ones(16))  # code k = (k, k, ...)
    perm = torch.randperm(128)[:16]
    grid = model.codebook.vectors[perm].T.reshape(1, 16, 4, 4).detach()  # [1, E, 4, 4]: (r, c) holds perm[4r+c]
    model.encoder = _Constant(grid)
    model.decoder = nn.Identity()
    codes = model.encode_masks(torch.zeros(2, 64, 64))
    assert codes.tolist() == [perm.tolist()] * 2
    decoded = model.decode_codes(codes)  # identity decoder: channel 0 of the grid, [2, 4, 4]
    assert decoded[0].flatten().tolist() == perm.float().tolist()


def test_encoding_and_decoding_are_deterministic_and_batch_independent():
    model = MaskVQVAE(TINY_CONFIG).double()
    masks = torch.from_numpy(synthetic_masks(6, seed=2)).double()
    codes = model.encode_masks(masks)
    assert torch.equal(codes, model.encode_masks(masks))
    assert torch.equal(torch.cat([model.encode_masks(m[None]) for m in masks]), codes)
    assert torch.equal(model.decode_codes(codes), model.decode_codes(codes))


def test_bad_inputs_are_errors():
    model = MaskVQVAE(TINY_CONFIG)
    with pytest.raises(ValueError, match="64, 64"):
        model.encode_masks(torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="16"):
        model.decode_codes(torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="128"):
        model.decode_codes(torch.full((1, 16), 128))


def test_synthetic_masks_are_reproducible_and_not_slivers():
    masks = synthetic_masks(200, seed=7)
    assert masks.shape == (200, 64, 64) and masks.dtype == bool
    assert np.array_equal(masks, synthetic_masks(200, seed=7))
    assert not np.array_equal(masks, synthetic_masks(200, seed=8))
    assert masks.reshape(200, -1).mean(1).min() >= 0.2


# ----------------------------------------------------------------------------- training


def test_a_tiny_trained_vqvae_reconstructs_held_out_masks():
    with _one_thread():
        start = time.perf_counter()
        batches = synthetic_mask_batches(batch_size=32, seed=0)
        model = train_vqvae(batches, steps=500, config=TINY_CONFIG, seed=0)
        seconds = time.perf_counter() - start
        held_out = torch.from_numpy(synthetic_masks(256, seed=10_000))  # training uses seeds [0, step]
        reconstructed = model.decode_codes(model.encode_masks(held_out.float())) > 0
    ious = _ious(reconstructed, held_out)
    print(f"tiny VQ-VAE: held-out mean IoU {ious.mean():.4f} (min {ious.min():.3f}), {seconds:.1f} s of training")
    assert ious.mean() >= 0.9
