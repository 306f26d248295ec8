"""The exercise checks (minipaligemma/exercises.py): each accepts a right answer and rejects the
wrong ones a learner is likely to write, with a message that says what is wrong.

Every answer below is written here, the way a learner would write it (not copied from the
package, nor from the mistake models inside the checks), so that a check that accepted a wrong
answer, rejected a right one or gave the wrong hint fails its test. The last tests run the
solutions committed in notebooks 01-03 through their checks.
"""

import math
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F

from minipaligemma import exercises as ex
from minipaligemma import make_attn_mask, prefix_lm_loss
from minipaligemma.gemma import apply_rope, attend, softcap
from minipaligemma.pretrain import sigmoid_loss

ROOT = Path(__file__).resolve().parent.parent


def passes(verdict):
    assert verdict.passed, verdict
    return True


def rejects(verdict, *phrases):
    """The verdict is a failure, on one line, naming each phrase."""
    assert not verdict.passed, f"accepted: {verdict}"
    assert "\n" not in verdict
    for phrase in phrases:
        assert phrase in verdict, f"{phrase!r} not in: {verdict}"
    return True


# ------------------------------------------------------------------------------- notebook 01

def patchify(pixels, p):
    b, c, r, _ = pixels.shape
    g = r // p
    x = pixels.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # [B, gh, gw, c, p, q]
    return x.reshape(b, g * g, c * p * p)


def test_patchify():
    assert passes(ex.check_patchify(patchify))
    column_major = lambda px, p: patchify(px.transpose(-1, -2), p).unflatten(2, (3, p, p)).transpose(-1, -2).flatten(2)  # noqa: E731
    assert rejects(ex.check_patchify(column_major), "column by column")
    channel_last = lambda px, p: patchify(px, p).unflatten(2, (3, p * p)).transpose(-1, -2).flatten(2)  # noqa: E731
    assert rejects(ex.check_patchify(channel_last), "channel last")
    assert rejects(ex.check_patchify(lambda px, p: px.flatten(2).transpose(1, 2)), "shape [2, 1024, 3] where [2, 16, 192]")


def patch_embedding(pixels, encoder, bias=True, positions=True):
    conv = encoder.patch_embed
    tokens = patchify(pixels, encoder.config.patch_size) @ conv.weight.reshape(conv.weight.shape[0], -1).T
    return tokens + (conv.bias if bias else 0) + (encoder.pos_embed if positions else 0)


def test_patch_embedding():
    assert passes(ex.check_patch_embedding(patch_embedding))
    assert rejects(ex.check_patch_embedding(lambda px, e: patch_embedding(px, e, positions=False)), "position embeddings")
    assert rejects(ex.check_patch_embedding(lambda px, e: patch_embedding(px, e, bias=False)), "bias")


def learner_sigmoid_loss(zimg, ztxt, t, b):
    logits = t * zimg @ ztxt.T + b
    labels = torch.where(torch.eye(len(zimg), dtype=torch.bool), 1.0, -1.0)
    return -torch.log(torch.sigmoid(labels * logits)).sum(dim=1).mean()


def test_sigmoid_loss():
    assert passes(ex.check_sigmoid_loss(learner_sigmoid_loss))
    assert passes(ex.check_sigmoid_loss(sigmoid_loss))
    pair_mean = lambda zi, zt, t, b: learner_sigmoid_loss(zi, zt, t, b) / len(zi)  # noqa: E731
    assert rejects(ex.check_sigmoid_loss(pair_mean), "all B² pairs")

    def zero_one_labels(zimg, ztxt, t, b):
        logits = t * zimg @ ztxt.T + b
        return -F.logsigmoid(torch.eye(len(zimg)) * logits).sum() / len(zimg)
    assert rejects(ex.check_sigmoid_loss(zero_one_labels), "+1 on the diagonal and -1 elsewhere")

    def clip(zimg, ztxt, t, b):
        return F.cross_entropy(t * zimg @ ztxt.T, torch.arange(len(zimg)))
    assert rejects(ex.check_sigmoid_loss(clip), "softmax over the batch")


# ------------------------------------------------------------------------------- notebook 02

def rms_norm(x, weight, eps, gain="1 + w", compute=torch.float32):
    h = x.to(compute)
    h = h / torch.sqrt((h * h).mean(dim=-1, keepdim=True) + eps)
    return (h * ((1 + weight) if gain == "1 + w" else weight).to(compute)).to(x.dtype)


def test_rms_norm():
    assert passes(ex.check_rms_norm(rms_norm))
    assert rejects(ex.check_rms_norm(lambda x, w, eps: rms_norm(x, w, eps, gain="w")), "w instead of 1 + w")
    assert rejects(ex.check_rms_norm(lambda x, w, eps: rms_norm(x, w, eps, compute=x.dtype)), "bfloat16", "float32")
    assert rejects(ex.check_rms_norm(lambda x, w, eps: rms_norm(x, w, 0.0)), "row 1, channel 0: yours nan", "eps")
    assert rejects(ex.check_rms_norm(lambda x, w, eps: rms_norm(x, w, eps).float()),
                   "dtype torch.float32 where torch.bfloat16 was expected")


def rope(x, positions, base, pairs="half", offset=0):
    h = x.shape[-1]
    freq = 1.0 / base ** (torch.arange(h // 2, dtype=torch.float32) * 2 / h)  # [H/2]
    angle = (positions.float() + offset)[:, None, :, None] * freq  # [B, 1, T, H/2]
    cos, sin = angle.cos(), angle.sin()
    x32 = x.float()
    if pairs == "half":
        x1, x2 = x32[..., : h // 2], x32[..., h // 2:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
    x1, x2 = x32[..., ::2], x32[..., 1::2]  # neighbouring channels
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


def test_rope():
    assert passes(ex.check_rope(rope))
    assert "i - j only" in ex.check_rope(apply_rope)
    assert rejects(ex.check_rope(lambda x, p, base: rope(x, p, base, pairs="interleaved")),
                   "interleaved", "does keep q.k a function of i - j")
    assert rejects(ex.check_rope(lambda x, p, base: rope(x, p, base, offset=1)), "0-based")
    absolute = lambda x, p, base: x + p[:, None, :, None] * 0.01  # noqa: E731  an added position, not a rotation
    assert rejects(ex.check_rope(absolute), "depends on more than i - j")


def gqa(q, k, v, mask, tile=False, scale=1.0, fill=float("-inf")):
    groups = q.shape[1] // k.shape[1]
    heads = [n % k.shape[1] if tile else n // groups for n in range(q.shape[1])]  # the KV head of query head n
    k, v = k[:, heads], v[:, heads]  # [B, N, S, H]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask[:, None], fill)
    return torch.softmax(scores, dim=-1) @ v


def test_gqa_attention():
    assert passes(ex.check_gqa_attention(gqa))
    assert passes(ex.check_gqa_attention(lambda q, k, v, m: attend(q, k, v, m, None)))
    assert rejects(ex.check_gqa_attention(lambda *a: gqa(*a, tile=True)), "n // (N/K), not n % K")
    assert rejects(ex.check_gqa_attention(lambda q, k, v, m: gqa(q, k, v, m, scale=1 / math.sqrt(q.shape[-1]))),
                   "already scaled")
    assert rejects(ex.check_gqa_attention(lambda *a: gqa(*a, fill=0.0)), "-inf")


def test_softcap():
    assert passes(ex.check_softcap(lambda x, cap: cap * torch.tanh(x / cap)))
    assert passes(ex.check_softcap(softcap))
    assert rejects(ex.check_softcap(lambda x, cap: torch.clamp(x, min=-cap, max=cap)), "hard clamp")
    assert rejects(ex.check_softcap(lambda x, cap: torch.tanh(x) * cap), "divide by cap inside the tanh")


def attention_layer(attn, x, positions, mask, scale_by="query_pre_attn_scalar", rotate_keys=True):
    cfg = attn.cfg
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    q = rope(q, positions, cfg.rope_base) / math.sqrt(getattr(cfg, scale_by))
    k = rope(k, positions, cfg.rope_base) if rotate_keys else k
    out = attend(q, k, v, mask, cfg.attn_softcap)  # [B, N, T, H]
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def test_attention_layer():
    assert passes(ex.check_attention_layer(attention_layer))
    assert rejects(ex.check_attention_layer(lambda *a: attention_layer(*a, scale_by="head_dim")),
                   "not 1/sqrt(head_dim)")
    assert rejects(ex.check_attention_layer(lambda *a: attention_layer(*a, rotate_keys=False)), "rotate the keys")


def gemma2_block(block, x, rope, mask, post_norms=True, norm_after_add=False, exact_gelu=False):
    post_a = block.post_attention_norm if post_norms else (lambda h: h)
    post_f = block.post_ffw_norm if post_norms else (lambda h: h)
    a = block.attn(block.pre_attention_norm(x), rope, mask)
    x = post_a(x + a) if norm_after_add else x + post_a(a)
    h = block.pre_ffw_norm(x)
    act = F.gelu(block.mlp.gate_proj(h)) if exact_gelu else F.gelu(block.mlp.gate_proj(h), approximate="tanh")
    m = block.mlp.down_proj(act * block.mlp.up_proj(h))
    return post_f(x + m) if norm_after_add else x + post_f(m)


def test_gemma2_block():
    assert passes(ex.check_gemma2_block(gemma2_block))
    assert rejects(ex.check_gemma2_block(lambda *a: gemma2_block(*a, post_norms=False)), "Gemma 1 block", "post-norms")
    assert rejects(ex.check_gemma2_block(lambda *a: gemma2_block(*a, norm_after_add=True)), "before the residual add")
    assert rejects(ex.check_gemma2_block(lambda *a: gemma2_block(*a, exact_gelu=True)), "tanh approximation")


# ------------------------------------------------------------------------------- notebook 03

def prefix_lm_mask(mask_ar, mask_input, causal_prefix=False, hide_pads=True, steps=True):
    c = torch.cumsum(mask_ar, dim=1) if steps else mask_ar
    s = mask_ar.shape[1]
    mask = c[:, :, None] >= c[:, None, :]  # [B, query, key]
    if causal_prefix:
        mask = mask & torch.tril(torch.ones(s, s, dtype=torch.bool))
    if hide_pads:
        real = mask_input.bool()
        mask = mask & real[:, :, None] & real[:, None, :]
    return mask


def test_prefix_lm_mask():
    assert passes(ex.check_prefix_lm_mask(prefix_lm_mask))
    assert passes(ex.check_prefix_lm_mask(make_attn_mask))
    assert rejects(ex.check_prefix_lm_mask(lambda *a: prefix_lm_mask(*a, causal_prefix=True)),
                   "batch 0, query 0, key 1: yours False, expected True", "causal attention inside the prefix")
    assert rejects(ex.check_prefix_lm_mask(lambda *a: prefix_lm_mask(*a, hide_pads=False)), "padding is attended")
    assert rejects(ex.check_prefix_lm_mask(lambda *a: prefix_lm_mask(*a, steps=False)), "cumsum(mask_ar)")
    assert rejects(ex.check_prefix_lm_mask(lambda *a: prefix_lm_mask(*a).long()), "dtype torch.int64 where torch.bool")


def test_positions():
    assert passes(ex.check_positions(lambda m: torch.cumsum(m, dim=1) - 1))
    assert passes(ex.check_positions(lambda m: (torch.cumsum(m, dim=1) - 1).clamp(min=0)))
    assert rejects(ex.check_positions(lambda m: torch.cumsum(m, dim=1)), "0-based")
    assert rejects(ex.check_positions(lambda m: torch.arange(m.shape[1]).repeat(m.shape[0], 1)),
                   "batch 0, token 18: yours 18, expected 16", "left pad")


def suffix_loss(logits, ids, mask_loss, on="suffix", per="example"):
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                             reduction="none").view(ids.shape[0], -1)  # [B, T - 1]
    weights = mask_loss[:, 1:].float() if on == "suffix" else torch.ones_like(losses)
    if per == "example":
        return ((losses * weights).sum(1) / weights.sum(1)).mean()
    return (losses * weights).sum() / weights.sum()


def test_suffix_loss():
    assert passes(ex.check_suffix_loss(suffix_loss))
    assert passes(ex.check_suffix_loss(prefix_lm_loss))
    assert rejects(ex.check_suffix_loss(lambda *a: suffix_loss(*a, on="everything")), "suffix only")
    assert rejects(ex.check_suffix_loss(lambda *a: suffix_loss(*a, per="token")), "per example")

    def unshifted(logits, ids, mask_loss):
        losses = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")  # [B, T]
        return ((losses * mask_loss).sum(1) / mask_loss.sum(1)).mean()
    assert rejects(ex.check_suffix_loss(unshifted), "t + 1")


def decoder_input(model, pixels, ids, image_scale=1.0, text_scale=True):
    width = model.config.text.width
    image = model.projector(model.vision(pixels)) * image_scale  # [B, P, D]
    text = model.llm.embed(ids) * (width**0.5 if text_scale else 1)  # [B, T, D]
    return torch.cat([image, text], dim=1)


def test_decoder_input():
    assert passes(ex.check_decoder_input(decoder_input))
    assert rejects(ex.check_decoder_input(lambda m, px, ids: decoder_input(m, px, ids, image_scale=m.config.text.width**0.5)),
                   "image tokens enter unscaled")
    assert rejects(ex.check_decoder_input(lambda *a: decoder_input(*a, text_scale=False)), "sqrt(width)")
    assert rejects(ex.check_decoder_input(lambda m, px, ids: torch.cat([m.llm.embed_tokens(ids), m.embed_image(px)], 1)),
                   "image tokens come first")


# ------------------------------------------------------------------------------- the verdicts

def test_a_raising_answer_is_reported_on_one_line():
    def broken(x, cap):
        raise IndexError("list index out of range\nsecond line")
    assert rejects(ex.check_softcap(broken), "your function raised IndexError: list index out of range")
    assert rejects(ex.check_softcap(lambda x, cap: x.tolist()), "returns a list, not a torch.Tensor")


def test_checks_leave_the_random_state_alone_and_repeat_their_verdict():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = ex.check_decoder_input(lambda *a: decoder_input(*a, text_scale=False))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert ex.check_decoder_input(lambda *a: decoder_input(*a, text_scale=False)) == first


# ------------------------------------------------------------------------------- the notebooks

NOTEBOOKS = ["01_pixels_to_tokens.ipynb", "02_gemma_decoder.ipynb", "03_paligemma.ipynb"]


def exercises_of(notebook):
    """(title, solution cell, check cell) of every exercise: a markdown cell titled "Exercise ...",
    then the code cell the learner fills in, then the code cell that calls its check."""
    cells = notebook.cells
    headings = [c for c in cells if c.cell_type == "markdown" and "# Exercise" in c.source]
    assert all(c.source.startswith("#") and "# Exercise" in c.source.splitlines()[0] for c in headings), \
        "an exercise's heading must open its own markdown cell"
    found = []
    for i, cell in enumerate(cells):
        if cell.cell_type == "markdown" and cell.source.lstrip("# ").startswith("Exercise"):
            solution, check = cells[i + 1], cells[i + 2]
            assert solution.cell_type == check.cell_type == "code", cell.source.splitlines()[0]
            found.append((cell.source.splitlines()[0], solution.source, check.source))
    return found


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_solutions_pass_their_checks(name):
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    found = exercises_of(notebook)
    assert len(found) >= 3, f"{name} has {len(found)} exercises"
    imports = next(c.source for c in notebook.cells if c.cell_type == "code")
    namespace = {}
    exec(compile(imports, f"{name} (first cell)", "exec"), namespace)  # noqa: S102
    for title, solution, check in found:
        assert "check_" in check, f"{title}: the cell after the solution calls no check"
        exec(compile(solution, f"{name} {title}", "exec"), namespace)  # noqa: S102
        verdict = eval(compile(check.strip(), f"{name} {title} (check)", "eval"), namespace)  # noqa: S307
        assert verdict.passed, f"{title}: {verdict}"
