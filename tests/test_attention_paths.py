"""The attention implementations and the compiled decode compute what the reference computes.

"eager" (gemma.attend) is the reference. "sdpa" and "flex" must give the same logits at every
real token, for PaliGemma 1 and 2, on padded batches, in a prefill and in cached decoding
steps, with and without Gemma 2's sliding window, in float32 and (within its rounding) in
bfloat16; the static cache (compiled.py) must give the same logits as the growing one, and
decode(compile=True) the same tokens as decode().

flex_attention is compiled on first use for every shape (seconds to tens of seconds on a CPU),
so these tests use few shapes. Padding queries see nothing; eager gives them the average of all
values and flex zeros, so logits are compared at real tokens only.
"""

import copy
from dataclasses import replace

import pytest
import torch

from hf_reference import hf_paligemma, ours_from_hf
from minipaligemma import get_config
from minipaligemma.generate import decode, extend, new_cache, prefill
from minipaligemma.paligemma import set_attention
from test_generate import NO_EOS, amplify_blocks_, prompt_batch

STEPS = 4

# torch.compile would fall back to uncompiled flex_attention, with this warning, after compiling
# it for 8 shapes (torch._dynamo.config.recompile_limit); an error here, so no test passes on
# the fallback. The tests compile more shapes (two decoders, two dtypes, prefill and decode
# shapes) than a decoding run does, hence a higher limit while they run.
pytestmark = pytest.mark.filterwarnings("error:.*flex_attention called without torch.compile")


@pytest.fixture(autouse=True, scope="module")
def more_compiled_shapes():
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


def tiny_model(name: str):
    """A tiny model whose blocks matter (test_generate.amplify_blocks_), eager attention."""
    cfg = get_config(name)
    hf = hf_paligemma(cfg, seed=3)
    amplify_blocks_(hf)
    return set_attention(ours_from_hf(cfg, hf), "eager")


@pytest.fixture(scope="module", params=["tiny-gemma1", "tiny"])
def model(request):
    """PaliGemma 1 and 2 at toy width. The tests that compile most (each shape costs tens of
    seconds on a CPU) name the decoders they need (indirect parametrization)."""
    return tiny_model(request.param)


def teacher_forced(model, batch, tokens, static: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, T, V] of one forward over prompt + tokens, logits [B, K, V] of a prefill and
    K - 1 cached steps fed `tokens` [B, K]), for the padded prompt `batch`."""
    pixels, ids, mask_ar, mask_input = batch
    ones = torch.ones_like(tokens)
    with torch.inference_mode():
        full = model(pixels, torch.cat([ids, tokens], 1), torch.cat([mask_ar, ones], 1),
                     torch.cat([mask_input, ones], 1))  # [B, T + K, V]
    cache = new_cache(model, pixels, ids.shape[1], tokens.shape[1], static=static)
    steps = [prefill(model, pixels, ids, mask_ar, mask_input, cache)]
    steps += [extend(model, column, cache) for column in tokens[:, :-1].T]
    return full, torch.stack(steps, dim=1)  # [B, T + K, V], [B, K, V]


def real_tokens(mask_input, length):
    """Which of the prompt [B, T] + K new tokens are real: [B, length = T + K], bool."""
    return torch.cat([mask_input, torch.ones(len(mask_input), length - mask_input.shape[1])], 1).bool()


def assert_same_at_real_tokens(got, want, mask_input, atol, rtol=0.0):
    """Logits [B, T + K, V] equal where the token is real (prompt padding is skipped)."""
    real = real_tokens(mask_input, got.shape[1])
    torch.testing.assert_close(got[real], want[real], atol=atol, rtol=rtol)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("implementation", ["sdpa", "flex"])
def test_each_implementation_equals_eager(model, implementation, side):
    batch = prompt_batch(model.config, [3, 6], side=side)
    tokens = torch.randint(3, model.config.text.vocab_size, (2, STEPS), generator=torch.Generator().manual_seed(1))
    want = teacher_forced(set_attention(model, "eager"), batch, tokens, static=False)
    got = teacher_forced(set_attention(model, implementation), batch, tokens, static=implementation == "flex")
    set_attention(model, "eager")
    assert_same_at_real_tokens(got[0], want[0], batch[3], atol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_flex_equals_eager_with_the_sliding_window(side):
    """A window of 5 on a sequence of 16 image + 6 text tokens, padded on either side: the local
    layers hide keys that the global ones see, except inside the bidirectional block
    (paligemma.near_enough); positions, and so the window, count real tokens only."""
    cfg = get_config("tiny")
    cfg = replace(cfg, text=replace(cfg.text, sliding_window=5))
    hf = hf_paligemma(cfg, seed=4)
    amplify_blocks_(hf)
    model = set_attention(ours_from_hf(cfg, hf), "eager")
    batch = prompt_batch(cfg, [6, 4], side=side)
    tokens = torch.randint(3, cfg.text.vocab_size, (2, STEPS), generator=torch.Generator().manual_seed(2))
    want = teacher_forced(model, batch, tokens, static=False)
    got = teacher_forced(set_attention(model, "flex"), batch, tokens, static=True)
    assert_same_at_real_tokens(got[0], want[0], batch[3], atol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)
    # The window matters here: without it, the logits differ.
    plain = set_attention(ours_from_hf(replace(cfg, text=replace(cfg.text, sliding_window=None)), hf), "eager")
    assert not torch.allclose(teacher_forced(plain, batch, tokens, static=False)[1], want[1], atol=1e-3)


@pytest.mark.parametrize(("model", "implementation"), [("tiny-gemma1", "sdpa"), ("tiny-gemma1", "flex"),
                                                     ("tiny", "flex")], indirect=["model"])
def test_each_implementation_in_bfloat16_stays_near_eager(model, implementation):
    """bfloat16 keeps 8 bits of mantissa: the paths round differently, so the logits of the full
    forward (at real tokens) and of the prefill and cached steps agree with eager's to a bfloat16
    tolerance (relative 2 %, and an absolute floor of 2 % of the logit scale) rather than to
    float32's, and mostly pick the same token. Not sdpa on PaliGemma 2: it cannot soft-cap, and
    runs eager there."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    batch = prompt_batch(model.config, [3, 6])
    batch = (batch[0].to(torch.bfloat16), *batch[1:])
    tokens = torch.randint(3, model.config.text.vocab_size, (2, STEPS), generator=torch.Generator().manual_seed(1))
    want = teacher_forced(bf16, batch, tokens, static=False)
    got = teacher_forced(set_attention(bf16, implementation), batch, tokens, static=implementation == "flex")
    real = real_tokens(batch[3], want[0].shape[1])
    for fast, reference in ((got[0][real], want[0][real]), (got[1], want[1])):  # [n, V], [B, K, V]
        fast, reference = fast.float(), reference.float()
        torch.testing.assert_close(fast, reference, atol=0.02 * reference.abs().max(), rtol=0.02)
        assert (fast.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.75


def test_the_static_cache_equals_the_growing_one(model):
    batch = prompt_batch(model.config, [3, 6], side="left")
    tokens = torch.randint(3, model.config.text.vocab_size, (2, STEPS), generator=torch.Generator().manual_seed(5))
    _, want = teacher_forced(model, batch, tokens, static=False)
    _, got = teacher_forced(model, batch, tokens, static=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("model", "implementation"), [("tiny-gemma1", "eager"), ("tiny", "eager"),
                                                     ("tiny", "flex")], indirect=["model"])
def test_the_compiled_decode_writes_the_same_tokens(model, implementation):
    """decode(compile=True) (a static cache, the step under torch.compile) against eager decode(),
    on a padded batch whose rows have different lengths, for PaliGemma 1 (eager attention: flex
    in a compiled step would cost another 40 s of compiling on a CPU) and 2. The tokens must
    vary, or equality says little."""
    pixels, ids, mask_ar, mask_input = prompt_batch(model.config, [3, 6])
    want = decode(model, pixels, ids, mask_ar, mask_input, 6, eos_id=NO_EOS)
    try:
        got = decode(set_attention(model, implementation), pixels, ids, mask_ar, mask_input, 6, eos_id=NO_EOS,
                     compile=True)
    finally:
        set_attention(model, "eager")
    assert torch.equal(got, want)
    assert all(len(set(row)) > 2 for row in want.tolist())


def test_flex_refuses_to_train_on_a_cpu_with_a_message(model):
    """torch 2.13 has no flex_attention backward on a CPU; the error says what to use instead."""
    pixels, ids, mask_ar, mask_input = prompt_batch(model.config, [3, 6])
    set_attention(model, "flex")
    model.train()
    try:
        with pytest.raises(NotImplementedError, match="train with attn_implementation 'eager' or 'sdpa'"):
            model(pixels, ids, mask_ar, mask_input, mask_loss=mask_input).mean().backward()
    finally:
        set_attention(model, "eager").eval()


def test_set_attention_names_the_choices(model):
    with pytest.raises(ValueError, match="attn_implementation must be one of 'eager', 'sdpa', 'flex', got 'flash'"):
        set_attention(model, "flash")
    assert set_attention(model, "flex").config.text.attn_implementation == "flex"
    assert all(layer.attn.cfg.attn_implementation == "flex" for layer in model.llm.layers)
    set_attention(model, "eager")
