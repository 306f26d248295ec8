"""Properties the parts must have, on any input hypothesis can think of."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minipaligemma import PaliGemma, get_config, make_attn_mask
from minipaligemma.config import TextConfig
from minipaligemma.gemma import Attention, apply_rope, rope_angles, softcap

TINY = get_config("tiny")
MODEL = PaliGemma(TINY).eval().requires_grad_(False)
with torch.no_grad():  # random norms too, so no property holds by accident of zero weights
    for p in MODEL.parameters():
        p.normal_(0, 0.3)
FAST = settings(max_examples=25, deadline=None)


@st.composite
def prefix_suffix_example(draw):
    """Token ids for one example: a prefix of 1-6 tokens, a suffix of 1-6, and an image."""
    prefix_len = draw(st.integers(1, 6))
    suffix_len = draw(st.integers(1, 6))
    ids = draw(st.lists(st.integers(0, TINY.text.vocab_size - 1), min_size=prefix_len + suffix_len,
                        max_size=prefix_len + suffix_len))
    seed = draw(st.integers(0, 2**16))
    size = TINY.vision.image_size
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    mask_ar = torch.tensor([[0] * prefix_len + [1] * suffix_len])
    return pixels, torch.tensor([ids]), mask_ar, prefix_len


@FAST
@given(prefix_suffix_example(), st.data())
def test_suffix_logit_never_depends_on_later_tokens(example, data):
    pixels, ids, mask_ar, prefix_len = example
    t = ids.shape[1]
    j = data.draw(st.integers(prefix_len, t - 1), label="changed suffix position")
    changed = ids.clone()
    changed[0, j] = (ids[0, j] + 1) % TINY.text.vocab_size
    before, after = MODEL(pixels, ids, mask_ar)[0, :j], MODEL(pixels, changed, mask_ar)[0, :j]
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.allclose(MODEL(pixels, ids, mask_ar)[0, j:], MODEL(pixels, changed, mask_ar)[0, j:])


@FAST
@given(prefix_suffix_example())
def test_prefix_tokens_see_each_other_both_ways(example):
    pixels, ids, mask_ar, prefix_len = example
    if prefix_len < 2:
        ids, mask_ar, prefix_len = torch.cat([ids[:, :1], ids], 1), torch.cat([mask_ar[:, :1], mask_ar], 1), 2
    # The mask itself: the whole prefix block is visible from every prefix token.
    mask = make_attn_mask(mask_ar, torch.ones_like(mask_ar))[0]
    assert mask[:prefix_len, :prefix_len].all()
    # And the model: the first prefix token's output changes when the last prefix token does.
    changed = ids.clone()
    changed[0, prefix_len - 1] = (ids[0, prefix_len - 1] + 1) % TINY.text.vocab_size
    assert not torch.allclose(MODEL(pixels, ids, mask_ar)[0, 0], MODEL(pixels, changed, mask_ar)[0, 0])


@FAST
@given(prefix_suffix_example(), st.lists(st.integers(0, TINY.text.vocab_size - 1), min_size=1, max_size=5))
def test_padding_changes_no_valid_output(example, pad_ids):
    pixels, ids, mask_ar, _ = example
    n = len(pad_ids)
    padded_ids = torch.cat([ids, torch.tensor([pad_ids])], 1)
    padded_ar = torch.cat([mask_ar, torch.ones(1, n, dtype=torch.long)], 1)
    mask_input = torch.cat([torch.ones_like(ids), torch.zeros(1, n, dtype=torch.long)], 1)
    plain = MODEL(pixels, ids, mask_ar)
    padded = MODEL(pixels, padded_ids, padded_ar, mask_input)[:, : ids.shape[1]]
    assert torch.allclose(plain, padded, atol=1e-5)


@FAST
@given(st.integers(0, 500), st.integers(0, 500), st.integers(-200, 200), st.integers(0, 2**16))
def test_rope_scores_depend_only_on_position_difference(i, j, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 1, 1, 32, generator=gen, dtype=torch.float64)

    def score(pq, pk):
        rq = apply_rope(q, torch.tensor([[pq]]), 10_000.0)
        rk = apply_rope(k, torch.tensor([[pk]]), 10_000.0)
        return (rq * rk).sum().item()

    # RoPE's angles are computed in float32, so large positions round: compare loosely.
    assert abs(score(i, j) - score(i + abs(shift), j + abs(shift))) < 1e-3 * (1 + abs(score(i, j)))


@FAST
@given(st.sampled_from([(4, 1), (4, 2), (8, 2), (6, 3)]), st.integers(1, 6), st.integers(0, 2**16))
def test_gqa_equals_mha_with_repeated_kv_heads(heads, t, seed):
    num_heads, num_kv = heads
    gqa_cfg = TextConfig(width=32, depth=1, mlp_dim=64, num_heads=num_heads, num_kv_heads=num_kv, head_dim=8,
                         query_pre_attn_scalar=8, vocab_size=16)
    mha_cfg = TextConfig(width=32, depth=1, mlp_dim=64, num_heads=num_heads, num_kv_heads=num_heads, head_dim=8,
                         query_pre_attn_scalar=8, vocab_size=16)
    torch.manual_seed(seed)
    gqa, mha = Attention(gqa_cfg, 0), Attention(mha_cfg, 0)
    group = num_heads // num_kv
    mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
    mha.o_proj.load_state_dict(gqa.o_proj.state_dict())
    with torch.no_grad():
        for name in ("k_proj", "v_proj"):  # KV head n of MHA := KV head n // group of GQA
            w = getattr(gqa, name).weight.reshape(num_kv, 8, 32)
            getattr(mha, name).weight.copy_(w.repeat_interleave(group, dim=0).reshape(num_heads * 8, 32))
    x = torch.randn(2, t, 32)
    rope = rope_angles(torch.arange(t).expand(2, t), 8, gqa_cfg.rope_base)
    mask = make_attn_mask(torch.ones(2, t), torch.ones(2, t))
    assert torch.allclose(gqa(x, rope, mask), mha(x, rope, mask), atol=1e-6)


@FAST
# float32 subnormals left out: 1.4e-45 / cap underflows to 0, and tanh(0) has no sign to keep.
# width=32 matters: 1.4e-45 is a normal float64, so allow_subnormal alone would still draw it.
@given(st.lists(st.floats(-2.0**100, 2.0**100, allow_subnormal=False, width=32), min_size=1, max_size=20), st.floats(0.5, 100))
def test_softcapped_values_stay_within_cap(values, cap):
    x = torch.tensor(values, dtype=torch.float32)
    capped = softcap(x, cap)
    assert (capped.abs() <= cap).all()
    assert torch.equal(torch.sign(capped), torch.sign(x))  # order and sign preserved


@FAST
@given(prefix_suffix_example())
def test_model_logits_stay_within_final_cap(example):
    pixels, ids, mask_ar, _ = example
    big = PaliGemma(TINY).eval().requires_grad_(False)
    big.load_state_dict(MODEL.state_dict())
    big.llm.embed.weight.mul_(100)  # huge logits before the cap
    assert (big(pixels, ids, mask_ar).abs() <= TINY.text.final_softcap).all()
