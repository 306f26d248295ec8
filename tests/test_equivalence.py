"""Our model against transformers, every parameter random, on the same weights and inputs.

Each test loads transformers' state dict into our model through the strict loader, runs both,
and compares the outputs that both implementations define. Failure messages include the
layer-by-layer report of minipaligemma.compare, which names the first layer that diverges.
Errors measured are printed (pytest -s shows them).
"""

from dataclasses import replace

import pytest
import torch

from hf_reference import hf_gemma, hf_inputs, hf_paligemma, hf_siglip, ours_from_hf
from minipaligemma import Gemma, PaliGemma, SigLIPEncoder, get_config, make_attn_mask, prefix_lm_loss
from minipaligemma.compare import compare_layers, paligemma_hf_layer_pairs


def padded_batch(vocab_size: int, seed: int = 0):
    """Two examples with different prefix and suffix lengths, the first right-padded.

    Example 0: 4 prefix tokens (BOS, two words, "\\n"), 5 suffix tokens (EOS included), 3 pads.
    Example 1: 6 prefix tokens, 6 suffix tokens, no padding.
    """
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (2, 12), generator=gen)
    mask_ar = torch.tensor([[0] * 4 + [1] * 5 + [1] * 3, [0] * 6 + [1] * 6])
    mask_input = torch.tensor([[1] * 9 + [0] * 3, [1] * 12])
    input_ids[0, 9:] = 0  # pad id
    mask_loss = mask_ar * mask_input
    return input_ids, mask_ar, mask_input, mask_loss


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_paligemma_pair(cfg, seed=0, num_frames=1, dtype=torch.float32):
    """Build both models, run them on a padded batch; return everything a test compares."""
    hf = hf_paligemma(cfg, seed).to(dtype)
    ours = ours_from_hf(cfg, hf, dtype=dtype)
    input_ids, mask_ar, mask_input, mask_loss = padded_batch(cfg.text.vocab_size, seed)
    size = cfg.vision.image_size
    pixels = torch.rand(2, num_frames, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    hf_kwargs = hf_inputs(cfg, input_ids, mask_ar, mask_input, num_frames)
    with torch.no_grad():
        ours_logits = ours(pixels.to(dtype), input_ids, mask_ar, mask_input)
        hf_out = hf(pixel_values=pixels.flatten(0, 1).to(dtype), **hf_kwargs)
    hf_logits = hf_out.logits[:, cfg.num_image_tokens * num_frames:]
    return dict(hf=hf, ours=ours, pixels=pixels, ids=input_ids, mask_ar=mask_ar, mask_input=mask_input,
                mask_loss=mask_loss, ours_logits=ours_logits, hf_logits=hf_logits, hf_kwargs=hf_kwargs)


def layer_report(r, num_frames=1) -> str:
    """The layer-by-layer comparison, for failure messages."""
    report = compare_layers(
        r["ours"], r["hf"], paligemma_hf_layer_pairs(r["ours"].config),
        run_ours=lambda m: m(r["pixels"], r["ids"], r["mask_ar"], r["mask_input"]),
        run_ref=lambda m: m(pixel_values=r["pixels"].flatten(0, 1), **r["hf_kwargs"]))
    return str(report)


def valid_max_diff(r) -> float:
    """Largest |logit difference| over real (non-padding) text positions."""
    valid = r["mask_input"].bool()
    return (r["ours_logits"] - r["hf_logits"])[valid].abs().max().item()


def test_siglip_tower_matches_transformers():
    cfg = get_config("tiny").vision
    hf = hf_siglip(cfg, seed=1)
    ours = ours_from_hf(cfg, hf, cls=SigLIPEncoder)
    pixels = torch.rand(3, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        diff = (ours(pixels) - hf(pixel_values=pixels).last_hidden_state).abs().max().item()
    print(f"SigLIP tower fp32 max |diff| {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("preset", ["tiny-gemma1", "tiny"])
def test_gemma_decoder_matches_transformers(preset):
    """Gemma 1 with one KV head; Gemma 2 with GQA ratio 2 and query_pre_attn_scalar 24 != head_dim 16."""
    cfg = get_config(preset).text
    hf = hf_gemma(cfg, seed=2)
    ours = ours_from_hf(cfg, hf, cls=Gemma)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    causal = make_attn_mask(torch.ones_like(ids), torch.ones_like(ids))
    positions = torch.arange(10).expand(2, 10)
    with torch.no_grad():
        logits = ours.logits(ours(ours.embed_tokens(ids), positions, causal))
        diff = (logits - hf(input_ids=ids).logits).abs().max().item()
    print(f"{preset} decoder fp32 max |delta logit| {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("preset", ["tiny-gemma1", "tiny"])
def test_paligemma_matches_transformers_on_padded_batch(preset):
    r = run_paligemma_pair(get_config(preset), seed=3)
    diff = valid_max_diff(r)
    print(f"{preset} PaliGemma fp32 max |delta logit| {diff:.2e}")
    assert diff <= 1e-5, layer_report(r)


def test_paligemma_loss_matches_transformers():
    """transformers averages over all supervised tokens of the batch: our reduction="token"."""
    cfg = get_config("tiny")
    r = run_paligemma_pair(cfg, seed=4)
    p = cfg.num_image_tokens
    labels = r["hf_kwargs"]["input_ids"].masked_fill(r["hf_kwargs"]["token_type_ids"] == 0, -100)
    labels[:, p:] = labels[:, p:].masked_fill(r["mask_input"] == 0, -100)
    with torch.no_grad():
        hf_loss = r["hf"](pixel_values=r["pixels"].flatten(0, 1), labels=labels, **r["hf_kwargs"]).loss
    ours = prefix_lm_loss(r["ours_logits"], r["ids"], r["mask_loss"], reduction="token")
    print(f"loss ours {ours.item():.6f} transformers {hf_loss.item():.6f}")
    assert abs(ours.item() - hf_loss.item()) <= 1e-5
    # big_vision's per-example mean differs here: the two examples have 5 and 6 targets.
    per_example = prefix_lm_loss(r["ours_logits"], r["ids"], r["mask_loss"], reduction="example")
    assert abs(per_example.item() - ours.item()) > 1e-6


def test_multiple_frames_match_transformers():
    r = run_paligemma_pair(get_config("tiny"), seed=5, num_frames=3)
    diff = valid_max_diff(r)
    print(f"3 frames per example fp32 max |delta logit| {diff:.2e}")
    assert diff <= 1e-5


def test_sliding_window_option_reproduces_transformers():
    """With a window of 6 (shorter than the 16 image tokens + text), the local layers differ
    from global ones, and our option must match transformers' Gemma 2 sliding layers."""
    base = get_config("tiny")
    cfg = replace(base, text=replace(base.text, sliding_window=6))
    r = run_paligemma_pair(cfg, seed=6)
    diff = valid_max_diff(r)
    print(f"sliding window 6 fp32 max |delta logit| {diff:.2e}")
    assert diff <= 1e-5
    # And the window really changes the function (else this test would prove nothing).
    unwindowed = PaliGemma(base).eval()
    unwindowed.load_state_dict(r["ours"].state_dict())
    with torch.no_grad():
        plain = unwindowed(r["pixels"], r["ids"], r["mask_ar"], r["mask_input"])
    assert (plain - r["ours_logits"]).abs().max() > 1e-3


def full_width(preset: str, vision_depth: int, text_depth: int, vocab: int = 1024):
    """A real preset's widths, heads and head dims with few layers and a small vocabulary."""
    cfg = get_config(preset)
    return replace(cfg, vision=replace(cfg.vision, depth=vision_depth),
                   text=replace(cfg.text, depth=text_depth, vocab_size=vocab))


@pytest.mark.parametrize("preset,vision_depth,text_depth", [("paligemma2-3b-224", 2, 2),
                                                             ("paligemma2-28b-224", 1, 1)])
def test_full_width_matches_transformers(preset, vision_depth, text_depth):
    cfg = full_width(preset, vision_depth, text_depth)
    r = run_paligemma_pair(cfg, seed=7)
    valid = r["mask_input"].bool()
    err = rel_err(r["ours_logits"][valid], r["hf_logits"][valid])
    print(f"{preset} ({vision_depth}+{text_depth} layers) fp32 relative error {err:.2e}")
    assert err <= 1e-5, layer_report(r)


def test_bf16_matches_transformers_fp32():
    """bf16 ours against fp32 transformers (the truth): relative error and top-1 agreement."""
    cfg = full_width("paligemma2-3b-224", 1, 2)
    r32 = run_paligemma_pair(cfg, seed=8)
    ours16 = ours_from_hf(cfg, r32["hf"], dtype=torch.bfloat16)
    with torch.no_grad():
        logits16 = ours16(r32["pixels"].bfloat16(), r32["ids"], r32["mask_ar"], r32["mask_input"]).float()
    valid = r32["mask_input"].bool()
    err = rel_err(logits16[valid], r32["hf_logits"][valid])
    top1 = (logits16[valid].argmax(-1) == r32["hf_logits"][valid].argmax(-1)).float().mean().item()
    print(f"bf16 vs transformers fp32: relative error {err:.2e}, top-1 agreement {top1:.1%}")
    assert err <= 2e-2
    assert top1 >= 0.99
