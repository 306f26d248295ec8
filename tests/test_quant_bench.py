"""The quantized bench runs end to end at tiny size (a test that it works, never a timing
assertion), builds its variants as it says, and counts the bytes a quantized decode step reads."""

import json

import pytest
import torch
from torch import nn

from minipaligemma import get_config
from minipaligemma.__main__ import main
from minipaligemma.measure import decode_step_bytes
from minipaligemma.measure import random_model
from minipaligemma.quant_bench import fastest_input_dtype, quantized_case
from minipaligemma.quantize import quantize_model

VARIANTS = [("ours", "float32", "float"), ("ours", "bfloat16", "float"), ("ours", "int8 per output channel"),
            ("ours", "int4 (affine) in groups of 64"), ("transformers", "float")]


def test_tiny_quantized_bench_prints_a_table_then_json(capsys):
    pytest.importorskip("transformers")
    assert main(["bench", "--config", "quantized", "--size", "tiny", "--repeats", "1", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("minipaligemma quantized bench")
    assert any(line.startswith("ours bfloat16, int4 (affine) in groups of 64") for line in lines)
    report = json.loads(lines[-1])
    assert report["command"] == ("python -m minipaligemma bench --config quantized --device cpu --size tiny "
                                 "--repeats 1 --threads 1")
    assert set(report["probe_ms"]) == {"float32", "bfloat16", "int8 float32", "int8 bfloat16", "int4 float32",
                                       "int4 bfloat16"}
    assert report["copy_bandwidth_gb_s"] > 0
    variants = report["variants"]
    assert [v["who"] for v in variants] == [who for who, *_ in VARIANTS]
    assert [v["dtype"] for v in variants[:2]] == ["float32", "bfloat16"]
    assert [v["weights"] for v in variants] == [names[-1] for _, *names in VARIANTS]
    for v in variants:
        for key in ("prefill_ms", "decode_b1_tok_s", "decode_b8_tok_s"):
            assert 0 < v[key]["low"] <= v[key]["median"] <= v[key]["high"], (v["weights"], key)
        assert v["peak_rss_mib"] is None or v["peak_rss_mib"] > 0
    ours = variants[:4]
    for v in ours:
        assert v["floor_b1_tok_s"] > 0 and v["of_floor_b1"] > 0 and v["step_bytes_b8"] > v["step_bytes_b1"]
    # Fewer bytes per weight: float32 > bfloat16 > int8 > int4, for the whole model and per step.
    assert ours[0]["weight_bytes"] > ours[1]["weight_bytes"] > ours[2]["weight_bytes"] > ours[3]["weight_bytes"]
    assert ours[0]["step_bytes_b1"] > ours[1]["step_bytes_b1"] > ours[2]["step_bytes_b1"] > ours[3]["step_bytes_b1"]
    # Same weights in every variant of ours: int8 writes float32's greedy tokens.
    assert ours[2]["greedy_agree_float32"] >= 0.75
    assert variants[-1]["vs_transformers_b1"] == 1.0


def test_quantized_config_runs_alone_and_size_belongs_to_it(capsys):
    assert main(["bench", "--config", "quantized,tiny"]) == 2
    assert "--config quantized runs alone" in capsys.readouterr().err
    assert main(["bench", "--config", "tiny", "--size", "tiny"]) == 2
    assert "--size is an option of --config quantized" in capsys.readouterr().err


def test_random_models_hold_the_same_weights_in_every_dtype():
    case = quantized_case("tiny")
    full, half = random_model(case.model, torch.float32), random_model(case.model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    for (name, a), b in zip(full.named_parameters(), half.parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_a_quantized_decode_step_reads_codes_and_scales():
    """Counted from the layer shapes: int8 is a byte per weight plus a bfloat16 scale per row."""
    cfg = get_config("tiny")
    model = random_model(quantized_case("tiny").model, torch.bfloat16)
    linears = [m for m in model.llm.modules() if isinstance(m, nn.Linear)]
    norms = sum(p.numel() for name, p in model.llm.named_parameters() if "norm" in name)
    vocab, width = model.llm.embed.weight.shape
    expected = (sum(m.out_features * (m.in_features + 2) for m in linears) + vocab * (width + 2) + 2 * norms)
    quantize_model(model, "int8", kernel="cpu")
    t = cfg.text
    cache = 2 * t.depth * t.num_kv_heads * t.head_dim * 10 * 3 * 2
    assert decode_step_bytes(model, batch=3, context=10) == expected + cache


def test_the_probe_picks_each_scheme_its_faster_input_dtype():
    probe = {"float32": 5.2, "bfloat16": 8.7, "int8 float32": 20.0, "int8 bfloat16": 7.8,
             "int4 float32": 30.0, "int4 bfloat16": 7.9}
    assert fastest_input_dtype(probe, None) == torch.float32
    assert fastest_input_dtype(probe, "int8") == torch.bfloat16
    assert fastest_input_dtype(probe, "int4") == torch.bfloat16
