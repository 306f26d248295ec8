"""Exercise checks for notebooks 04 (inference and tasks) and 05 (training).

A learner writes a function in a marked cell; the next cell calls its check, which runs the
learner's function and the package's own code on the same inputs (seeded: the same verdict on
every run) and returns one line, a `Verdict`:

    passes: equal to minipaligemma.schedules.rsqrt_schedule at 14 steps of 2 settings

or what is wrong, on which input, and, when the answer equals a known mistake, which one:

    rsqrt_schedule(t=0, warmup=20, timescale=1000): yours 0, expected 0.05 — t is 0-based: the
    first step is t = 0 and warms up by (t + 1) / warmup

The order of the tests is type, shape, dtype, then values; floats are compared to float32
rounding (relative 1e-5, absolute 1e-6). The known mistakes are written beside each check. A
check never changes the caller's random state.

    04_inference_and_tasks  check_decode_box, check_encode_box, check_kv_cache_update,
                            check_greedy_decode
    05_training             check_rsqrt_schedule, check_cosine_schedule, check_training_layout,
                            check_adam_step
"""

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import PaliGemmaConfig, TextConfig, VisionConfig
from .exercises import Verdict
from .gemma import KVCache
from .generate import decode, extend, new_cache, prefill
from .loop import OPTIMIZERS
from .paligemma import PaliGemma
from .schedules import cosine_schedule, rsqrt_schedule
from .tasks import box_to_loc_string, parse_detections
from .tokenizer import BOS_ID, EOS_ID, SEPARATOR, Tokenizer, encode_example

RTOL, ATOL = 1e-5, 1e-6  # float32 rounding
SEED = 0
DIVISOR = 1024  # detection's bins, as the official demo (docs/tasks.md §2)


@dataclass(frozen=True)
class Mistake:
    """A known wrong answer: what `wrong` computes from the same inputs, and the hint to show."""

    wrong: Callable
    hint: str


# ---------------------------------------------------------------------------------------------
# Comparing answers.

def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def _tensor_problem(got, want: torch.Tensor, name: str) -> str | None:
    """What is wrong with tensor `got` against `want` (type, shape, dtype, first wrong value), or None."""
    if not isinstance(got, torch.Tensor):
        return f"{name}: a {type(got).__name__}, not a torch.Tensor"
    if got.shape != want.shape:
        return f"{name}: shape {list(got.shape)} where {list(want.shape)} was expected"
    if got.dtype != want.dtype:
        return f"{name}: dtype {got.dtype} where {want.dtype} was expected"
    got, want = got.detach(), want.detach()
    wrong = ~torch.isclose(got, want, rtol=RTOL, atol=ATOL) if want.is_floating_point() else got != want
    if not wrong.any():
        return None
    first = tuple(i.item() for i in wrong.nonzero()[0])
    return (f"{name}: wrong at {list(first)}: yours {_fmt(got[first].item())}, expected "
            f"{_fmt(want[first].item())} ({wrong.sum().item()} of {wrong.numel()} values differ)")


def _numbers_problem(got, want: Sequence[float], name: str | None) -> str | None:
    """What is wrong with a number or a sequence of numbers `got` against `want`, or None.
    `name` (None for a lone number) says which value the message is about."""
    if isinstance(got, torch.Tensor) or hasattr(got, "tolist"):  # a tensor or numpy array of numbers
        got = got.tolist()
    if isinstance(want, (int, float)):
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return f"{name or 'the answer'} is a {type(got).__name__}, not a number"
        if not math.isclose(got, want, rel_tol=RTOL, abs_tol=ATOL):
            return (f"{name}: " if name else "") + f"yours {_fmt(float(got))}, expected {_fmt(float(want))}"
        return None
    if not isinstance(got, (tuple, list)) or len(got) != len(want):
        return f"{name} should be {len(want)} numbers, got {_fmt(got)}"
    for i, (g, w) in enumerate(zip(got, want)):
        problem = _numbers_problem(g, w, f"{name}[{i}]")
        if problem:
            return problem
    return None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _run(fn: Callable, cases: Sequence[tuple[str, tuple]], reference: Callable, problem: Callable,
         mistakes: Sequence[Mistake], passes: str) -> Verdict:
    """Every case through `fn` and `reference`; the first difference, with its hint, is the verdict.

    `problem(got, want)` says what is wrong or returns None; a mistake matches when
    problem(got, mistake.wrong(*args)) is None.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for what, args in cases:
            want = reference(*args)
            try:
                got = fn(*args)
            except Exception as error:  # the learner's code may raise anything: say what, and on which input
                return Verdict(f"{what}: your function raised {_first_line(error)}")
            found = problem(got, want)
            if found is not None:
                hint = next((m.hint for m in mistakes if _matches(problem, got, m.wrong, args)), None)
                return Verdict(f"{what}: {found}" + (f" — {hint}" if hint else ""))
    return Verdict(f"passes: {passes}")


def _matches(problem: Callable, got, wrong: Callable, args: tuple) -> bool:
    try:
        return problem(got, wrong(*args)) is None
    except Exception:  # a mistake that cannot be computed on this input does not match it
        return False


# ---------------------------------------------------------------------------------------------
# 04_inference_and_tasks: <loc> boxes, the KV cache, greedy decoding.

def _locs(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"<loc([0-9]{4})>", text)]


def _box_cases() -> list[tuple[str, tuple]]:
    """Boxes as <loc> text, in square and non-square images (so that a y/x swap shows)."""
    texts = ["<loc0357><loc0736><loc0562><loc0941>", "<loc0000><loc0100><loc1023><loc0512>",
             "<loc0200><loc0010><loc0300><loc0990>"]
    return [(f"{text!r} in a {h} x {w} image (height x width)", (text, (h, w)))
            for text in texts for h, w in ((256, 256), (480, 640))]


def _decoded(text: str, size: tuple[int, int], order=(0, 1, 2, 3), sides=(0, 1, 0, 1), divisor=DIVISOR,
             offset=0.0, pixels=True) -> tuple[float, ...]:
    """A box read from 4 <loc> tokens by some rule: the mistakes of check_decode_box."""
    locs = [_locs(text)[i] for i in order]
    return tuple((loc + offset) / divisor * (size[side] if pixels else 1) for loc, side in zip(locs, sides))


def check_decode_box(fn: Callable) -> Verdict:
    """fn(text, (height, width)) -> (y_min, x_min, y_max, x_max) in pixels: the box of four
    `<locNNNN>` tokens, each bin divided by 1024 and multiplied by the image side it measures.
    Reference: minipaligemma.tasks.parse_detections(text, (height, width))[0].box."""
    mistakes = [
        Mistake(lambda t, s: _decoded(t, s, order=(1, 0, 3, 2)),
                "the tokens are y before x: <y_min><x_min><y_max><x_max>"),
        Mistake(lambda t, s: _decoded(t, s, sides=(1, 0, 1, 0)),
                "y is measured along the height and x along the width"),
        Mistake(lambda t, s: _decoded(t, s, pixels=False), "those are fractions of the side: multiply by the side in pixels"),
        Mistake(lambda t, s: _decoded(t, s, divisor=1023),
                "divide by 1024 (the official demo's bins); 1023 is big_vision's RefCOCO convention (docs/tasks.md §2)"),
        Mistake(lambda t, s: _decoded(t, s, offset=0.5), "bin n decodes to n / 1024 * side, its lower edge, not its centre"),
    ]
    return _run(fn, _box_cases(), lambda text, size: parse_detections(text, size)[0].box,
                lambda got, want: _numbers_problem(got, want, "the box"), mistakes,
                "equal to minipaligemma.tasks.parse_detections on 3 boxes in 2 image sizes")


def _encoded(box, size, order=(0, 1, 2, 3), sides=(0, 1, 0, 1), rounding=round, clip=True) -> str:
    """Four <loc> tokens for a pixel box by some rule: the mistakes of check_encode_box."""
    bins = [rounding(box[i] / size[side] * DIVISOR) for i, side in zip(order, sides)]
    return "".join(f"<loc{min(max(b, 0), 1023) if clip else b:04d}>" for b in bins)


def check_encode_box(fn: Callable) -> Verdict:
    """fn((y_min, x_min, y_max, x_max) in pixels, (height, width)) -> four `<locNNNN>` tokens:
    each coordinate divided by its side, times 1024, rounded, clipped to 0..1023.
    Reference: minipaligemma.tasks.box_to_loc_string."""
    boxes = [(89.21, 184.0, 140.41, 235.2), (0.0, 12.3, 256.0, 256.0), (30.6, 5.9, 77.7, 200.49)]
    cases = [(f"box {box} in a {h} x {w} image (height x width)", (box, (h, w)))
             for box in boxes for h, w in ((256, 256), (480, 640))]

    def problem(got, want):
        if not isinstance(got, str):
            return f"returns a {type(got).__name__}, not a string"
        if got == want:
            return None
        if len(_locs(got)) != 4 or "".join(f"<loc{n:04d}>" for n in _locs(got)) != got:
            return f"returns {got!r}, expected four <locNNNN> tokens and nothing else, such as {want!r}"
        i = next(i for i, (g, w) in enumerate(zip(_locs(got), _locs(want))) if g != w)
        return f"token {i} is <loc{_locs(got)[i]:04d}>, expected <loc{_locs(want)[i]:04d}> (all: {want!r})"

    mistakes = [
        Mistake(lambda b, s: _encoded(b, s, order=(1, 0, 3, 2), sides=(1, 0, 1, 0)), "write y before x: <y_min><x_min><y_max><x_max>"),
        Mistake(lambda b, s: _encoded(b, s, sides=(1, 0, 1, 0)), "divide y by the height and x by the width"),
        Mistake(lambda b, s: _encoded(b, s, rounding=math.floor), "round to the nearest bin; int() cuts down"),
        Mistake(lambda b, s: _encoded(b, s, clip=False), "a coordinate equal to the side gives bin 1024: clip to 1023"),
    ]
    return _run(fn, cases, box_to_loc_string, problem, mistakes,
                "equal to minipaligemma.tasks.box_to_loc_string on 3 boxes in 2 image sizes, edges included")


_CACHE_TEXT = TextConfig(version=2, vocab_size=64, width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=2,
                         head_dim=8, query_pre_attn_scalar=8)


def _cache_steps(update: Callable) -> tuple[torch.Tensor, ...]:
    """Run `update` as the decoder does: a prefill of 5 tokens, then 2 single-token steps, each
    writing both layers, the decoder advancing `length` after every step. Returns, per call,
    the keys and values returned, and at the end the cache's filled slots."""
    torch.manual_seed(SEED)
    cache = KVCache(_CACHE_TEXT, 2, 8, torch.float32)
    cache.k.normal_()  # garbage in the unwritten slots, as torch.empty may hold
    cache.v.normal_()
    shape = (2, _CACHE_TEXT.num_kv_heads, None, _CACHE_TEXT.head_dim)
    returned = []
    for t in (5, 1, 1):
        for layer in range(_CACHE_TEXT.depth):
            k, v = torch.randn(shape[0], shape[1], t, shape[3]), torch.randn(shape[0], shape[1], t, shape[3])
            length = cache.length
            keys, values = update(cache, layer, k, v)
            if cache.length != length:
                raise _AdvancedLength()
            returned += [keys.clone(), values.clone()]
        cache.length += t
    return (*returned, cache.k[:, :, :, :cache.length].clone(), cache.v[:, :, :, :cache.length].clone())


class _AdvancedLength(Exception):
    """The learner's update changed cache.length, which is the decoder's to advance."""


def _update_without_storing(cache: KVCache, layer: int, k, v):
    return (torch.cat([cache.k[layer, :, :, :cache.length], k], 2), torch.cat([cache.v[layer, :, :, :cache.length], v], 2))


def _update_at_start(cache: KVCache, layer: int, k, v):
    cache.k[layer, :, :, :k.shape[2]], cache.v[layer, :, :, :k.shape[2]] = k, v
    return cache.k[layer, :, :, :cache.length + k.shape[2]], cache.v[layer, :, :, :cache.length + k.shape[2]]


def check_kv_cache_update(fn: Callable) -> Verdict:
    """fn(cache: gemma.KVCache, layer, k, v) -> (keys, values): store one layer's new keys and
    values k, v [B, K, T, H] in cache.k[layer], cache.v[layer] ([B, K, max_len, H]) at slots
    cache.length .. cache.length + T - 1, and return every key and value so far, [B, K,
    cache.length + T, H] each. Leave cache.length alone: the decoder advances it once all layers
    are done. Reference: minipaligemma.gemma.KVCache.update, on a prefill of 5 tokens then two
    single-token steps."""
    names = [f"{kind} returned at {step}, layer {layer}" for step in ("the prefill", "step 1", "step 2")
             for layer in range(_CACHE_TEXT.depth) for kind in ("keys", "values")]
    names += ["the cache's keys after step 2", "the cache's values after step 2"]

    def run(update):
        try:
            return _cache_steps(update)
        except _AdvancedLength:
            return "advanced"

    def problem(got, want):
        if isinstance(got, str):
            return ("your update changed cache.length: leave it to the decoder, which advances it "
                    "once every layer has stored its keys")
        for g, w, name in zip(got, want, names):
            found = _tensor_problem(g, w, name)
            if found:
                return found
        return None

    mistakes = [
        Mistake(lambda: run(_update_without_storing),
                "the returned keys are right but the cache never got them: write k and v into cache.k[layer] and cache.v[layer]"),
        Mistake(lambda: run(_update_at_start),
                "the new keys go after the cached ones, at slots cache.length onwards, not at slot 0"),
        Mistake(lambda: run(lambda cache, layer, k, v: (KVCache.update(cache, layer, k, v), (k, v))[1]),
                "return every key and value so far (cached and new), not only the new ones: attention reads them all"),
        Mistake(lambda: run(lambda cache, layer, k, v: (KVCache.update(cache, layer, k, v), (cache.k[layer], cache.v[layer]))[1]),
                "return only the slots written so far, [0, length + T): the rest of the buffer is garbage"),
    ]
    return _run(lambda: run(fn), [("a 2-layer cache of 8 slots, a prefill of 5 tokens then 2 steps", ())],
                lambda: run(KVCache.update), problem, mistakes,
                "equal to minipaligemma.gemma.KVCache.update through a prefill and two decoding steps")


def _decoding_model() -> PaliGemma:
    """A small random PaliGemma whose greedy tokens vary from step to step."""
    cfg = PaliGemmaConfig(vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, mlp_dim=64, num_heads=2),
                          text=_CACHE_TEXT)
    model = PaliGemma(cfg).eval()
    torch.nn.init.normal_(model.projector.weight, std=0.5)  # image tokens that change the answer
    return model


def _count_images(model: PaliGemma, run: Callable) -> tuple[object, int]:
    """What run() returns and how many times the image encoder ran meanwhile."""
    calls = []
    handle = model.vision.register_forward_hook(lambda *_: calls.append(1))
    try:
        return run(), len(calls)
    finally:
        handle.remove()


def check_greedy_decode(fn: Callable) -> Verdict:
    """fn(model, pixel_values [B, 3, R, R], input_ids [B, T], mask_ar [B, T], n) -> ids [B, n]:
    greedy decoding with the KV cache, no early stop: `new_cache`, `prefill` (image and prompt
    once), then each chosen token fed back with `extend`. Reference: minipaligemma.generate.decode
    with eos_id=-1 (never stop); the image must be encoded once."""
    def cases():
        model = _decoding_model()
        pixels, ids = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randint(3, 64, (2, 4))
        return [("a random tiny model, 2 images, 4-token prompts, 6 new tokens",
                 (model, pixels, ids, torch.zeros_like(ids), 6))]

    def reference(model, pixels, ids, mask_ar, n):
        return decode(model, pixels, ids, mask_ar, max_new_tokens=n, eos_id=-1), 1

    def learner(model, pixels, ids, mask_ar, n):
        return _count_images(model, lambda: fn(model, pixels, ids, mask_ar, n))

    def problem(got, want):
        found = _tensor_problem(got[0], want[0], "the tokens")
        if found is None and got[1] != 1:
            return (f"the right tokens, but the image was encoded {got[1]} times: prefill once, "
                    "then extend one token at a time with the cache")
        return found

    @torch.inference_mode()
    def fed(model, pixels, ids, mask_ar, n, first_only=False, skip_first=False):
        cache = new_cache(model, pixels, ids.shape[1], n + 1)
        logits = prefill(model, pixels, ids, mask_ar, torch.ones_like(ids), cache)
        tokens = [logits.argmax(-1)]
        while len(tokens) < n + skip_first:
            logits = extend(model, tokens[0] if first_only else tokens[-1], cache)
            tokens.append(logits.argmax(-1))
        return torch.stack(tokens[skip_first:], dim=1), 1

    mistakes = [
        Mistake(lambda *a: fed(*a, first_only=True), "feed back the token just chosen, not the first one every time"),
        Mistake(lambda *a: fed(*a, skip_first=True),
                "the first new token comes from prefill's logits: keep it before the first extend"),
    ]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        built = cases()
    return _run(learner, built, reference, problem, mistakes,
                "equal to minipaligemma.generate.decode (greedy, 6 tokens), the image encoded once")


# ---------------------------------------------------------------------------------------------
# 05_training: the schedules, the training layout, one Adam step.

def _schedule_problem(got, want: float) -> str | None:
    return _numbers_problem(got, want, None)


def _at_steps(settings: Sequence[dict], steps: Callable[[dict], Sequence[int]], name: str):
    """(description, args) cases: every step of `steps(setting)` for every setting."""
    return [(f"{name}(t={t}, " + ", ".join(f"{k}={v}" for k, v in s.items()) + ")", (t, *s.values()))
            for s in settings for t in steps(s)]


def check_rsqrt_schedule(fn: Callable) -> Verdict:
    """fn(t, warmup, timescale) -> the learning-rate factor of 0-based step t: a linear warm-up
    min(1, (t + 1) / warmup), times sqrt(timescale / max(t + 1, timescale)): flat until
    `timescale` steps, then 1 / sqrt. Reference: minipaligemma.schedules.rsqrt_schedule."""
    settings = [{"warmup": 20, "timescale": 1000}, {"warmup": 10, "timescale": 60}]
    cases = _at_steps(settings, lambda s: (0, 1, s["warmup"] - 1, s["warmup"], s["timescale"] - 1,
                                                           s["timescale"], 2 * s["timescale"], 4 * s["timescale"] + 3),
                      "rsqrt_schedule")
    mistakes = [
        Mistake(lambda t, w, s: min(1.0, t / w) * math.sqrt(s / max(t, s)),
                "t is 0-based: the first step is t = 0 and counts as step t + 1"),
        Mistake(lambda t, w, s: math.sqrt(s / max(t + 1, s)), "did you forget the linear warm-up, min(1, (t + 1) / warmup)?"),
        Mistake(lambda t, w, s: min(1.0, (t + 1) / w) * math.sqrt(s / (t + 1)),
                "the factor stays at 1 until `timescale` steps: sqrt(timescale / max(t + 1, timescale))"),
        Mistake(lambda t, w, s: min(1.0, (t + 1) / w) * math.sqrt(max(t + 1, s) / s),
                "the learning rate falls as 1 / sqrt(t): sqrt(timescale / ...), not its inverse"),
    ]
    return _run(fn, cases, rsqrt_schedule, _schedule_problem, mistakes,
                f"equal to minipaligemma.schedules.rsqrt_schedule at {len(cases)} steps of 2 settings")


def check_cosine_schedule(fn: Callable) -> Verdict:
    """fn(t, total) -> the transfer's learning-rate factor at 0-based step t of `total`: a linear
    warm-up (t + 1) / w over the first w = max(1, int(0.05 * total)) steps, then
    0.5 * (1 + cos(pi * (t - w) / (total - w))), down to 0. Reference:
    minipaligemma.schedules.cosine_schedule."""
    settings = [{"total": 200}, {"total": 1000}]
    cases = _at_steps(settings, lambda s: (0, 5, 9, 10, 49, 50, 100, s["total"] // 2, s["total"] - 1),
                      "cosine_schedule")

    def warm(total):
        return max(1, int(0.05 * total))

    def cos(t, total, w, span):
        return 0.5 * (1 + math.cos(math.pi * (t - w) / span))

    mistakes = [
        Mistake(lambda t, n: 0.5 * (1 + math.cos(math.pi * t / n)), "did you forget the 5 % linear warm-up?"),
        Mistake(lambda t, n: t / warm(n) if t < warm(n) else cos(t, n, warm(n), n - warm(n)),
                "t is 0-based: warm up by (t + 1) / w, so the first step does not have a zero learning rate"),
        Mistake(lambda t, n: (t + 1) / warm(n) if t < warm(n) else cos(t, n, warm(n), n),
                "the cosine runs over the steps after the warm-up: divide by total - w, so it ends at 0"),
        Mistake(lambda t, n: (t + 1) / warm(n) if t < warm(n) else math.cos(math.pi * (t - warm(n)) / (n - warm(n))),
                "the cosine goes from 1 to 0 as 0.5 * (1 + cos(...)); cos alone goes to -1"),
    ]
    return _run(fn, cases, cosine_schedule, _schedule_problem, mistakes,
                f"equal to minipaligemma.schedules.cosine_schedule at {len(cases)} steps of 2 lengths")


def check_training_layout(fn: Callable, tokenizer: Tokenizer) -> Verdict:
    """fn(tokenizer, prefix, suffix) -> {"input_ids", "mask_ar", "mask_loss", "mask_input"}, lists
    of ints: `[bos prefix] ["\\n"] [suffix eos]`; mask_ar and mask_loss 0 on the prompt (BOS,
    prefix, "\\n") and 1 on the suffix and EOS; mask_input 1 everywhere. Tokenize the prefix,
    the separator "\\n" and the suffix separately (tokenizer.encode). Reference:
    minipaligemma.tokenizer.encode_example."""
    texts = [("caption en", "a red circle and a blue square"), ("answer en what colour is the circle?", "red"),
             ("detect circle", "<loc0100><loc0200><loc0500><loc0900> circle")]
    cases = [(f"prefix {p!r}, suffix {s!r}", (tokenizer, p, s)) for p, s in texts]
    keys = ("input_ids", "mask_ar", "mask_loss", "mask_input")

    def problem(got, want):
        if not isinstance(got, dict) or set(got) != set(keys):
            found = f"a dict of {sorted(got)}" if isinstance(got, dict) else f"a {type(got).__name__}"
            return f"returns {found}, expected a dict of {keys}"
        ids = want["input_ids"]
        for key in keys:
            g = list(got[key])
            if len(g) != len(ids):
                return f"{key} has {len(g)} entries, expected {len(ids)} (one per token: bos, prefix, \"\\n\", suffix, eos)"
            if g != want[key]:
                i = next(i for i, (a, b) in enumerate(zip(g, want[key])) if a != b)
                piece = {BOS_ID: "<bos>", EOS_ID: "<eos>"}.get(ids[i]) or tokenizer.decode([ids[i]])
                return f"{key} is wrong at position {i} (token {piece!r}): yours {g[i]}, expected {want[key][i]}"
        return None

    def layout(tok, prefix, suffix, bos=True, sep=True, eos=True, loss_on_prompt=False, causal_prompt=False):
        prompt = [BOS_ID] * bos + tok.encode(prefix) + tok.encode(SEPARATOR) * sep
        answer = tok.encode(suffix) + [EOS_ID] * eos
        steps = [0] * len(prompt) + [1] * len(answer)
        return {"input_ids": prompt + answer, "mask_ar": [1] * len(steps) if causal_prompt else steps,
                "mask_loss": [1] * len(steps) if loss_on_prompt else list(steps), "mask_input": [1] * len(steps)}

    mistakes = [
        Mistake(lambda *a: layout(*a, loss_on_prompt=True),
                "the loss is on the suffix only: mask_loss is 0 on the prompt (else the model learns to predict its own question)"),
        Mistake(lambda *a: layout(*a, causal_prompt=True),
                "mask_ar is 0 on the prompt: image and prompt form one bidirectional block (prefix-LM), only the suffix is causal"),
        Mistake(lambda *a: layout(*a, eos=False), "end the suffix with EOS, so that the model learns when to stop"),
        Mistake(lambda *a: layout(*a, sep=False), "put the separator \"\\n\" between prefix and suffix, tokenized on its own"),
        Mistake(lambda *a: layout(*a, bos=False), "start with BOS"),
    ]
    return _run(fn, cases, encode_example, problem, mistakes,
                "equal to minipaligemma.tokenizer.encode_example on 3 examples (caption, answer, detect)")


def _adam_case(step: int) -> tuple:
    """Three tensors with gradients (global norm well above 1) and Adam moments of `step - 1` steps."""
    shapes = [(4, 3), (5,), (2, 2, 2)]
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) * 3 for s in shapes]
    grads[1] *= 1e-6  # tiny gradients, where eps matters
    if step == 1:
        m, v = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    else:
        m, v = [torch.randn(s) * 0.1 for s in shapes], [torch.rand(s) * 0.01 for s in shapes]
    return params, grads, m, v, step, 1e-2


def _adam_with_torch(params, grads, m, v, step, lr, weight_decay=0.0, clip=True):
    """The trainer's step (loop.fit): clip the global gradient norm to 1.0, then torch's AdamW
    with weight decay 0 (loop.OPTIMIZERS["adamw"]), from moments m, v after `step - 1` steps."""
    params = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer = OPTIMIZERS["adamw"](params, lr=lr) if weight_decay == 0 else torch.optim.AdamW(params, lr=lr)
    for p, m_i, v_i in zip(params, m, v):
        optimizer.state[p] = {"step": torch.tensor(float(step - 1)), "exp_avg": m_i.clone(), "exp_avg_sq": v_i.clone()}
    if clip:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return ([p.detach() for p in params], [optimizer.state[p]["exp_avg"] for p in params],
            [optimizer.state[p]["exp_avg_sq"] for p in params])


def _adam_by_hand(params, grads, m, v, step, lr, clip="global", bias_correction=True, eps_inside=False):
    """Adam written out, with one thing changed: the mistakes of check_adam_step."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    if clip == "global":
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        grads = [g * min(1.0, 1.0 / (norm.item() + 1e-6)) for g in grads]
    elif clip == "each":
        grads = [g * min(1.0, 1.0 / (g.norm().item() + 1e-6)) for g in grads]
    new_p, new_m, new_v = [], [], []
    for p, g, m_i, v_i in zip(params, grads, m, v):
        m_i, v_i = b1 * m_i + (1 - b1) * g, b2 * v_i + (1 - b2) * g * g
        m_hat, v_hat = (m_i / (1 - b1**step), v_i / (1 - b2**step)) if bias_correction else (m_i, v_i)
        denom = torch.sqrt(v_hat + eps) if eps_inside else v_hat.sqrt() + eps
        new_p.append(p - lr * m_hat / denom)
        new_m.append(m_i)
        new_v.append(v_i)
    return new_p, new_m, new_v


def check_adam_step(fn: Callable) -> Verdict:
    """fn(params, grads, m, v, step, lr) -> (new params, new m, new v), lists of tensors: one
    training step as the trainer takes it (loop.fit): clip the gradients to global norm 1.0 (all
    tensors together), then Adam with betas (0.9, 0.999), eps 1e-8 and no weight decay, `step`
    counting from 1 (bias corrections 1 - beta^step). Reference: torch.nn.utils.clip_grad_norm_
    and torch.optim.AdamW(weight_decay=0), the optimizer of minipaligemma.loop."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        cases = [("the first step (m = v = 0), 3 tensors", _adam_case(1)), ("step 5, 3 tensors", _adam_case(5))]

    def problem(got, want):
        if not isinstance(got, (tuple, list)) or len(got) != 3 or not all(isinstance(x, (tuple, list)) for x in got):
            return "return three lists: (new params, new m, new v)"
        for group, g_list, w_list in zip(("params", "m", "v"), got, want):
            if not isinstance(g_list, (tuple, list)) or len(g_list) != len(w_list):
                return f"new {group} should be a list of {len(w_list)} tensors"
            for i, (g, w) in enumerate(zip(g_list, w_list)):
                found = _tensor_problem(g, w, f"new {group}[{i}]")
                if found:
                    return found
        return None

    mistakes = [
        Mistake(lambda *a: _adam_with_torch(*a, weight_decay=0.01),
                "torch.optim.AdamW decays weights by 0.01 by default; the trainer uses weight_decay=0 (plain Adam)"),
        Mistake(lambda *a: _adam_by_hand(*a, clip=None), "clip the gradients to global norm 1.0 first"),
        Mistake(lambda *a: _adam_by_hand(*a, clip="each"),
                "clip by the global norm of all gradients together, not each tensor on its own"),
        Mistake(lambda *a: _adam_by_hand(*a, bias_correction=False),
                "divide m by 1 - 0.9^step and v by 1 - 0.999^step (bias correction) before the update"),
        Mistake(lambda *a: _adam_by_hand(*a, eps_inside=True), "eps goes outside the square root: sqrt(v_hat) + eps"),
    ]
    return _run(lambda *a: fn(*[[t.clone() for t in x] if isinstance(x, list) else x for x in a]), cases,
                _adam_with_torch, problem, mistakes,
                "equal to clip_grad_norm_(1.0) + torch.optim.AdamW(weight_decay=0) at steps 1 and 5")
