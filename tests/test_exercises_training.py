"""The exercise checks of notebooks 04 and 05 (minipaligemma/exercises_training.py): each one
passes the package's own function and a learner's correct solution written independently, and
rejects realistic wrong versions with the one-line message that names the mistake."""

import math

import pytest
import torch

from minipaligemma import exercises_training as ex
from minipaligemma.data import World
from minipaligemma.gemma import KVCache
from minipaligemma.generate import decode, extend, new_cache, prefill
from minipaligemma.schedules import cosine_schedule, rsqrt_schedule
from minipaligemma.tasks import box_to_loc_string, parse_detections
from minipaligemma.tokenizer import BOS_ID, EOS_ID, encode_example, train_tokenizer


def assert_rejects(verdict, *fragments):
    assert not verdict.passed, verdict
    assert "\n" not in verdict
    for fragment in fragments:
        assert fragment in verdict, verdict


# ---------------------------------------------------------------------------------------------
# 04: boxes

def decode_box(text, size):
    locs = [int(text[i + 4:i + 8]) for i in range(0, 36, 9)]  # "<locNNNN>" is 9 characters
    h, w = size
    return (locs[0] / 1024 * h, locs[1] / 1024 * w, locs[2] / 1024 * h, locs[3] / 1024 * w)


def test_decode_box_accepts_the_reference_and_a_solution():
    assert ex.check_decode_box(lambda t, s: parse_detections(t, s)[0].box).passed
    assert ex.check_decode_box(decode_box).startswith("passes: equal to minipaligemma.tasks.parse_detections")
    assert ex.check_decode_box(lambda t, s: torch.tensor(decode_box(t, s), dtype=torch.float64)).passed


def test_decode_box_rejects_x_before_y_the_wrong_side_and_1023():
    def x_first(text, size):
        y0, x0, y1, x1 = decode_box(text, size)
        h, w = size
        return (x0 / w * h, y0 / h * w, x1 / w * h, y1 / h * w)  # tokens read as x, y

    assert_rejects(ex.check_decode_box(x_first), "the box[0]", "y before x")
    assert_rejects(ex.check_decode_box(lambda t, s: decode_box(t, s[::-1])), "480 x 640", "measured along the height")
    assert_rejects(ex.check_decode_box(lambda t, s: tuple(c * 1024 / 1023 for c in decode_box(t, s))), "1023 is big_vision")
    assert_rejects(ex.check_decode_box(lambda t, s: tuple(c / 256 for c in decode_box(t, s))), "fractions")
    assert_rejects(ex.check_decode_box(lambda t, s: decode_box(t, s)[:3]), "should be 4 numbers")


def encode_box(box, size):
    h, w = size
    bins = [round(c / side * 1024) for c, side in zip(box, (h, w, h, w))]
    return "".join(f"<loc{min(max(b, 0), 1023):04d}>" for b in bins)


def test_encode_box_accepts_the_reference_and_a_solution():
    assert ex.check_encode_box(box_to_loc_string).passed
    assert ex.check_encode_box(encode_box).passed


def test_encode_box_rejects_truncation_no_clip_and_x_first():
    assert_rejects(ex.check_encode_box(
        lambda b, s: "".join(f"<loc{int(c / side * 1024):04d}>" for c, side in zip(b, (s[0], s[1]) * 2))),
        "token 0 is <loc0356>, expected <loc0357>", "int() cuts down")
    assert_rejects(ex.check_encode_box(
        lambda b, s: "".join(f"<loc{round(c / side * 1024):04d}>" for c, side in zip(b, (s[0], s[1]) * 2))),
        "<loc1024>", "clip to 1023")
    assert_rejects(ex.check_encode_box(lambda b, s: encode_box((b[1], b[0], b[3], b[2]), (s[1], s[0]))), "y before x")
    assert_rejects(ex.check_encode_box(lambda b, s: encode_box(b, s).replace("><", "> <")), "four <locNNNN> tokens")


# ---------------------------------------------------------------------------------------------
# 04: the KV cache and greedy decoding

def update(cache, layer, k, v):
    end = cache.length + k.shape[2]
    cache.k[layer, :, :, cache.length:end] = k
    cache.v[layer, :, :, cache.length:end] = v
    return cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]


def test_kv_cache_update_accepts_the_reference_and_a_solution():
    assert ex.check_kv_cache_update(KVCache.update).passed
    assert ex.check_kv_cache_update(update).passed


def test_kv_cache_update_rejects_slot_zero_not_storing_new_only_and_advancing():
    def at_zero(cache, layer, k, v):
        t = k.shape[2]
        cache.k[layer, :, :, :t], cache.v[layer, :, :, :t] = k, v
        return cache.k[layer, :, :, :cache.length + t], cache.v[layer, :, :, :cache.length + t]

    def not_stored(cache, layer, k, v):
        return torch.cat([cache.k[layer, :, :, :cache.length], k], 2), torch.cat([cache.v[layer, :, :, :cache.length], v], 2)

    def advancing(cache, layer, k, v):
        keys, values = update(cache, layer, k, v)
        cache.length += k.shape[2]
        return keys, values

    assert_rejects(ex.check_kv_cache_update(at_zero), "step 1", "at slots cache.length onwards")
    assert_rejects(ex.check_kv_cache_update(not_stored), "the cache never got them")
    assert_rejects(ex.check_kv_cache_update(lambda c, layer, k, v: (update(c, layer, k, v), (k, v))[1]),
                   "shape [2, 2, 1, 8] where [2, 2, 6, 8]", "not only the new ones")
    assert_rejects(ex.check_kv_cache_update(advancing), "changed cache.length")
    assert_rejects(ex.check_kv_cache_update(lambda c, layer, k, v: (update(c, layer, k, v), (c.k[layer], c.v[layer]))[1]),
                   "the rest of the buffer is garbage")


@torch.inference_mode()
def greedy_decode(model, pixels, ids, mask_ar, n):
    cache = new_cache(model, pixels, ids.shape[1], n)
    logits = prefill(model, pixels, ids, mask_ar, torch.ones_like(ids), cache)
    out = []
    for _ in range(n):
        out.append(logits.argmax(-1))
        if len(out) < n:
            logits = extend(model, out[-1], cache)
    return torch.stack(out, 1)


def test_greedy_decode_accepts_the_reference_and_a_solution():
    assert ex.check_greedy_decode(lambda m, p, i, a, n: decode(m, p, i, a, max_new_tokens=n, eos_id=-1)).passed
    assert ex.check_greedy_decode(greedy_decode).passed


def test_greedy_decode_rejects_first_token_fed_dropped_first_token_and_no_cache():
    @torch.inference_mode()
    def stale(model, pixels, ids, mask_ar, n):
        cache = new_cache(model, pixels, ids.shape[1], n)
        first = prefill(model, pixels, ids, mask_ar, torch.ones_like(ids), cache).argmax(-1)
        return torch.stack([first] + [extend(model, first, cache).argmax(-1) for _ in range(n - 1)], 1)

    @torch.inference_mode()
    def without_cache(model, pixels, ids, mask_ar, n):
        for _ in range(n):
            token = model(pixels, ids, mask_ar)[:, -1].argmax(-1, keepdim=True)
            ids, mask_ar = torch.cat([ids, token], 1), torch.cat([mask_ar, torch.ones_like(token)], 1)
        return ids[:, -n:]

    assert_rejects(ex.check_greedy_decode(stale), "the tokens: wrong at", "feed back the token just chosen")
    assert_rejects(ex.check_greedy_decode(lambda m, p, i, a, n: greedy_decode(m, p, i, a, n + 1)[:, 1:]),
                   "the first new token comes from prefill")
    assert_rejects(ex.check_greedy_decode(without_cache), "the right tokens, but the image was encoded 6 times")
    assert_rejects(ex.check_greedy_decode(lambda m, p, i, a, n: greedy_decode(m, p, i, a, n)[0]), "shape [6] where [2, 6]")


# ---------------------------------------------------------------------------------------------
# 05: schedules

def rsqrt(t, warmup, timescale):
    return min(1.0, (t + 1) / warmup) / math.sqrt(max(t + 1, timescale) / timescale)


def test_rsqrt_schedule_accepts_the_reference_and_a_solution():
    assert ex.check_rsqrt_schedule(rsqrt_schedule).passed
    assert ex.check_rsqrt_schedule(rsqrt).passed


def test_rsqrt_schedule_rejects_t_not_t_plus_1_no_warmup_and_no_plateau():
    assert_rejects(ex.check_rsqrt_schedule(lambda t, w, s: rsqrt(t - 1, w, s)),
                   "rsqrt_schedule(t=0, warmup=20, timescale=1000): yours 0, expected 0.05", "t is 0-based")
    assert_rejects(ex.check_rsqrt_schedule(lambda t, w, s: math.sqrt(s / max(t + 1, s))),
                   "linear warm-up")
    assert_rejects(ex.check_rsqrt_schedule(lambda t, w, s: min(1.0, (t + 1) / w) * math.sqrt(s / (t + 1))),
                   "stays at 1 until")
    assert_rejects(ex.check_rsqrt_schedule(lambda t, w, s: str(rsqrt(t, w, s))), "not a number")


def cosine(t, total):
    w = max(1, int(total * 0.05))
    return (t + 1) / w if t < w else (1 + math.cos(math.pi * (t - w) / (total - w))) / 2


def test_cosine_schedule_accepts_the_reference_and_a_solution():
    assert ex.check_cosine_schedule(cosine_schedule).passed
    assert ex.check_cosine_schedule(cosine).passed


def test_cosine_schedule_rejects_no_warmup_zero_start_and_the_wrong_span():
    assert_rejects(ex.check_cosine_schedule(lambda t, n: (1 + math.cos(math.pi * t / n)) / 2), "5 % linear warm-up")
    assert_rejects(ex.check_cosine_schedule(lambda t, n: t / max(1, int(n * 0.05)) if t < max(1, int(n * 0.05)) else cosine(t, n)),
                   "cosine_schedule(t=0, total=200): yours 0", "(t + 1) / w")
    w = lambda n: max(1, int(n * 0.05))  # noqa: E731
    assert_rejects(ex.check_cosine_schedule(lambda t, n: (t + 1) / w(n) if t < w(n) else (1 + math.cos(math.pi * (t - w(n)) / n)) / 2),
                   "divide by total - w")
    assert_rejects(ex.check_cosine_schedule(lambda t, n: math.cos(math.pi * (t - w(n)) / (n - w(n))) if t >= w(n) else (t + 1) / w(n)),
                   "cos alone goes to -1")


# ---------------------------------------------------------------------------------------------
# 05: the training layout and one Adam step

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(World(0).text_corpus(600), 512, tmp_path_factory.mktemp("tok") / "tokenizer.model")


def layout(tok, prefix, suffix, loss_on_prompt=False, eos=True, causal=False, sep="\n"):
    prompt = [BOS_ID] + tok.encode(prefix) + tok.encode(sep)
    answer = tok.encode(suffix) + [EOS_ID] * eos
    zeros_ones = [0] * len(prompt) + [1] * len(answer)
    return {"input_ids": prompt + answer, "mask_ar": [1] * len(zeros_ones) if causal else zeros_ones,
            "mask_loss": [1] * len(zeros_ones) if loss_on_prompt else zeros_ones, "mask_input": [1] * len(zeros_ones)}


def test_training_layout_accepts_the_reference_and_a_solution(tokenizer):
    assert ex.check_training_layout(encode_example, tokenizer).passed
    assert ex.check_training_layout(layout, tokenizer).passed


def test_training_layout_rejects_loss_on_the_prompt_no_eos_and_a_causal_prefix(tokenizer):
    assert_rejects(ex.check_training_layout(lambda *a: layout(*a, loss_on_prompt=True), tokenizer),
                   "mask_loss is wrong at position 0 (token '<bos>'): yours 1, expected 0", "suffix only")
    assert_rejects(ex.check_training_layout(lambda *a: layout(*a, eos=False), tokenizer), "entries", "EOS")
    assert_rejects(ex.check_training_layout(lambda *a: layout(*a, causal=True), tokenizer), "mask_ar is wrong", "bidirectional")
    assert_rejects(ex.check_training_layout(lambda *a: layout(*a, sep=""), tokenizer), "separator")
    assert_rejects(ex.check_training_layout(lambda *a: list(layout(*a).values()), tokenizer), "expected a dict")


def adam(params, grads, m, v, step, lr, clip="global", bias_correction=True, eps_inside=False, weight_decay=0.0):
    """A learner's Adam step; the keyword arguments make the wrong versions."""
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    new = ([], [], [])
    for p, g, m_i, v_i in zip(params, grads, m, v):
        if clip:
            g = g * min(1.0, 1.0 / ((norm if clip == "global" else float(g.norm())) + 1e-6))
        p = p * (1 - lr * weight_decay)
        m_i = 0.9 * m_i + 0.1 * g
        v_i = 0.999 * v_i + 0.001 * g * g
        m_hat, v_hat = (m_i / (1 - 0.9**step), v_i / (1 - 0.999**step)) if bias_correction else (m_i, v_i)
        update = m_hat / ((v_hat + 1e-8).sqrt() if eps_inside else v_hat.sqrt() + 1e-8)
        for out, value in zip(new, (p - lr * update, m_i, v_i)):
            out.append(value)
    return new


def test_adam_step_accepts_the_reference_and_a_solution():
    assert ex.check_adam_step(lambda params, grads, *rest: ex._adam_with_torch(params, grads, *rest)).passed
    assert ex.check_adam_step(adam).passed


def test_adam_step_rejects_weight_decay_no_clipping_no_bias_correction_and_eps_inside():
    def changed(**kwargs):
        return lambda *a: adam(*a, **kwargs)

    assert_rejects(ex.check_adam_step(changed(weight_decay=0.01)), "new params[0]: wrong at [0, 0]", "weight_decay=0")
    assert_rejects(ex.check_adam_step(changed(clip=None)), "global norm 1.0 first")
    assert_rejects(ex.check_adam_step(changed(clip="each")), "not each tensor on its own")
    assert_rejects(ex.check_adam_step(changed(bias_correction=False)), "the first step", "bias correction")
    assert_rejects(ex.check_adam_step(changed(eps_inside=True)), "new params[1]", "outside the square root")
    assert_rejects(ex.check_adam_step(lambda *a: adam(*a)[0]), "three lists")


def test_checks_leave_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ex.check_greedy_decode(greedy_decode)
    ex.check_adam_step(adam)
    ex.check_kv_cache_update(update)
    assert torch.equal(torch.rand(3), expected)
