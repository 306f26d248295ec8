"""The fine-tuning bench's wiring (minipaligemma/finetune_bench.py): the full-depth 3B it builds
without a float32 copy, and the planner's guard that skips a method which cannot fit. The bench's
figures themselves are measured, not tested."""

import pytest
import torch

from minipaligemma.config import get_config
from minipaligemma.finetune_bench import bench_config, finetune_bench, main
from minipaligemma.measure import random_model


def counted_by_hand(cfg) -> int:
    """PaliGemma's parameter count from its configuration's numbers alone."""
    v, t = cfg.vision, cfg.text
    patches = (v.image_size // v.patch_size) ** 2
    siglip_block = 4 * (v.width * v.width + v.width) + 2 * 2 * v.width + 2 * v.width * v.mlp_dim + v.mlp_dim + v.width
    siglip = 3 * v.patch_size**2 * v.width + v.width + patches * v.width + v.depth * siglip_block + 2 * v.width
    attention = t.width * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)  # q, o; k, v (no biases)
    gemma_block = attention + 3 * t.width * t.mlp_dim + 4 * t.width  # gate, up, down; four norms (Gemma 2)
    gemma = t.vocab_size * t.width + t.depth * gemma_block + t.width
    return siglip + v.width * t.width + t.width + gemma  # projector between the towers


def test_the_3b_config_is_paligemma_2_at_full_depth_in_bfloat16_and_builds_on_meta():
    cfg, dtype = bench_config("3b-bf16")
    preset = get_config("paligemma2-3b-224")
    assert dtype == "bfloat16"
    assert (cfg.vision, cfg.text.depth, cfg.text.width) == (preset.vision, preset.text.depth, preset.text.width)
    assert cfg.text.final_softcap is None  # as stage 3 transfers
    model = random_model(cfg, dtype, device="meta")
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16} and {p.device.type for p in params} == {"meta"}
    assert sum(p.numel() for p in params) == counted_by_hand(cfg)
    assert 3.0e9 < counted_by_hand(cfg) < 3.1e9  # "3B"


def test_random_model_draws_every_weight_in_its_dtype():
    model = random_model(get_config("tiny"), "bfloat16")
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, name
        fan_in = p[0].numel() if p.dim() > 1 else 4
        if p.numel() >= 1000:  # std within 10 % of the intended one; to_empty's garbage or zeros are far off
            assert abs(p.float().std().item() * fan_in**0.5 - 1) < 0.1, name


def test_a_method_planned_beyond_the_limit_is_reported_not_run(capsys):
    report = finetune_bench(batch=1, text_len=16, methods=("full",), config_name="full-width", max_gib=8)
    (row,) = report["rows"]
    # Full fine-tuning in float32 holds weights, gradients and two AdamW moments: 16 bytes a weight.
    assert row["planned_mib"] * 2**20 > 16 * row["trainable"] > 16 * 7e8
    assert row["peak_mib"] is None and "> 8.0 GiB" in row["not_run"]
    assert "not run" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--methods", "lora,dora"], ["--config", "28b"]])
def test_bad_options_are_one_clear_error(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert "error:" in capsys.readouterr().err
