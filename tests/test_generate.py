"""Decoding tests: greedy tokens equal transformers' `generate`, the KV cache changes nothing,
padding changes nothing, per-row EOS and streaming, sampler properties, and beam search
against brute force.

Random tiny models repeat their last token forever: through the tied embedding, the current
token's own embedding dominates the residual stream and scores highest. A test on such output
could not tell a correct cache from a broken one, so `amplify_blocks_` scales up what the
attention and MLP blocks add (in transformers' weights, before ours load them), and the models
then write varied token sequences that depend on their context.
"""

import itertools
import random
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hf_reference import hf_paligemma, randomize_
from minipaligemma import PaliGemma, get_config
from minipaligemma.generate import (beam_search, decode, extend, generate, greedy, new_cache, prefill, sample,
                                    top_k_filter, top_p_filter)
from minipaligemma.tokenizer import BOS_ID, PAD_ID, train_tokenizer
from hf_reference import ours_from_hf

NO_EOS = -1  # an eos_id no token equals: decoding runs the full max_new_tokens
STEPS = 10


def amplify_blocks_(hf_model, gain: float = 30.0) -> None:
    """Multiply each text block's contribution to the residual stream by `gain`: the output
    projections of attention and MLP (Gemma 1), or the gains of the post-norms that follow them
    (Gemma 2, whose post-norms would undo a scaled projection)."""
    version2 = hf_model.config.text_config.model_type == "gemma2"
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "language_model" not in name:
                continue
            post_norm = name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"))
            if version2 and post_norm:
                p.copy_(gain * (1 + p) - 1)  # the norm multiplies by (1 + w)
            elif not version2 and name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(gain)


@pytest.fixture(scope="module", params=["tiny-gemma1", "tiny"])
def pair(request):
    """(config, transformers model, our model holding the same weights)."""
    cfg = get_config(request.param)
    hf = hf_paligemma(cfg, seed=3)
    amplify_blocks_(hf)
    return cfg, hf, ours_from_hf(cfg, hf)


def prompt_batch(cfg, lengths, side="right", seed=0):
    """Images and random prompts (BOS first) of the given lengths, padded on `side` (the same
    prompts and images whichever the side).

    Returns pixels [B, 3, S, S] and input_ids, mask_ar, mask_input [B, T]. Right pads take
    tokenizer.pad_batch's values (mask_ar 1); left pads need mask_ar 0, since a step before the
    prompt would cut the image off from it.
    """
    gen = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    ids = torch.full((b, t), PAD_ID)
    mask_input = torch.zeros(b, t, dtype=torch.long)
    mask_ar = torch.full((b, t), 1 if side == "right" else 0)
    for i, n in enumerate(lengths):
        real = slice(0, n) if side == "right" else slice(t - n, t)
        words = torch.randint(3, cfg.text.vocab_size, (n - 1,), generator=gen)  # no pad, eos or bos
        ids[i, real] = torch.cat([torch.tensor([BOS_ID]), words])
        mask_input[i, real], mask_ar[i, real] = 1, 0
    size = cfg.vision.image_size
    pixels = torch.rand(b, 3, size, size, generator=gen) * 2 - 1
    return pixels, ids, mask_ar, mask_input


def hf_left_padded(cfg, ids, mask_input):
    """Left-padded prompts [B, T] as transformers' generate wants them: [pads] [image] [prompt],
    with attention_mask and token_type_ids (0: the whole prompt is the prefix block)."""
    rows, masks = [], []
    for row, real in zip(ids, mask_input.bool()):
        pads = int((~real).sum())
        image = torch.full((cfg.num_image_tokens,), cfg.text.vocab_size)  # the placeholder id
        rows.append(torch.cat([row[:pads], image, row[pads:]]))
        masks.append(torch.cat([torch.zeros(pads), torch.ones(len(image) + len(row) - pads)]).long())
    input_ids = torch.stack(rows)  # [B, P + T]
    return dict(input_ids=input_ids, attention_mask=torch.stack(masks),
                token_type_ids=torch.zeros_like(input_ids))


def early_stop_token(tokens: torch.Tensor) -> tuple[int, int]:
    """(token, row): a token that only one row of tokens [B, N] writes, first at step >= 2. Used
    as EOS, it stops that row early while the others run to the end."""
    rows = tokens.tolist()
    for k, (r, row) in itertools.product(range(2, len(rows[0])), enumerate(rows)):
        if row[k] not in row[:k] and not any(row[k] in other for other in rows[:r] + rows[r + 1:]):
            return row[k], r
    raise AssertionError(f"no token stops one row alone in {rows}; try other prompts")


def next_token_logits(model, pixels, ids, mask_ar, mask_input, tokens, cached: bool) -> torch.Tensor:
    """Logits [B, K, V] that predict tokens [B, K] after the prompts, teacher-forced.

    cached: prefill, then one extend per token (the decoding path). Otherwise one plain forward
    over prompt + tokens, read at each row's last real prompt token and the tokens after it.
    """
    if cached:
        cache = new_cache(model, pixels, ids.shape[1], tokens.shape[1])
        logits = [prefill(model, pixels, ids, mask_ar, mask_input, cache)]
        logits += [extend(model, column, cache) for column in tokens[:, :-1].T]
        return torch.stack(logits, dim=1)  # [B, K, V]
    ones = torch.ones_like(tokens)
    with torch.no_grad():
        full = model(pixels, torch.cat([ids, tokens], 1), torch.cat([mask_ar, ones], 1),
                     torch.cat([mask_input, ones], 1))  # [B, T + K, V]
    t = ids.shape[1]
    last = t - 1 - mask_input.flip(1).argmax(1)  # [B]
    after = t + torch.arange(tokens.shape[1] - 1).expand(len(ids), -1)  # [B, K-1]
    where = torch.cat([last[:, None], after], dim=1)  # [B, K]
    return full.gather(1, where[..., None].expand(-1, -1, full.shape[-1]))  # [B, K, V]


# ---------------------------------------------------------------------------------------------
# Greedy decoding against transformers, the cache, padding, EOS and streaming.

def test_greedy_matches_transformers_generate(pair):
    """Two prompts of different lengths; EOS is chosen so that one row stops early and the other
    does not, and both implementations must stop (and pad) the same way."""
    cfg, hf, ours = pair
    pixels, ids, mask_ar, mask_input = prompt_batch(cfg, [4, 7], side="left")
    eos, row = early_stop_token(decode(ours, pixels, ids, mask_ar, mask_input, STEPS, eos_id=NO_EOS))
    with torch.no_grad():
        hf_out = hf.generate(pixel_values=pixels, **hf_left_padded(cfg, ids, mask_input), do_sample=False,
                             max_new_tokens=STEPS, eos_token_id=eos, pad_token_id=PAD_ID)
    hf_tokens = hf_out[:, cfg.num_image_tokens + ids.shape[1]:]  # [B, N]
    left = decode(ours, pixels, ids, mask_ar, mask_input, STEPS, eos_id=eos)
    right = decode(ours, *prompt_batch(cfg, [4, 7], side="right"), STEPS, eos_id=eos)
    print(f"{cfg.text.version=}: eos {eos}, greedy tokens {left.tolist()}")
    assert eos in left[row] and eos not in left[1 - row] and left.shape[1] == STEPS
    assert torch.equal(left, hf_tokens)
    assert torch.equal(right, hf_tokens)


@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_logits_equal_uncached(pair, side):
    cfg, _, ours = pair
    pixels, ids, mask_ar, mask_input = prompt_batch(cfg, [3, 8], side=side, seed=2)
    tokens = decode(ours, pixels, ids, mask_ar, mask_input, 6, eos_id=NO_EOS)
    cached = next_token_logits(ours, pixels, ids, mask_ar, mask_input, tokens, cached=True)
    plain = next_token_logits(ours, pixels, ids, mask_ar, mask_input, tokens, cached=False)
    diff = (cached - plain).abs().max().item()
    print(f"{cfg.text.version=} {side}-padded: cached vs uncached max |delta logit| {diff:.2e}")
    assert diff <= 1e-5


def test_padded_batch_equals_each_prompt_alone(pair):
    cfg, _, ours = pair
    lengths = [3, 9, 5]
    batch = prompt_batch(cfg, lengths, seed=3)
    tokens = decode(ours, *batch, STEPS, eos_id=NO_EOS)
    logits = next_token_logits(ours, *batch, tokens, cached=True)
    for i, n in enumerate(lengths):
        alone = [x[i:i + 1, :n] if x.dim() == 2 else x[i:i + 1] for x in batch]  # unpadded
        alone_tokens = decode(ours, *alone, STEPS, eos_id=NO_EOS)
        assert torch.equal(alone_tokens, tokens[i:i + 1])
        alone_logits = next_token_logits(ours, *alone, alone_tokens, cached=True)
        assert (alone_logits - logits[i:i + 1]).abs().max() <= 1e-5


def test_each_row_stops_at_its_eos_and_streams_what_it_returns(pair):
    cfg, _, ours = pair
    batch = prompt_batch(cfg, [5, 6], seed=4)
    unstopped = decode(ours, *batch, STEPS, eos_id=NO_EOS)
    eos, row = early_stop_token(unstopped)
    streamed = [[], []]
    tokens = decode(ours, *batch, STEPS, eos_id=eos, on_token=lambda r, token: streamed[r].append(token))
    stop = unstopped[row].tolist().index(eos) + 1
    assert tokens[row].tolist() == unstopped[row, :stop].tolist() + [PAD_ID] * (STEPS - stop)
    assert torch.equal(tokens[1 - row], unstopped[1 - row])  # the other row runs on, unaffected
    assert streamed[row] == tokens[row, :stop].tolist()
    assert streamed[1 - row] == tokens[1 - row].tolist()


def test_decoding_stops_when_every_row_is_done(pair):
    cfg, _, ours = pair
    batch = prompt_batch(cfg, [5], seed=4)
    first = decode(ours, *batch, 1, eos_id=NO_EOS)[0, 0].item()
    assert decode(ours, *batch, STEPS, eos_id=first).tolist() == [[first]]


# ---------------------------------------------------------------------------------------------
# Sampler properties.

logit_rows = arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(2, 30)),  # [B, V]
                    elements=st.floats(-20, 20, width=32))
temperatures = st.floats(0.05, 5.0)


@settings(max_examples=200, deadline=None)
@given(logit_rows, st.integers(1, 35))
def test_top_k_keeps_the_k_largest(logits, k):
    logits = torch.from_numpy(logits)
    filtered = top_k_filter(logits, k)
    for row, out in zip(logits, filtered):
        kept = out.isfinite()
        assert torch.equal(out[kept], row[kept])
        ranked = row.sort(descending=True).values
        expected = min(k, len(row))
        if expected < len(row) and ranked[expected - 1] == ranked[expected]:  # a tie at the cut
            assert kept.sum() > expected
        else:
            assert kept.sum() == expected
        assert kept.all() or row[kept].min() > row[~kept].max()


@settings(max_examples=200, deadline=None)
@given(logit_rows, st.floats(0.01, 1.0), temperatures)
def test_top_p_keeps_the_smallest_set_reaching_p(logits, p, temperature):
    """After temperature: the kept mass reaches p, dropping the least likely kept token would
    fall below p, and no dropped token is more likely than a kept one."""
    tempered = torch.from_numpy(logits) / temperature
    kept = top_p_filter(tempered, p).isfinite()
    for probs, keep in zip(tempered.double().softmax(-1), kept):
        mass = probs[keep].sum()
        assert mass >= p - 1e-5
        assert mass - probs[keep].min() < p + 1e-5
        assert keep.all() or probs[keep].min() >= probs[~keep].max() - 1e-7


@settings(max_examples=100, deadline=None)
@given(logit_rows, st.integers(0, 2**31 - 1))
def test_low_temperature_is_greedy(logits, seed):
    logits = torch.from_numpy(logits)
    logits[torch.arange(len(logits)), logits.argmax(-1)] += 0.05  # a unique maximum
    ids = sample(logits, temperature=1e-4, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(ids, greedy(logits))


@settings(max_examples=100, deadline=None)
@given(logit_rows, temperatures, st.integers(1, 8), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_sampling_never_returns_a_filtered_token(logits, temperature, k, p, seed):
    logits = torch.from_numpy(logits).repeat(50, 1)  # 50 draws per row
    ids = sample(logits, temperature, top_k=k, top_p=p, generator=torch.Generator().manual_seed(seed))
    allowed = top_p_filter(top_k_filter(logits / temperature, k), p).isfinite()  # [R, V]
    assert allowed.gather(1, ids[:, None]).all()
    kth = logits.topk(min(k, logits.shape[1]), dim=-1).values[:, -1]  # [R]
    assert (logits.gather(1, ids[:, None])[:, 0] >= kth).all()


def test_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = 40_000
    gen = torch.Generator().manual_seed(0)
    ids = sample(logits.expand(draws, -1), temperature=0.7, generator=gen)
    freq = torch.bincount(ids, minlength=4).double() / draws
    assert (freq - (logits[0].double() / 0.7).softmax(-1)).abs().max() < 0.01
    # top-p measures mass after the temperature: at t = 10 the three best tokens are needed to
    # reach 0.6; at t = 1, token 0 alone (p 0.64) reaches it.
    hot = sample(logits.expand(2000, -1), temperature=10.0, top_p=0.6, generator=gen)
    assert set(hot.tolist()) == {0, 1, 2}
    assert set(sample(logits.expand(2000, -1), top_p=0.6, generator=gen).tolist()) == {0}


# ---------------------------------------------------------------------------------------------
# Beam search.

def greedy_without(eos: int):
    """Greedy decoding that never picks `eos`: the path a width-1 beam follows."""
    return lambda logits: greedy(logits.index_fill(-1, torch.tensor([eos]), float("-inf")))


def sequence_scores(model, pixels, ids, mask_ar, mask_input, tokens, eos: int) -> torch.Tensor:
    """Sum of log-probabilities [B] of each row of tokens [B, K] up to its first EOS (included),
    from one plain forward pass: the score beam search maximises."""
    logp = next_token_logits(model, pixels, ids, mask_ar, mask_input, tokens, cached=False).log_softmax(-1)
    token_logp = logp.gather(2, tokens[..., None])[..., 0]  # [B, K]
    before_eos = (tokens == eos).long().cumsum(1) - (tokens == eos).long() == 0  # [B, K], EOS included
    return (token_logp * before_eos).sum(1)


def test_beam_width_one_is_the_best_eos_ending_of_the_greedy_path(pair):
    """Width 1 follows the greedy path with EOS excluded and returns the best of "path[:j] + EOS";
    so its score is at least greedy decoding's whenever greedy ends with EOS."""
    cfg, _, ours = pair
    batch = prompt_batch(cfg, [4, 7], seed=5)
    eos, row = early_stop_token(decode(ours, *batch, STEPS, eos_id=NO_EOS))
    tokens, scores = beam_search(ours, *batch, STEPS, beam_size=1, eos_id=eos)

    path = decode(ours, *batch, STEPS - 1, sampler=greedy_without(eos), eos_id=eos)  # [B, N-1]
    endings = [torch.cat([path[:, :j], torch.full((2, 1), eos)], 1) for j in range(STEPS)]
    ending_scores = torch.stack([sequence_scores(ours, *batch, e, eos) for e in endings], 1)  # [B, N]
    best = ending_scores.argmax(1)
    for r in range(2):
        assert tokens[r].tolist() == endings[best[r]][r].tolist() + [PAD_ID] * (tokens.shape[1] - best[r] - 1)
    assert torch.allclose(scores, ending_scores.max(1).values, atol=1e-4)

    greedy_tokens = decode(ours, *batch, STEPS, eos_id=eos)
    assert eos in greedy_tokens[row]
    assert scores[row] >= sequence_scores(ours, *batch, greedy_tokens, eos)[row] - 1e-5


def test_wide_beam_finds_the_best_sequence():
    """With a 6-token vocabulary and 3 steps there are 31 answers that end with EOS; 25 beams keep
    every prefix, so beam search must return the best answer, found here by scoring each one.

    Plain sums of log-probabilities favour short answers, so the model is made confident (its
    final norm gain, hence its logits, times 3) and every token takes a turn as EOS. Some best
    answers then take 3 steps off the greedy path: their beams had to be followed through the
    cache to parents in other rows.
    """
    base = get_config("tiny")
    cfg = replace(base, text=replace(base.text, vocab_size=6))
    hf = hf_paligemma(cfg, seed=22)
    amplify_blocks_(hf)
    with torch.no_grad():
        gain = hf.model.language_model.norm.weight
        gain.copy_(3 * (1 + gain) - 1)
    model = ours_from_hf(cfg, hf)
    batch = prompt_batch(cfg, [4, 2], seed=22)
    every_pair = [x.repeat_interleave(31, dim=0) for x in batch]  # each prompt 31 times: [B * 31, ...]
    long_and_off_greedy = 0
    for eos in range(6):
        others = [t for t in range(6) if t != eos]
        answers = [list(p) + [eos] for n in range(3) for p in itertools.product(others, repeat=n)]  # 31
        padded = torch.tensor([a + [PAD_ID] * (3 - len(a)) for a in answers])  # [31, 3]
        answer_scores = sequence_scores(model, *every_pair, padded.repeat(2, 1), eos).view(2, 31)  # [B, 31]
        tokens, scores = beam_search(model, *batch, 3, beam_size=25, eos_id=eos)
        path = decode(model, *batch, 2, sampler=greedy_without(eos), eos_id=eos)  # [B, 2]
        for row in range(2):
            best = answers[answer_scores[row].argmax()]
            assert tokens[row, :len(best)].tolist() == best
            long_and_off_greedy += len(best) == 3 and best[:2] != path[row].tolist()
        assert torch.allclose(scores, answer_scores.max(1).values, atol=1e-5)
    print(f"{long_and_off_greedy} of 12 best answers take 3 steps off the greedy path")
    assert long_and_off_greedy > 0


# ---------------------------------------------------------------------------------------------
# Text in, text out.

@pytest.fixture(scope="module")
def tokenizer_and_model(tmp_path_factory):
    """A small trained tokenizer and a random tiny model with the same vocabulary."""
    rng = random.Random(0)
    words = "a the cat dog red blue on in under what where is are photo caption answer detect".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) for _ in range(200)]
    tokenizer = train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok") / "tokenizer.model")
    cfg = get_config("tiny")
    model = PaliGemma(replace(cfg, text=replace(cfg.text, vocab_size=tokenizer.vocab_size))).eval()
    randomize_(model, seed=7)
    return tokenizer, model


def test_generate_batches_prompts_and_streams_tokens(tokenizer_and_model):
    tokenizer, model = tokenizer_and_model
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(2)]
    prompts = ["caption en", "what is under the red cat ?"]
    streamed = [[], []]
    answers = generate(model, tokenizer, images, prompts, max_new_tokens=6,
                       on_token=lambda row, token: streamed[row].append(token))
    assert answers == [generate(model, tokenizer, [image], [prompt], max_new_tokens=6)[0]
                       for image, prompt in zip(images, prompts)]
    assert answers == [tokenizer.decode(ids) for ids in streamed]
    assert all(answers)  # no EOS in 6 random steps here, so every answer has text

    def seeded_sampler():
        return partial(sample, temperature=2.0, top_k=50, generator=torch.Generator().manual_seed(1))
    sampled = generate(model, tokenizer, images, prompts, 6, sampler=seeded_sampler())
    assert sampled == generate(model, tokenizer, images, prompts, 6, sampler=seeded_sampler())
    assert sampled != answers
    assert len(generate(model, tokenizer, images, prompts, 4, beam_size=2)) == 2


def test_generate_refuses_what_cannot_fit(tokenizer_and_model):
    tokenizer, model = tokenizer_and_model
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    prompt_len = len(tokenizer.encode("caption en")) + 2  # bos and "\n"
    generate(model, tokenizer, [image], ["caption en"], 3, max_text_len=prompt_len + 3)  # fits exactly
    with pytest.raises(ValueError, match=f"max_text_len={prompt_len + 2}"):
        generate(model, tokenizer, [image], ["caption en"], 3, max_text_len=prompt_len + 2)
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        generate(model, tokenizer, [image], ["a", "b"])
    with pytest.raises(ValueError, match="beam search"):
        generate(model, tokenizer, [image], ["a"], beam_size=2, on_token=print)


def test_ids_past_the_tokenizer_are_never_generated():
    """transformers' 64 extra embedding rows (<image>, padding) must not be decoded."""
    from minipaligemma.generate import within
    logits = torch.tensor([[0.0, 1.0, 5.0, 9.0]])
    assert within(logits, 2).argmax().item() == 1
    assert torch.equal(within(logits, None), logits) and torch.equal(within(logits, 4), logits)
