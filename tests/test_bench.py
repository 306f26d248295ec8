"""The bench runs end to end at tiny scale (a test that it works, never a timing assertion), its
measuring helpers are right, and every fast path computes what the reference path computes."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from minipaligemma import PaliGemma, get_config
from minipaligemma import gemma
from minipaligemma.__main__ import main
from minipaligemma.bench import attention_used, cases, default_configs
from minipaligemma.generate import decode
from minipaligemma.measure import TokenClock, decode_step_bytes, peak_memory_mib, take_turns, train_flops
from minipaligemma.paligemma import make_attn_mask

FIGURES = ["prefill_ms", "decode_b1_tok_s", "decode_b8_tok_s", "peak_mib_decode_b8", "train_step_ms",
           "peak_mib_train"]


# ---------------------------------------------------------------------------------------------
# The command.

def test_tiny_bench_prints_a_table_then_json(capsys):
    pytest.importorskip("transformers")
    threads = torch.get_num_threads()
    assert main(["bench", "--config", "tiny", "--repeats", "1", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # the bench gives the thread setting back
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("minipaligemma bench") and any("decode, batch 8 (tokens/s)" in line for line in lines)
    report = json.loads(lines[-1])
    assert report["command"] == "python -m minipaligemma bench --config tiny --device cpu --repeats 1 --threads 1"
    assert {"date", "machine", "results"} <= set(report) and report["machine"]["threads"] == 1
    tiny = report["results"]["tiny"]
    for key in FIGURES:
        assert set(tiny[key]) == {"ours", "transformers", "ratio"}, key
    for key in ("prefill_ms", "decode_b1_tok_s", "decode_b8_tok_s", "train_step_ms"):
        assert tiny[key]["ours"] > 0 and tiny[key]["transformers"] > 0 and tiny[key]["ratio"] > 0
    # Same weights, same inputs, float32: both greedy decoders write the same tokens.
    assert tiny["greedy_agree_b1"] >= 0.9 and tiny["greedy_agree_b8"] >= 0.9
    assert "eager" in tiny["attention"]["transformers"]


def test_unknown_bench_config_is_a_clear_error(capsys):
    assert main(["bench", "--config", "huge"]) == 2
    assert "unknown bench config(s) ['huge']" in capsys.readouterr().err


def test_the_package_never_imports_transformers():
    code = "import sys, minipaligemma.bench, minipaligemma.__main__; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_configurations():
    cpu, gpu = cases(torch.device("cpu")), cases(torch.device("cuda"))
    assert default_configs(torch.device("cpu")) == ["tiny", "full-width", "3b-bf16"]
    assert default_configs(torch.device("cuda")) == ["tiny", "3b-bf16", "small"]
    full = cpu["full-width"].model
    assert (full.vision.depth, full.text.depth, full.text.width, full.text.vocab_size) == (2, 2, 2304, 257152)
    assert cpu["3b-bf16"].model == get_config("paligemma2-3b-224") and cpu["3b-bf16"].dtype == torch.bfloat16
    assert cpu["3b-bf16"].train_batch is None and gpu["3b-bf16"].train_batch is not None
    assert gpu["small"].model.vision.image_size == 224 and gpu["small"].autocast and not cpu["small"].autocast


# ---------------------------------------------------------------------------------------------
# The measuring helpers.

def test_token_clock_counts_the_decoding_steps_only():
    clock = TokenClock()
    clock.put(torch.zeros(2, 5))  # transformers hands over the prompt first: not a new token
    clock.times = [10.0, 10.5, 11.0, 11.5]  # four new tokens: three steps after the prefill's
    assert clock.tokens_per_second(batch=2) == 2 * 3 / 1.5
    clock.on_token(1, 7)  # rows after the first do not start a step
    assert len(clock.times) == 4


def test_take_turns_warms_up_then_alternates_and_takes_medians():
    calls = []
    runs = {"a": lambda: calls.append("a") or len(calls), "b": lambda: calls.append("b") or 100.0}
    medians = take_turns(runs, repeats=3)
    assert calls == ["a", "b"] * 4
    assert medians == {"a": 5, "b": 100.0}  # a's timed runs returned 3, 5, 7


def test_peak_memory_sees_a_temporary_allocation():
    peak = peak_memory_mib(lambda: torch.ones(32, 2**20).sum(), torch.device("cpu"))  # 128 MiB, then freed
    if peak is None:
        pytest.skip("no /proc/self/clear_refs on this system")
    assert 100 < peak < 1000


def test_flops_and_bytes_count_each_parameter_where_it_works():
    cfg = get_config("tiny")
    with torch.device("meta"):
        model = PaliGemma(cfg)
    t = cfg.text
    llm = sum(p.numel() for p in model.llm.parameters())
    assert decode_step_bytes(model, batch=1, context=0) == 4 * llm
    cache = 2 * t.depth * t.num_kv_heads * t.head_dim * 10 * 3
    assert decode_step_bytes(model, batch=3, context=10) == 4 * (llm + cache)
    embedding = model.llm.embed.weight.numel()
    image_side = sum(p.numel() for p in model.vision.parameters()) + sum(p.numel() for p in model.projector.parameters())
    expected = 6 * 2 * (image_side * 16 + (llm - embedding) * (16 + 8) + embedding * 8)
    assert train_flops(model, batch=2, text_len=8) == expected


# ---------------------------------------------------------------------------------------------
# Fast paths equal the reference path.

def random_attention_inputs(b=2, n=4, k=2, t=5, s=7, h=8, dtype=torch.float32, seed=0):
    """q [B, N, T, H], k and v [B, K, S, H] and a random mask [B, T, S] in which query 1 of
    example 0 may see nothing (as a padding token) and query 2 of example 1 sees everything."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, t, h, generator=gen).to(dtype)
    k, v = torch.randn(2, b, k, s, h, generator=gen).to(dtype)
    mask = torch.rand(b, t, s, generator=gen) > 0.4
    mask[0, 1] = False
    mask[1, 2] = True
    return q, k, v, mask


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)])
def test_fused_attention_equals_reference_path(heads):
    q, k, v, mask = random_attention_inputs(n=heads[0], k=heads[1])
    reference = gemma.attend(q, k, v, mask, cap=None)
    fused = gemma.fused_attend(q, k, v, mask)
    assert (fused - reference).abs().max() < 1e-5
    assert torch.allclose(reference[0, :, 1], v[0].mean(dim=1).repeat_interleave(heads[0] // heads[1], dim=0),
                          atol=1e-6)  # the query that sees nothing: a uniform average, never NaN


def test_fused_attention_equals_reference_path_in_bfloat16():
    q, k, v, mask = random_attention_inputs(dtype=torch.bfloat16)
    reference = gemma.attend(q, k, v, mask, cap=None).float()
    fused = gemma.fused_attend(q, k, v, mask).float()
    assert (fused - reference).norm() / reference.norm() < 2e-2


def test_reference_attention_matches_the_einsum_formula():
    """The grouped matrix products of `attend` are big_vision's einsum (docs/checkpoints.md §3.2), head by head."""
    q, k, v, mask = random_attention_inputs(n=6, k=3)
    logits = torch.einsum("bkgth,bksh->bkgts", q.reshape(2, 3, 2, 5, 8), k)
    logits = (50 * torch.tanh(logits / 50)).masked_fill(~mask[:, None, None], torch.finfo(torch.float32).min)
    expected = torch.einsum("bkgts,bksh->bkgth", logits.softmax(-1), v).reshape(2, 6, 5, 8)
    assert (gemma.attend(q, k, v, mask, cap=50.0) - expected).abs().max() < 1e-6


@pytest.fixture(scope="module")
def gemma1_model():
    torch.manual_seed(1)
    model = PaliGemma(get_config("tiny-gemma1")).eval()
    with torch.no_grad():
        for p in model.parameters():  # every parameter random (norms too), big enough to matter
            p.normal_(0, 0.3)
    return model


def padded_inputs(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.text.vocab_size, (2, 9), generator=gen)
    mask_ar = torch.tensor([[0] * 5 + [1] * 4, [0] * 4 + [1] * 5])
    mask_input = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    pixels = torch.rand(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen) * 2 - 1
    return pixels, ids, mask_ar, mask_input


def with_attention(model: PaliGemma, implementation: str) -> PaliGemma:
    """The same weights in a model whose config asks for another attention implementation."""
    cfg = model.config
    twin = PaliGemma(replace(cfg, text=replace(cfg.text, attn_implementation=implementation))).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def test_gemma1_model_with_fused_attention_equals_reference_path(gemma1_model):
    """A padded prefix + suffix batch, then cached decoding, with and without the fused kernel."""
    cfg = gemma1_model.config
    pixels, ids, mask_ar, mask_input = padded_inputs(cfg)
    prompt = (ids[:, :4], torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))

    def run(model):
        with torch.no_grad():
            logits = model(pixels, ids, mask_ar, mask_input)  # [B, T, V]
        tokens = decode(model, pixels, *prompt, max_new_tokens=6, eos_id=-1)  # [B, 6]
        return logits, tokens

    plain_logits, plain_tokens = run(with_attention(gemma1_model, "eager"))
    fused_logits, fused_tokens = run(with_attention(gemma1_model, "sdpa"))
    real = mask_input.bool()
    assert (fused_logits - plain_logits)[real].abs().max() < 1e-5
    assert torch.equal(fused_tokens, plain_tokens)


def fused_calls(text_cfg, monkeypatch) -> list[str]:
    """The calls a decoder built from text_cfg makes to the fused kernel in one forward pass."""
    calls = []
    monkeypatch.setattr(gemma, "fused_attend", lambda *args: calls.append("fused") or gemma.attend(*args, None))
    model = gemma.Gemma(text_cfg).eval()
    x, positions = torch.randn(1, 3, text_cfg.width), torch.arange(3)[None]
    with torch.no_grad():
        model(x, positions, make_attn_mask(torch.ones(1, 3), torch.ones(1, 3)))
    return calls


def test_decoder_layers_take_the_fused_path_only_without_soft_cap(monkeypatch):
    for preset, expected in (("tiny-gemma1", ["fused"] * 2), ("tiny", [])):
        calls = fused_calls(get_config(preset).text, monkeypatch)
        assert calls == expected, preset


def test_the_config_chooses_the_attention_implementation(monkeypatch):
    """"sdpa" is the default; "eager" keeps a Gemma 1 decoder off the fused kernel; a soft-capped
    decoder runs eager whatever it asks. The bench reports what each one runs."""
    gemma1, gemma2 = get_config("tiny-gemma1"), get_config("tiny")
    eager1 = replace(gemma1, text=replace(gemma1.text, attn_implementation="eager"))
    assert gemma1.text.attn_implementation == gemma2.text.attn_implementation == "sdpa"
    assert fused_calls(eager1.text, monkeypatch) == []
    assert [attention_used(c)["ours"] for c in (gemma1, eager1, gemma2)] == [
        "image: sdpa; text: sdpa", "image: sdpa; text: eager", "image: sdpa; text: eager"]
