"""Exercise checks: a learner's function against the package's, in one readable line.

The notebooks teach a concept, then ask the learner to write it (a function in a marked cell)
and call the check for it in the next cell. A check runs the learner's function and the
package's own code on the same random inputs (seeded, so the verdict is the same every run)
and returns a `Verdict`, one line that is either

    passes: equal to minipaligemma.gemma.RMSNorm on 2 inputs, float32 and bfloat16

or says on which input, what is wrong, where, and (when the answer is a known mistake) which one:

    x [6, 64], float32 with a row of zeros: wrong value at row 0, channel 0: yours 0.2978,
    expected -0.4061 (320 of 384 values differ) — did you multiply by w instead of 1 + w?

The order of the tests is type, shape, dtype, then values. Values are compared to float32
rounding (relative 1e-4, and 1e-5 of the largest expected value for entries near zero); an
output in bfloat16 may also differ by one rounding step of bfloat16 in at most 1 % of its
entries (a value computed in float32 can round either way near a tie). The
known mistakes are written out below, beside each check: a learner's answer that equals one of
them gets its hint. The checks never change the caller's random state.

The checks, by notebook (each takes the learner's function; its docstring gives the signature):

    01_pixels_to_tokens  check_patchify, check_patch_embedding, check_sigmoid_loss
    02_gemma_decoder     check_rms_norm, check_rope, check_gqa_attention, check_softcap,
                         check_attention_layer, check_gemma2_block
    03_paligemma         check_prefix_lm_mask, check_positions, check_suffix_loss,
                         check_decoder_input
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import PaliGemmaConfig, TextConfig, VisionConfig, get_config
from .gemma import Attention, DecoderBlock, RMSNorm, apply_rope, attend, rope_angles, softcap
from .paligemma import PaliGemma, make_attn_mask, prefix_lm_loss
from .pretrain import sigmoid_loss
from .siglip import SigLIPEncoder

RTOL = 1e-4  # float32 rounding, relative to each value
LOW_PRECISION_SHARE = 0.01  # bfloat16 / float16 outputs: share of entries allowed one rounding step off
SEED = 0


class Verdict(str):
    """A check's one-line verdict. Shown as plain text in a notebook; `passed` says which kind."""

    def __repr__(self) -> str:
        return str(self)

    @property
    def passed(self) -> bool:
        return self.startswith("passes")


@dataclass(frozen=True)
class Case:
    """One input of a check: the arguments for both functions and a short description of them."""

    what: str
    args: tuple


@dataclass(frozen=True)
class Mistake:
    """A known wrong answer: `hint` is shown when `matches(case, got)` is true."""

    hint: str
    matches: Callable[[Case, torch.Tensor], bool]


def same_as(wrong: Callable, hint: str) -> Mistake:
    """The mistake of an answer equal (to float32 rounding) to what `wrong(*case.args)` computes."""
    return Mistake(hint, lambda case, got: _problem(got, wrong(*case.args), None) is None)


# ---------------------------------------------------------------------------------------------
# Comparing an answer with the expected tensor, and running a check.

def _fmt(value) -> str:
    """A value as the verdict prints it: booleans and integers as they are, floats to 4 digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _where(index: Sequence[int], axes: Sequence[str] | None) -> str:
    """"row 3, col 5" for index (3, 5), with the axes' names when the check gives them."""
    names = axes or {1: ("entry",), 2: ("row", "col")}.get(len(index), [f"dim {d}" for d in range(len(index))])
    return ", ".join(f"{name} {i}" for name, i in zip(names, index))


def _problem(got, want: torch.Tensor, axes: Sequence[str] | None) -> str | None:
    """What is wrong with `got` against `want` (type, shape, dtype, the first wrong value), or None."""
    if not isinstance(got, torch.Tensor):
        return f"returns a {type(got).__name__}, not a torch.Tensor"
    if got.shape != want.shape:
        return f"shape {list(got.shape)} where {list(want.shape)} was expected"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} where {want.dtype} was expected"
    got, want = got.detach().cpu(), want.detach().cpu()
    if want.is_floating_point():
        scale = max(want.float().nan_to_num(0.0).abs().max().item(), 1.0) if want.numel() else 1.0
        wrong = ~torch.isclose(got.float(), want.float(), rtol=RTOL, atol=RTOL * 0.1 * scale, equal_nan=True)
        if want.dtype in (torch.bfloat16, torch.float16) and wrong.float().mean() <= LOW_PRECISION_SHARE:
            step = torch.finfo(want.dtype).eps
            wrong = ~torch.isclose(got.float(), want.float(), rtol=step, atol=step * 0.1 * scale, equal_nan=True)
    else:
        wrong = got != want
    if not wrong.any():
        return None
    if want.dim() == 0:
        return f"wrong value: yours {_fmt(got.item())}, expected {_fmt(want.item())}"
    first = tuple(i.item() for i in wrong.nonzero()[0])
    return (f"wrong value at {_where(first, axes)}: yours {_fmt(got[first].item())}, expected "
            f"{_fmt(want[first].item())} ({wrong.sum().item()} of {wrong.numel()} values differ)")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def run_check(fn: Callable, reference: Callable, cases: Callable[[], list[Case]], passes: str,
              mistakes: Sequence[Mistake] = (), axes: Sequence[str] | None = None,
              compare: Callable[[Case, object, torch.Tensor], tuple] | None = None) -> Verdict:
    """Run `fn` and `reference` on every case; the first difference is the verdict.

    `cases` builds the inputs (called under a fixed seed, outside the caller's random state).
    `compare(case, got, want)`, when given, returns the (got, want) pair to compare instead, so
    that a check can compare only the entries that matter. A difference gets the hint of the
    first mistake that matches the answer.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(SEED)
        for case in cases():
            want = reference(*case.args)
            try:
                got = fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in case.args])
            except Exception as error:  # the learner's code may raise anything; say what and where
                return Verdict(f"{case.what}: your function raised {_first_line(error)}")
            shown_got, shown_want = compare(case, got, want) if compare and isinstance(got, torch.Tensor) else (got, want)
            problem = _problem(shown_got, shown_want, axes)
            if problem is not None:
                hint = next((m.hint for m in mistakes if isinstance(got, torch.Tensor) and m.matches(case, got)), None)
                return Verdict(f"{case.what}: {problem}" + (f" — {hint}" if hint else ""))
    return Verdict(f"passes: {passes}")


def _input_of(module: nn.Module, run: Callable[[], object]) -> tuple:
    """The positional arguments `module` receives the first time it is called while `run()` runs.

    This reads what the package computes inside a forward pass (the tokens before the first
    block, the decoder's positions) without copying its code."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: None if seen else seen.append(args))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def _describe(name: str, x: torch.Tensor) -> str:
    return f"{name} {list(x.shape)}, {str(x.dtype).removeprefix('torch.')}"


# ---------------------------------------------------------------------------------------------
# 01_pixels_to_tokens

def _patch_tokens_of_identity_kernel(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The package's patch embedding with an identity kernel and no bias or positions: the patches."""
    cfg = VisionConfig(image_size=pixels.shape[-1], patch_size=patch_size, width=3 * patch_size**2,
                       depth=0, mlp_dim=1, num_heads=1)
    encoder = SigLIPEncoder(cfg)
    encoder.patch_embed.weight.copy_(torch.eye(cfg.width).view(cfg.width, 3, patch_size, patch_size))
    encoder.patch_embed.bias.zero_()
    encoder.pos_embed.zero_()
    return _input_of(encoder.norm, lambda: encoder(pixels))[0]  # [B, P, 3·p·p]


def check_patchify(fn: Callable) -> Verdict:
    """fn(pixels [B, 3, R, R], patch_size p) -> patches [B, P, 3·p·p], P = (R/p)², read row by row,
    each patch flattened channel first (c, then rows, then columns: the conv kernel's order).

    Reference: the package's patch embedding (siglip.py) with an identity kernel, which is patchify.
    """
    def cases():
        return [Case(f"pixels [2, 3, 32, 32], patch_size {p}", (torch.rand(2, 3, 32, 32) * 2 - 1, p)) for p in (8, 4)]

    mistakes = [
        same_as(lambda px, p: rearrange(px, "b c (gh p) (gw q) -> b (gw gh) (c p q)", p=p, q=p),
                "your patches are read column by column; the encoder reads them row by row"),
        same_as(lambda px, p: rearrange(px, "b c (gh p) (gw q) -> b (gh gw) (p q c)", p=p, q=p),
                "each patch is flattened channel last (p q c); the conv kernel's order is channel first (c p q)"),
        same_as(lambda px, p: rearrange(px, "b c (gh p) (gw q) -> b (gh gw) (c q p)", p=p, q=p),
                "the rows and columns inside each patch are swapped"),
    ]
    return run_check(fn, _patch_tokens_of_identity_kernel, cases, mistakes=mistakes,
                     axes=("batch", "patch", "value"),
                     passes="equal to the patch embedding of siglip.py with an identity kernel, at 2 patch sizes")


def _tiny_encoder() -> SigLIPEncoder:
    encoder = SigLIPEncoder(VisionConfig(image_size=32, patch_size=8, width=48, depth=1, mlp_dim=64, num_heads=4))
    nn.init.normal_(encoder.patch_embed.bias, std=0.5)  # not zero, so that a forgotten bias shows
    return encoder


def check_patch_embedding(fn: Callable) -> Verdict:
    """fn(pixels [B, 3, R, R], encoder: SigLIPEncoder) -> tokens [B, P, D]: the patch embedding
    written as one linear map of the flattened patches (encoder.patch_embed's weight and bias),
    plus the position embeddings (encoder.pos_embed): what the first encoder block receives.
    """
    def cases():
        return [Case("pixels [2, 3, 32, 32], width 48", (torch.rand(2, 3, 32, 32) * 2 - 1, _tiny_encoder()))]

    def reference(pixels, encoder):
        return _input_of(encoder.blocks[0], lambda: encoder(pixels))[0]  # [B, P, D]

    def linear(pixels, encoder, order="b (gh gw) (c p q)", bias=True, positions=True):
        p = encoder.config.patch_size
        flat = rearrange(pixels, f"b c (gh p) (gw q) -> {order}", p=p, q=p)  # [B, P, 3·p·p]
        tokens = flat @ encoder.patch_embed.weight.flatten(1).T  # [B, P, D]
        return tokens + bias * encoder.patch_embed.bias + positions * encoder.pos_embed

    mistakes = [
        same_as(lambda px, e: linear(px, e, positions=False), "did you forget to add the position embeddings?"),
        same_as(lambda px, e: linear(px, e, bias=False), "did you forget the bias of the patch embedding?"),
        same_as(lambda px, e: linear(px, e, order="b (gw gh) (c p q)"),
                "patches read column by column get the wrong position embeddings; read them row by row"),
        same_as(lambda px, e: linear(px, e, order="b (gh gw) (p q c)"),
                "flatten each patch channel first (c p q), the order of the conv kernel's weight.flatten(1)"),
    ]
    return run_check(fn, reference, cases, mistakes=mistakes, axes=("batch", "patch", "channel"),
                     passes="equal to what SigLIPEncoder's first block receives (conv + positions)")


def check_sigmoid_loss(fn: Callable) -> Verdict:
    """fn(zimg [B, E], ztxt [B, E], t, b) -> the SigLIP loss (a scalar) of B matching pairs,
    embeddings already normalised. Reference: minipaligemma.pretrain.sigmoid_loss."""
    def cases():
        out = []
        for n, t, b in ((8, 10.0, -10.0), (5, 3.7, -1.5)):
            zimg, ztxt = F.normalize(torch.randn(n, 16), dim=-1), F.normalize(torch.randn(n, 16), dim=-1)
            out.append(Case(f"B = {n}, t = {t}, b = {b}", (zimg, ztxt, t, b)))
        return out

    def logits(zimg, ztxt, t, b):
        return t * zimg @ ztxt.T + b  # [B, B]

    mistakes = [
        same_as(lambda *a: sigmoid_loss(*a) / len(a[0]),
                "you averaged over all B² pairs; SigLIP sums over the texts and averages over the images"),
        same_as(lambda *a: -F.logsigmoid(torch.eye(len(a[0])) * logits(*a)).sum() / len(a[0]),
                "the labels are +1 on the diagonal and -1 elsewhere, not 1 and 0: -log sigmoid(label * logit)"),
        same_as(lambda zimg, ztxt, t, b: sigmoid_loss(zimg, ztxt, t, 0.0), "did you forget the bias b?"),
        same_as(lambda zimg, ztxt, t, b: F.cross_entropy(t * zimg @ ztxt.T, torch.arange(len(zimg))),
                "that is a softmax over the batch (CLIP); SigLIP classifies every pair on its own with a sigmoid"),
    ]
    return run_check(fn, sigmoid_loss, cases, mistakes=mistakes,
                     passes="equal to minipaligemma.pretrain.sigmoid_loss for 2 batches")


# ---------------------------------------------------------------------------------------------
# 02_gemma_decoder

def check_rms_norm(fn: Callable) -> Verdict:
    """fn(x [..., D], weight [D], eps) -> x / rms(x) * (1 + weight), computed in float32 and
    returned in x's dtype. Reference: minipaligemma.gemma.RMSNorm (its weight is `w`)."""
    def cases():
        x = torch.randn(6, 64) * 3 + 1
        x[1] = 0.0  # a row of zeros: only eps keeps it finite
        wide = (torch.randn(8, 2304) * 3 + 1).bfloat16()
        return [Case(_describe("x", x) + " with a row of zeros", (x, torch.randn(64) * 0.5, 1e-6)),
                Case(_describe("x", wide), (wide, torch.randn(2304) * 0.1, 1e-6))]

    def reference(x, weight, eps):
        norm = RMSNorm(x.shape[-1], eps)
        norm.weight.copy_(weight)
        return norm(x)

    def normed(x, eps):
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., D]

    mistakes = [
        same_as(lambda x, w, eps: (normed(x, eps) * w).to(x.dtype), "did you multiply by w instead of 1 + w?"),
        same_as(lambda x, w, eps: (normed(x, 0.0) * (1 + w)).to(x.dtype), "did you forget eps (a row of zeros gives 0 / 0)?"),
        same_as(lambda x, w, eps: F.layer_norm(x.float(), x.shape[-1:], eps=eps).mul(1 + w).to(x.dtype),
                "RMSNorm does not subtract the mean (that is LayerNorm)"),
        Mistake("did you compute in bfloat16? Convert x to float32 first, and the result back to x's dtype",
                lambda case, got: case.args[0].dtype == got.dtype == torch.bfloat16 and got.shape == case.args[0].shape
                and torch.allclose(got.float(), reference(*case.args).float(), rtol=0.05)),
    ]
    return run_check(fn, reference, cases, mistakes=mistakes, axes=("row", "channel"),
                     passes="equal to minipaligemma.gemma.RMSNorm on 2 inputs, float32 and bfloat16")


def _relative_positions_hold(fn: Callable, head_dim: int) -> bool:
    """Whether q.k after fn's rotation depends on i - j only: (i, j) and (i + s, j + s) score alike."""
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)
    pairs = [(5, 2), (12, 9), (30, 27), (3, 7), (20, 24)]  # two offsets, each at several places
    scores = []
    for i, j in pairs:
        qi = fn(q, torch.tensor([[i]]), 10_000.0)
        kj = fn(k, torch.tensor([[j]]), 10_000.0)
        scores.append((qi * kj).sum().item())
    same = [(0, 1), (0, 2), (3, 4)]
    return all(abs(scores[a] - scores[b]) <= 1e-4 * max(1.0, abs(scores[a])) for a, b in same)


def check_rope(fn: Callable) -> Verdict:
    """fn(x [B, heads, T, H], positions [B, T], base) -> x rotated by RoPE, half-split pairs
    (channel d with d + H/2), 0-based positions, computed in float32, returned in x's dtype.
    Reference: minipaligemma.gemma.apply_rope. A pass also checks that q.k depends on i - j only."""
    def cases():
        positions = torch.stack([torch.arange(7), torch.arange(7) + 3])  # [2, 7], the second row shifted
        return [Case(_describe("x", torch.empty(2, 3, 7, 16)), (torch.randn(2, 3, 7, 16), positions, 10_000.0)),
                Case(_describe("x", torch.empty(1, 2, 5, 8, dtype=torch.bfloat16)) + ", positions 100..104",
                     (torch.randn(1, 2, 5, 8).bfloat16(), torch.arange(100, 105)[None], 10_000.0))]

    def interleaved(x, positions, base):
        h = x.shape[-1]
        angles = positions.float()[:, None, :, None] * base ** (-torch.arange(0, h, 2).float() / h)  # [B, 1, T, H/2]
        x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
        out = torch.stack([x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin()], dim=-1)
        return out.flatten(-2).to(x.dtype)

    def angle_scale(factor):
        return lambda x, positions, base: apply_rope(x, positions, base ** factor)

    mistakes = [
        same_as(interleaved, "that is interleaved RoPE (pairs 2d, 2d + 1); Gemma pairs channel d with d + H/2"),
        same_as(lambda x, positions, base: apply_rope(x, positions + 1, base), "positions are 0-based: the first token is at 0"),
        same_as(lambda x, positions, base: apply_rope(x, -positions, base),
                "your rotation turns the other way: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)"),
        same_as(angle_scale(0.5), "pair d turns by position * base^(-2d/H): did you use d/H?"),
    ]
    verdict = run_check(fn, apply_rope, cases, mistakes=mistakes, axes=("batch", "head", "position", "channel"),
                        passes="equal to minipaligemma.gemma.apply_rope in float32 and bfloat16")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(SEED)
        try:
            relative = _relative_positions_hold(fn, 16)
        except Exception:  # already reported by run_check if fn fails on ordinary inputs
            relative = False
    if verdict.passed:
        return Verdict(verdict + "; q.k depends on i - j only")
    return Verdict(verdict + ("; your rotation does keep q.k a function of i - j" if relative
                              else "; and q.k of your rotation depends on more than i - j"))


def check_gqa_attention(fn: Callable) -> Verdict:
    """fn(q [B, N, T, H], k [B, K, S, H], v [B, K, S, H], mask [B, T, S]) -> [B, N, T, H]:
    softmax(q k^T + masked) v, query head n reading KV head n // (N / K); q comes already scaled,
    mask True = may attend. Reference: minipaligemma.gemma.attend without a soft-cap."""
    def cases():
        out = []
        for n, kv in ((4, 2), (6, 3), (4, 1)):
            q, k, v = torch.randn(2, n, 5, 8), torch.randn(2, kv, 5, 8), torch.randn(2, kv, 5, 8)
            mask = torch.ones(2, 5, 5, dtype=torch.bool).tril()  # causal: every query sees itself
            out.append(Case(f"N = {n} query heads, K = {kv} KV heads", (q, k, v, mask)))
        return out

    def plain(q, k, v, mask, heads="interleave", scale=1.0, fill=-math.inf):
        g = q.shape[1] // k.shape[1]
        k, v = (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)) if heads == "interleave" else (k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1))
        scores = (q @ k.transpose(-1, -2)) * scale  # [B, N, T, S]
        return scores.masked_fill(~mask[:, None], fill).softmax(-1) @ v

    mistakes = [
        same_as(lambda q, k, v, m: plain(q, k, v, m, heads="repeat"),
                "query head n reads KV head n // (N/K), not n % K: repeat_interleave the KV heads, do not tile them"),
        same_as(lambda q, k, v, m: plain(q, k, v, m, scale=q.shape[-1] ** -0.5),
                "q comes already scaled (by 1/sqrt(query_pre_attn_scalar)): do not scale again"),
        same_as(lambda q, k, v, m: plain(q, k, v, m, fill=0.0),
                "a masked score must become -inf (or the most negative float) before the softmax, not 0"),
        same_as(lambda q, k, v, m: plain(q, k, v, torch.ones_like(m)), "did you forget the mask?"),
    ]
    return run_check(fn, lambda q, k, v, mask: attend(q, k, v, mask, None), cases, mistakes=mistakes,
                     axes=("batch", "head", "query", "channel"),
                     passes="equal to minipaligemma.gemma.attend for N/K = 2, 2 and 4 (multi-query)")


def check_softcap(fn: Callable) -> Verdict:
    """fn(x, cap) -> cap * tanh(x / cap). Reference: minipaligemma.gemma.softcap."""
    def cases():
        return [Case(f"x from -200 to 200, cap {cap}", (torch.linspace(-200, 200, 81), cap)) for cap in (50.0, 30.0)]

    mistakes = [
        same_as(lambda x, cap: x.clamp(-cap, cap), "that is a hard clamp; the soft-cap bends smoothly: cap * tanh(x / cap)"),
        same_as(lambda x, cap: cap * torch.tanh(x), "divide by cap inside the tanh: cap * tanh(x / cap)"),
        same_as(lambda x, cap: torch.tanh(x / cap), "multiply the tanh by cap: cap * tanh(x / cap)"),
    ]
    return run_check(fn, softcap, cases, mistakes=mistakes, passes="equal to minipaligemma.gemma.softcap at caps 50 and 30")


def _tiny_text() -> TextConfig:
    """The tiny preset's decoder: 4 query heads, 2 KV heads, head_dim 16, query_pre_attn_scalar 24."""
    return replace(get_config("tiny").text, attn_implementation="eager")


def check_attention_layer(fn: Callable) -> Verdict:
    """fn(attn: gemma.Attention, x [B, T, D], positions [B, T], mask [B, T, T]) -> [B, T, D]:
    project to queries, keys and values, rotate queries and keys (RoPE), scale the queries by
    1/sqrt(query_pre_attn_scalar), attend (with the config's soft-cap), project out. The layer
    is the tiny preset's: head_dim 16 but query_pre_attn_scalar 24, as the 27B has 128 and 144.
    Reference: the layer itself, attn(x, rope_angles(positions, ...), mask)."""
    cfg = _tiny_text()

    def cases():
        attn = Attention(cfg, layer=0)
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.mul_(4.0)  # larger scores, so that every mistake shows
        x, mask = torch.randn(2, 6, cfg.width), torch.ones(2, 6, 6, dtype=torch.bool).tril()
        return [Case(_describe("x", x) + ", tiny preset's layer", (attn, x, torch.arange(6).expand(2, 6), mask))]

    def reference(attn, x, positions, mask):
        return attn(x, rope_angles(positions, cfg.head_dim, cfg.rope_base), mask)

    def written(attn, x, positions, mask, scalar=cfg.query_pre_attn_scalar, rope_keys=True, split="b t (n h) -> b n t h"):
        heads = lambda t, n: rearrange(t, split, n=n)  # noqa: E731
        q, k, v = heads(attn.q_proj(x), cfg.num_heads), heads(attn.k_proj(x), cfg.num_kv_heads), heads(attn.v_proj(x), cfg.num_kv_heads)
        q = apply_rope(q, positions, cfg.rope_base) * scalar**-0.5  # [B, N, T, H]
        k = apply_rope(k, positions, cfg.rope_base) if rope_keys else k  # [B, K, T, H]
        return attn.o_proj(rearrange(attend(q, k, v, mask, cfg.attn_softcap), "b n t h -> b t (n h)"))

    mistakes = [
        same_as(lambda *a: written(*a, scalar=cfg.head_dim),
                "queries are scaled by 1/sqrt(query_pre_attn_scalar) (24 here, 144 for the 27B), not 1/sqrt(head_dim)"),
        same_as(lambda *a: written(*a, scalar=1), "did you forget to scale the queries by 1/sqrt(query_pre_attn_scalar)?"),
        same_as(lambda *a: written(*a, rope_keys=False), "rotate the keys too: RoPE turns queries and keys alike"),
        same_as(lambda *a: written(*a, split="b t (h n) -> b n t h"),
                "split the channels as (heads, head_dim): head n owns channels n·H to (n+1)·H - 1"),
    ]
    return run_check(fn, reference, cases, mistakes=mistakes, axes=("batch", "position", "channel"),
                     passes="equal to minipaligemma.gemma.Attention of the tiny preset (query_pre_attn_scalar 24)")


def check_gemma2_block(fn: Callable) -> Verdict:
    """fn(block: gemma.DecoderBlock, x [B, T, D], rope, mask [B, T, T]) -> [B, T, D]: one Gemma 2
    block from its parts (block.pre_attention_norm, block.attn, block.post_attention_norm,
    block.pre_ffw_norm, block.mlp.gate_proj / up_proj / down_proj, block.post_ffw_norm).
    Reference: the block itself, block(x, rope, mask)."""
    cfg = _tiny_text()

    def cases():
        block = DecoderBlock(cfg, layer=0)
        for norm in (block.pre_attention_norm, block.post_attention_norm, block.pre_ffw_norm, block.post_ffw_norm):
            nn.init.normal_(norm.weight, std=0.3)  # trained-looking gains, so that each norm matters
        x = torch.randn(2, 6, cfg.width)
        rope = rope_angles(torch.arange(6).expand(2, 6), cfg.head_dim, cfg.rope_base)
        return [Case(_describe("x", x) + ", tiny preset's block", (block, x, rope, torch.ones(2, 6, 6, dtype=torch.bool).tril()))]

    def written(block, x, rope, mask, post=True, post_after_add=False, gelu="tanh", gate_first=True):
        post_attn = block.post_attention_norm if post else nn.Identity()
        post_ffw = block.post_ffw_norm if post else nn.Identity()
        a = block.attn(block.pre_attention_norm(x), rope, mask)
        x = post_attn(x + a) if post_after_add else x + post_attn(a)
        h = block.pre_ffw_norm(x)
        mlp = block.mlp
        gate, up = (mlp.gate_proj(h), mlp.up_proj(h)) if gate_first else (mlp.up_proj(h), mlp.gate_proj(h))
        m = mlp.down_proj(F.gelu(gate, approximate=gelu) * up)
        return post_ffw(x + m) if post_after_add else x + post_ffw(m)

    mistakes = [
        same_as(lambda *a: written(*a, post=False), "that is a Gemma 1 block: Gemma 2 also norms the outputs of attention and MLP (post-norms)"),
        same_as(lambda *a: written(*a, post_after_add=True), "the post-norm goes on the sublayer's output, before the residual add"),
        same_as(lambda *a: written(*a, gelu="none"), "GeGLU uses the tanh approximation of GELU: F.gelu(..., approximate='tanh')"),
        same_as(lambda *a: written(*a, gate_first=False), "the GELU goes on gate_proj's output, which then multiplies up_proj's"),
    ]
    return run_check(fn, lambda block, x, rope, mask: block(x, rope, mask), cases, mistakes=mistakes,
                     axes=("batch", "position", "channel"),
                     passes="equal to minipaligemma.gemma.DecoderBlock of the tiny Gemma 2 preset")


# ---------------------------------------------------------------------------------------------
# 03_paligemma

def check_prefix_lm_mask(fn: Callable) -> Verdict:
    """fn(mask_ar [B, S], mask_input [B, S]) -> bool [B, S, S], True where query i may see key j:
    with c = cumsum(mask_ar), c[j] <= c[i] and both real tokens.
    Reference: minipaligemma.make_attn_mask."""
    def cases():
        # image + prompt (mask_ar 0), a 3-token suffix, 2 right pads (mask_ar 1, mask_input 0);
        # the second row: a longer suffix and no pad.
        mask_ar = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1, 1]])
        mask_input = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0], [1] * 9])
        return [Case("mask_ar [2, 9] with a 4-token prefix, 3 suffix tokens and 2 pads", (mask_ar, mask_input))]

    def rule(mask_ar, mask_input, visible, queries=True, keys=True):
        c, real = torch.cumsum(mask_ar, 1), mask_input.bool()  # [B, S] each
        m = visible(c[:, None, :], c[:, :, None])  # [B, S, S], (key step, query step)
        return m & (real[:, None, :] if keys else True) & (real[:, :, None] if queries else True)

    mistakes = [
        same_as(lambda ar, inp: rule(ar, inp, lambda kc, qc: kc <= qc) & torch.ones(ar.shape[1], ar.shape[1], dtype=torch.bool).tril(),
                "causal attention inside the prefix: the image and prompt see each other both ways"),
        same_as(lambda ar, inp: rule(ar, inp, lambda kc, qc: kc <= qc, keys=False, queries=False),
                "padding is attended: a key or query with mask_input 0 must see nothing and be seen by nothing"),
        same_as(lambda ar, inp: rule(ar, inp, lambda kc, qc: kc <= qc, queries=False),
                "padding queries see real tokens: mask both the keys and the queries with mask_input"),
        same_as(lambda ar, inp: rule(ar, inp, lambda kc, qc: kc < qc),
                "use c[j] <= c[i]: with < a token does not see its own step (its block, or itself)"),
        same_as(lambda ar, inp: rule(ar, inp, lambda kc, qc: kc <= qc).transpose(1, 2),
                "the mask is transposed: rows are queries, columns the keys they may see"),
        same_as(lambda ar, inp: (ar[:, None, :] <= ar[:, :, None]) & inp.bool()[:, None, :] & inp.bool()[:, :, None],
                "compare the cumulative sums c = cumsum(mask_ar), not mask_ar itself"),
    ]
    return run_check(fn, make_attn_mask, cases, mistakes=mistakes, axes=("batch", "query", "key"),
                     passes="equal to minipaligemma.make_attn_mask with a prefix, a suffix and padding")


def _tiny_paligemma() -> PaliGemma:
    cfg: PaliGemmaConfig = get_config("tiny")
    return PaliGemma(replace(cfg, text=replace(cfg.text, vocab_size=64))).eval()


def check_positions(fn: Callable) -> Verdict:
    """fn(mask_input [B, S]) -> positions [B, S] (integers) of the whole decoder sequence (image
    tokens, then text): 0-based, counting real tokens only, so that a left-padded prompt has the
    positions it would have alone. Only real tokens are compared. Reference: the positions
    PaliGemma.forward gives its decoder (paligemma.py)."""
    image_tokens = get_config("tiny").num_image_tokens

    def cases():
        text_input = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # row 0 left-padded by 2
        ids = torch.randint(3, 64, text_input.shape) * text_input
        pixels = torch.rand(2, 3, 32, 32) * 2 - 1
        mask_input = torch.cat([torch.ones(2, image_tokens, dtype=torch.long), text_input], dim=1)  # [B, P + T]
        return [Case(f"{image_tokens} image tokens + 6 text tokens, row 0 left-padded by 2",
                     (mask_input, ids, pixels, _tiny_paligemma()))]

    def reference(mask_input, ids, pixels, model):
        text_input = mask_input[:, image_tokens:]
        return _input_of(model.llm, lambda: model(pixels, ids, torch.zeros_like(ids), text_input))[1]  # [B, P + T]

    def real_only(case, got, want):
        real = case.args[0].bool()
        return (got.where(real, -1) if got.shape == want.shape else got), want.where(real, -1)

    mistakes = [
        same_as(lambda m, *_: torch.cumsum(m, 1), "positions are 0-based: cumsum(mask_input) - 1"),
        same_as(lambda m, *_: torch.arange(m.shape[1]).expand_as(m),
                "positions count real tokens only: a left pad must not shift the prompt (cumsum(mask_input) - 1)"),
        same_as(lambda m, *_: torch.arange(1, m.shape[1] + 1).expand_as(m),
                "positions count real tokens only, from 0: cumsum(mask_input) - 1"),
    ]
    return run_check(lambda mask_input, *_: fn(mask_input), reference, cases, mistakes=mistakes, axes=("batch", "token"),
                     compare=real_only, passes="equal to the decoder positions of PaliGemma.forward, left padding included")


def check_suffix_loss(fn: Callable) -> Verdict:
    """fn(logits [B, T, V], input_ids [B, T], mask_loss [B, T]) -> the loss (a scalar): logits at
    t predict input_ids[:, t + 1], counted where mask_loss[:, t + 1] is 1; mean over each
    example's counted tokens, then over the batch (big_vision). Reference:
    minipaligemma.prefix_lm_loss."""
    def cases():
        ids = torch.randint(0, 11, (3, 9))
        mask_loss = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0, 0, 0]])
        return [Case("logits [3, 9, 11], suffixes of 4, 5 and 2 tokens", (torch.randn(3, 9, 11) * 2, ids, mask_loss))]

    def token_loss(logits, ids, shift=True):  # [B, T - 1] or [B, T]
        return F.cross_entropy((logits[:, :-1] if shift else logits).transpose(1, 2), ids[:, 1:] if shift else ids, reduction="none")

    def mean(loss, weights, per_example=True):
        weights = weights.float()
        return ((loss * weights).sum(1) / weights.sum(1)).mean() if per_example else (loss * weights).sum() / weights.sum()

    mistakes = [
        Mistake("did you count the prompt's tokens too? The loss is on the suffix only (mask_loss)",
                lambda case, got: any(_problem(got, mean(token_loss(*case.args[:2]), torch.ones(3, 8), per_example), None) is None
                                      for per_example in (True, False))),
        same_as(lambda lg, ids, m: mean(token_loss(lg, ids, shift=False), m),
                "the logit at t predicts the token at t + 1: compare logits[:, :-1] with input_ids[:, 1:]"),
        same_as(lambda lg, ids, m: mean(token_loss(lg, ids), m[:, :-1]),
                "weigh by mask_loss[:, 1:], the mask of the predicted tokens, not mask_loss[:, :-1]"),
        same_as(lambda lg, ids, m: mean(token_loss(lg, ids), m[:, 1:], per_example=False),
                "that averages all tokens of the batch (transformers); big_vision averages per example, then over examples"),
    ]
    return run_check(fn, prefix_lm_loss, cases, mistakes=mistakes,
                     passes="equal to minipaligemma.prefix_lm_loss on 3 examples of different lengths")


def check_decoder_input(fn: Callable) -> Verdict:
    """fn(model: PaliGemma, pixel_values [B, 3, R, R], input_ids [B, T]) -> [B, P + T, D]: what
    the decoder's first layer receives: the image tokens (SigLIP, then the projector), unscaled,
    followed by the text embeddings times sqrt(width). Reference: PaliGemma.forward's input to
    the decoder (paligemma.py)."""
    def cases():
        model = _tiny_paligemma()
        nn.init.normal_(model.projector.bias, std=0.5)
        return [Case("tiny PaliGemma, 2 images, 5 text tokens",
                     (model, torch.rand(2, 3, 32, 32) * 2 - 1, torch.randint(3, 64, (2, 5))))]

    def reference(model, pixels, ids):
        return _input_of(model.llm, lambda: model(pixels, ids, torch.zeros_like(ids)))[0]  # [B, P + T, D]

    def written(model, pixels, ids, image_scale=1.0, text_scale=True, projector=True, image_first=True):
        image = model.vision(pixels)  # [B, P, D]
        image = (model.projector(image) if projector else image) * image_scale
        text = model.llm.embed(ids) * (math.sqrt(model.config.text.width) if text_scale else 1.0)  # [B, T, D]
        return torch.cat([image, text] if image_first else [text, image], dim=1)

    width = get_config("tiny").text.width
    mistakes = [
        same_as(lambda *a: written(*a, image_scale=math.sqrt(width)),
                "image tokens enter unscaled: only the text embeddings are multiplied by sqrt(width)"),
        same_as(lambda *a: written(*a, image_scale=1 / math.sqrt(width)), "image tokens enter unscaled, not divided by sqrt(width)"),
        same_as(lambda *a: written(*a, text_scale=False), "did you forget to multiply the text embeddings by sqrt(width)?"),
        same_as(lambda *a: written(*a, image_first=False), "the image tokens come first, then the text"),
        same_as(lambda *a: written(*a, projector=False), "did you forget the projector (model.projector) after SigLIP?"),
    ]
    return run_check(fn, reference, cases, mistakes=mistakes, axes=("batch", "token", "channel"),
                     passes="equal to what PaliGemma.forward hands its decoder (image, then text)")
