"""The Gemma decoder (Gemma 1 and Gemma 2), as PaliGemma uses it.

Read top to bottom, the pieces are (docs/architecture.md §4):

- RMSNorm with a `(1 + w)` gain: the stored weight `w` starts at zero, so a fresh norm is the
  identity gain. Computed in float32 whatever the model dtype, because the mean of squares
  over thousands of channels loses too much in bfloat16.
- RoPE, the "half-split" form: the first half of each head's channels is rotated against the
  second half (not interleaved pairs), with 0-based positions as big_vision uses. The decoder
  computes the angles once per forward pass (`rope_angles`) and every layer turns its queries
  and keys by them (`rotate`).
- Grouped-query attention: N query heads share K key/value heads, query head n reading KV head
  n // (N / K). Queries are scaled by 1/sqrt(query_pre_attn_scalar) (head_dim, except 144 for
  Gemma 2 27B). Gemma 2 soft-caps the attention logits: 50 * tanh(logits / 50).
  `attend` is the reference: plain matrix products, soft-cap, mask and softmax, in float32.
  The config chooses the implementation (`TextConfig.attn_implementation`, see
  `attention_implementation`): "eager" is `attend` everywhere; "sdpa", the default, computes
  the same function with PyTorch's fused kernel (`fused_attend`; the tests hold the two equal)
  wherever no soft-cap applies (Gemma 1), and falls back to `attend` where one does (Gemma 2),
  since the fused kernel cannot apply the cap.
- GeGLU MLP: down(gelu_tanh(gate(x)) * up(x)).
- The block: pre-norms before attention and MLP; Gemma 2 adds post-norms on their outputs.
- The decoder: embeddings times sqrt(width) (text only: image tokens come in unscaled, see
  paligemma.py), the blocks, a final norm, logits through the tied embedding, and for Gemma 2
  an optional final soft-cap 30 * tanh(logits / 30).

The decoder takes embeddings, not token ids, so that PaliGemma can put image tokens in front.
A `KVCache` lets generation feed one token at a time without recomputing the past.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig

def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Squash x smoothly into (-cap, cap): cap * tanh(x / cap). None leaves x unchanged."""
    return x if cap is None else cap * torch.tanh(x / cap)


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), computed in float32 and returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # [..., D]
        # normed * (1 + w) as normed + normed * w: one fused op (addcmul), which matters for small
        # models, where a decoding step is mostly the fixed cost of each op (F.rms_norm, a chain
        # of internal ops on the CPU, made a tiny model's decoding 6 % slower).
        return torch.addcmul(normed, normed, self.weight.float()).to(x.dtype)  # [..., D]


def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [B, 1, T, H] of RoPE's angles for positions [B, T], in float32.

    Channel pair d turns by position * base^(-2d/H): fast in the first pairs, slowly in the last.
    Both halves of the head get their pair's angle; the sin of the first half is negated, which
    is the sign `rotate` needs there.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)  # [H/2]
    angles = positions.float()[:, None, :, None] * inv_freq  # [B, 1, T, H/2]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # [B, 1, T, H] each


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, H] by the angles of `rope_angles` (half-split RoPE, in float32).

    Channel d of the first half (x1) and channel d of the second half (x2) form a 2-D vector that
    turns by its angle a: (x1, x2) -> (x1 cos a - x2 sin a, x2 cos a + x1 sin a). With the halves
    swapped, [x2, x1], and the signed sin, that is one multiply-add over the whole head. A query
    at position i and a key at position j then score q.k as a function of i - j only: attention
    sees relative positions.
    """
    half = x.shape[-1] // 2
    x32 = x.float()
    swapped = torch.cat([x32[..., half:], x32[..., :half]], dim=-1)  # [B, heads, T, H]: [x2, x1]
    return (x32 * cos + swapped * sin).to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate x [B, heads, T, H] by its positions [B, T]: `rotate` with the angles of `rope_angles`."""
    return rotate(x, *rope_angles(positions, x.shape[-1], base))


class KVCache:
    """Keys and values of every layer, allocated once for `max_len` positions.

    `length` counts the slots already written. A forward pass over T new tokens writes slots
    [length, length + T) in every layer and attends to [0, length + T); the decoder then
    advances `length` by T. Which cached keys a query may see is the mask's business: the
    caller passes the mask (paligemma.py keeps what it needs to build it).
    """

    def __init__(self, cfg: TextConfig, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        shape = (cfg.depth, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        # Uninitialised: a slot is read only after it is written (attention reads [0, length + T)),
        # and memory never touched costs neither the time to zero it nor resident pages.
        self.k = torch.empty(shape, dtype=dtype, device=device)  # [L, B, K, max_len, H]
        self.v = torch.empty(shape, dtype=dtype, device=device)  # [L, B, K, max_len, H]
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` [B'] in that order (repeats allowed): beam search copies each
        prompt's cache to its beams, then follows every surviving beam's parent."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]  # [L, B', K, max_len, H] each

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v [B, K, T, H]; return all keys and values so far [B, K, S, H]."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Grouped-query attention, the reference path: softmax over soft-capped, masked scores.

    q [B, N, T, H] (already scaled), k and v [B, K, S, H], mask [B, T, S] (True = may attend)
    -> [B, N, T, H]. Scores, soft-cap and softmax are computed in float32.
    """
    b, n, t, h = q.shape
    kv = k.shape[1]
    # Query head j * G + g (g < G) uses KV head j: the G query heads of each KV head are stacked
    # along the time axis, so that one matrix product per KV head serves all G of them.
    q = q.reshape(b, kv, n // kv * t, h)  # [B, K, G*T, H]
    logits = (q @ k.transpose(-1, -2)).float().view(b, kv, n // kv, t, -1)  # [B, K, G, T, S]
    logits = softcap(logits, cap)
    # A masked logit becomes the most negative float rather than -inf, so a query that may
    # see nothing (a padding token) gets a harmless uniform average instead of NaN.
    logits = logits.masked_fill(~mask[:, None, None], torch.finfo(logits.dtype).min)
    probs = logits.softmax(dim=-1).to(v.dtype).view(b, kv, n // kv * t, -1)  # [B, K, G*T, S]
    return (probs @ v).view(b, n, t, h)  # [B, N, T, H]


def fused_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`attend` without a soft-cap, through PyTorch's fused kernel (the fast path).

    The mask goes in as an additive bias, 0 or the most negative float, rather than as booleans:
    a query that may see nothing then averages all keys uniformly, exactly as in `attend`, where
    a boolean mask would give NaN on some backends. KV heads are repeated for their G query heads.
    """
    groups = q.shape[1] // k.shape[1]
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1),
                                          attn_mask=bias[:, None], scale=1.0)  # [B, N, T, H]


def attention_implementation(cfg: TextConfig) -> str:
    """The attention the decoder layers run: cfg.attn_implementation, except that "sdpa" (the
    fused kernel) cannot soft-cap, so a config with an attention soft-cap runs "eager" there."""
    if cfg.attn_implementation == "sdpa" and cfg.attn_softcap is not None:
        return "eager"
    return cfg.attn_implementation


class Attention(nn.Module):
    """Grouped-query attention with RoPE and (Gemma 2) soft-capped logits. No biases."""

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        """x [B, T, D], rope = rope_angles(positions [B, T]), mask [B, T, S] (True = may attend)
        -> [B, T, D]."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # [B, N, T, H]
        k = self.k_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, K, T, H]
        v = self.v_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, K, T, H]
        cos, sin = rope  # [B, 1, T, H] each
        q = rotate(q, cos, sin) * cfg.query_pre_attn_scalar**-0.5
        k = rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, K, S, H], the past included
        if attention_implementation(cfg) == "sdpa":
            out = fused_attend(q, k, v, mask)  # [B, N, T, H]
        else:  # "eager"
            out = attend(q, k, v, mask, cfg.attn_softcap)  # [B, N, T, H]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # [B, T, D]


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm attention and MLP, each with a residual add; Gemma 2 also post-norms both."""

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        post_norm = (lambda: RMSNorm(cfg.width, cfg.norm_eps)) if cfg.post_norms else nn.Identity
        self.pre_attention_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.post_attention_norm = post_norm()
        self.pre_ffw_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.post_ffw_norm = post_norm()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.post_attention_norm(self.attn(self.pre_attention_norm(x), rope, mask, cache))
        return x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))


class TiedEmbedding(nn.Embedding):
    """The token table [V, D], read two ways (Gemma ties its input and output embeddings): its
    rows embed the input tokens (forward), and `readout` multiplies hidden states by the whole
    table for the logits. quantize.py's QuantizedEmbedding reads a quantized table the same ways."""

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., D] to logits [..., V]: hidden @ table^T."""
        return hidden @ self.weight.T  # [..., V]


class Gemma(nn.Module):
    """The decoder: embeddings in, final-normed hidden states out; `logits` reads them out."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed = TiedEmbedding(cfg.vocab_size, cfg.width)
        nn.init.normal_(self.embed.weight, std=0.02)  # small, as the tied output reads it too (PaliGemma paper §5.3; docs/architecture.md §4.7)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.depth))
        self.final_norm = RMSNorm(cfg.width, cfg.norm_eps)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] to embeddings [B, T, D], times sqrt(width) as Gemma was trained.

        The constant is rounded to the weight dtype first, as big_vision and transformers do
        (sqrt(2304) = 48 is exact in bfloat16; sqrt(2048) is not).
        """
        rows = self.embed(input_ids)  # [B, T, D]
        scale = torch.tensor(math.sqrt(self.config.width), dtype=rows.dtype)
        return rows * scale  # [B, T, D]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                local_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Embeddings x [B, T, D] at positions [B, T] -> final-normed hidden states [B, T, D].

        mask [B, T, S] says which keys each query may see (S = T without a cache, the cached
        length plus T with one). local_mask, the same with the sliding window applied, is
        needed only when the config sets a window; Gemma 2's even layers then use it.
        """
        if self.config.sliding_window is not None and local_mask is None:
            raise ValueError("this config sets a sliding window: pass local_mask for the local layers")
        rope = rope_angles(positions, self.config.head_dim, self.config.rope_base)  # cos, sin [B, 1, T, H]
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, local_mask if self.config.is_local_layer(i) else mask, cache)
        if cache is not None:
            cache.length += x.shape[1]
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., D] to vocabulary logits [..., V] through the tied embedding."""
        logits = self.embed.readout(hidden)  # [..., V]
        return softcap(logits, self.config.final_softcap)
