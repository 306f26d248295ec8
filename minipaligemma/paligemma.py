"""PaliGemma: SigLIP image tokens in front of Gemma text tokens, one prefix-LM.

The sequence the decoder reads is (docs/sequence-and-masks.md §1)

    [image tokens] [BOS prefix "\\n"] [suffix EOS] [PAD ...]
    \\_______ one bidirectional block _______/ \\__ causal __/

- Image tokens are the SigLIP outputs passed through one linear projector. They enter the
  decoder unscaled, while text embeddings are multiplied by sqrt(width): Gemma was trained on
  scaled text embeddings, and the projector (zero-initialised in pretraining) simply learns the
  right scale for images.
- The attention mask follows big_vision's `mask_ar` rule: with c = cumsum(mask_ar), query i may
  see key j iff c[j] <= c[i] (and both are real tokens). Tokens with mask_ar = 0 at the start
  form one block that sees itself both ways (image + prefix); each mask_ar = 1 token starts a
  new step, so the suffix is causal.
  The rule is written once, for one query-key pair (`may_attend`, and `near_enough` for
  Gemma 2's optional sliding window), and read two ways: as dense masks [B, T, S] for the eager
  and sdpa attention (`block_mask`), and as a BlockMask for flex_attention (`flex_mask`).
- Positions are 0-based over the whole sequence, real tokens only: cumsum(mask_input) - 1.
- Decoding with a cache (`PaliGemmaCache`) continues the sequence a few tokens at a time: the
  decoder's `KVCache` keeps the keys and values, and a `MaskCache` beside it keeps each cached
  key's step, validity and position, from which the new tokens' steps, positions and masks
  follow.
- Logits are returned for the text positions only, as big_vision does.
- The loss is next-token cross-entropy on the suffix only (`mask_loss`), averaged per example
  and then over the batch, as big_vision does; transformers instead averages over all
  supervised tokens of the batch (`reduction="token"` computes that). `prefix_lm_loss` is the
  reference, from logits [B, T, V]; training uses `supervised_loss`, the same value with logits
  computed only at the positions whose next token carries loss, a few at a time.
- `set_attention` switches a built model's decoder attention ("eager", "sdpa", "flex").
- `checkpoint_blocks` makes every block of both towers recompute its activations in the
  backward pass instead of keeping them: less memory for about a third more compute.
"""

from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.utils.checkpoint import checkpoint

from .config import PaliGemmaConfig, TextConfig
from .gemma import Gemma, KVCache, attention_implementation
from .siglip import SigLIPEncoder
from .tokenizer import Tokenizer


def may_attend(q_step: torch.Tensor, q_valid: torch.Tensor, k_step: torch.Tensor, k_valid: torch.Tensor) -> torch.Tensor:
    """big_vision's rule, elementwise: a query sees a key iff the key's step (cumsum of mask_ar)
    is not later than the query's and both are real tokens. True = may attend."""
    return (k_step <= q_step) & k_valid & q_valid


def near_enough(q_position: torch.Tensor, k_position: torch.Tensor, q_step: torch.Tensor, k_step: torch.Tensor,
                window: int) -> torch.Tensor:
    """The sliding window's rule, elementwise: the key lies fewer than `window` positions back,
    or both tokens belong to one bidirectional block (same step), which is exempt."""
    return (q_position - k_position < window) | (q_step == k_step)


def block_mask(q_steps: torch.Tensor, q_valid: torch.Tensor, k_steps: torch.Tensor,
               k_valid: torch.Tensor) -> torch.Tensor:
    """`may_attend` for every query [B, T] against every key [B, S] -> mask [B, T, S]."""
    return may_attend(q_steps[:, :, None], q_valid[:, :, None], k_steps[:, None, :], k_valid[:, None, :])


def make_attn_mask(mask_ar: torch.Tensor, mask_input: torch.Tensor) -> torch.Tensor:
    """The prefix-LM mask [B, S, S] of a whole sequence from mask_ar, mask_input [B, S].

    With c = cumsum(mask_ar), query i sees key j iff c[j] <= c[i] and both are real tokens
    (mask_input = 1).
    """
    steps, valid = torch.cumsum(mask_ar.long(), dim=1), mask_input.bool()  # [B, S] each
    return block_mask(steps, valid, steps, valid)


def sliding_window_mask(mask: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor,
                        q_steps: torch.Tensor, k_steps: torch.Tensor, window: int) -> torch.Tensor:
    """Restrict a prefix-LM mask [B, T, S] to keys fewer than `window` positions back.

    transformers' Gemma 2 does this in its local layers; big_vision does not (see config.py).
    As in transformers, a bidirectional block is exempt: two tokens of the same step (which
    see each other both ways) keep seeing each other at any distance (`near_enough`).
    """
    return mask & near_enough(q_positions[:, :, None], k_positions[:, None, :], q_steps[:, :, None],
                              k_steps[:, None, :], window)  # [B, T, S]


def flex_mask(q_steps: torch.Tensor, q_valid: torch.Tensor, q_positions: torch.Tensor, k_steps: torch.Tensor,
              k_valid: torch.Tensor, k_positions: torch.Tensor, window: int | None = None) -> BlockMask:
    """The same masks for flex_attention: queries [B, T] against keys [B, S] -> a BlockMask.

    flex_attention asks a `mask_mod(batch, head, query, key)` function about single query-key
    pairs; `create_block_mask` asks it about all of them once and keeps, per block of 128
    queries and 128 keys, whether the block is hidden, fully visible or mixed, so the kernel
    skips hidden blocks and evaluates the rule only inside mixed ones. The rule is
    `may_attend` (and, with a window, `near_enough`), read at the pair's entries.
    """
    def visible(batch, head, query, key):
        seen = may_attend(q_steps[batch, query], q_valid[batch, query], k_steps[batch, key], k_valid[batch, key])
        if window is None:
            return seen
        return seen & near_enough(q_positions[batch, query], k_positions[batch, key], q_steps[batch, query],
                                  k_steps[batch, key], window)

    (b, t), s = q_steps.shape, k_steps.shape[1]
    return create_block_mask(visible, b, None, t, s, device=q_steps.device)


class MaskCache:
    """What later queries need to know of every cached key to build their masks: its block step
    (cumsum of mask_ar), whether it is a real token, and its position (for the sliding window).
    Allocated once for `max_len` keys, as the KV cache beside it; `length` counts those noted."""

    def __init__(self, batch_size: int, max_len: int, device=None):
        self.steps = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)  # [B, max_len]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # [B, max_len]
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)  # [B, max_len]
        self.length = 0

    def last_step_and_count(self) -> tuple[torch.Tensor | int, torch.Tensor | int]:
        """The step of the last key and the number of real keys so far, [B, 1] each (0 and 0 when
        empty): new tokens continue both."""
        if self.length == 0:
            return 0, 0
        return self.steps[:, self.length - 1:self.length], self.valid[:, :self.length].sum(dim=1, keepdim=True)

    def append(self, steps: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor):
        """Note the new keys' steps, validity and positions [B, T]; return those of every key so
        far, [B, S] each (S = length + T)."""
        end = self.length + steps.shape[1]
        if end > self.steps.shape[1]:
            raise ValueError(f"the cache holds {self.steps.shape[1]} positions; {end} were asked for")
        self.steps[:, self.length:end] = steps
        self.valid[:, self.length:end] = valid
        self.positions[:, self.length:end] = positions
        self.length = end
        return self.steps[:, :end], self.valid[:, :end], self.positions[:, :end]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` [B'] in that order, as `KVCache.select_rows` does."""
        self.steps, self.valid, self.positions = self.steps[rows], self.valid[rows], self.positions[rows]


class PaliGemmaCache:
    """What decoding carries from one model call to the next: the decoder's keys and values
    (`kv`) and what the masks need to know of them (`mask`), both for `max_len` positions."""

    def __init__(self, cfg: TextConfig, batch_size: int, max_len: int, dtype: torch.dtype, device=None):
        self.kv = KVCache(cfg, batch_size, max_len, dtype, device)
        self.mask = MaskCache(batch_size, max_len, device)

    @property
    def length(self) -> int:
        """Positions held so far."""
        return self.kv.length

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` [B'] in that order (repeats allowed), keys and masks alike."""
        self.kv.select_rows(rows)
        self.mask.select_rows(rows)


def prefix_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask_loss: torch.Tensor,
                   reduction: str = "example", label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy on the supervised tokens (the suffix).

    logits [B, T, V] at position t predict input_ids[:, t + 1], counted where mask_loss[:, t + 1]
    is 1 (so the "\\n" separator's logit predicts the first suffix token).
    reduction "example" (big_vision): mean over each example's supervised tokens, then mean
    over the batch, so a short answer weighs as much as a long one. "token" (transformers):
    mean over every supervised token of the batch. "none": the per-example means [B].
    """
    targets = input_ids[:, 1:]  # [B, T-1]
    weights = mask_loss[:, 1:].float()  # [B, T-1]
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets,
                                 reduction="none", label_smoothing=label_smoothing)  # [B, T-1]
    if reduction in ("example", "none"):
        per_example = (token_loss * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B]
        return per_example.mean() if reduction == "example" else per_example
    if reduction == "token":
        return (token_loss * weights).sum() / weights.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'example', 'token' or 'none', got {reduction!r}")


def supervised_loss(llm: Gemma, states: torch.Tensor, input_ids: torch.Tensor, mask_loss: torch.Tensor,
                    reduction: str = "example", label_smoothing: float = 0.0, chunk: int = 256) -> torch.Tensor:
    """prefix_lm_loss(llm.logits(states), input_ids, mask_loss, ...), with logits computed at the
    supervised positions only.

    states [B, T, D]: the decoder's final states at the text tokens (PaliGemma.text_states);
    mask_loss [B, T] holds 1 for a supervised token, 0 otherwise. prefix_lm_loss reads logits at
    every position, although only those whose next token carries loss count: for PaliGemma 2
    (V = 257152) at batch 8 and 128 text tokens that is 1 GiB of float32 logits, and as much
    again for their log-softmax and their gradient. Here the readout (tied embedding, final
    soft-cap) reads the N supervised positions only, `chunk` of them at a time, and each chunk
    is recomputed in the backward pass (torch.utils.checkpoint) instead of kept: the largest
    tensors of the loss are [chunk, V]. Value and gradients are prefix_lm_loss's, up to float32
    rounding (the sums run in another order).
    """
    rows, cols = mask_loss[:, 1:].nonzero(as_tuple=True)  # [N] each: position cols predicts token cols + 1
    picked, targets = states[rows, cols], input_ids[rows, cols + 1]  # [N, D], [N]
    # At least one chunk, possibly empty, so that a batch without a supervised token still has a graph.
    token_loss = torch.cat([checkpoint(_token_losses, llm, picked[i:i + chunk], targets[i:i + chunk], label_smoothing,
                                       use_reentrant=False) for i in range(0, max(len(targets), 1), chunk)])  # [N]
    if reduction == "token":
        return token_loss.sum() / max(len(targets), 1)
    if reduction not in ("example", "none"):
        raise ValueError(f"reduction must be 'example', 'token' or 'none', got {reduction!r}")
    sums = torch.zeros(states.shape[0], device=states.device).index_add(0, rows, token_loss)  # [B]
    per_example = sums / mask_loss[:, 1:].sum(1).clamp(min=1)  # [B]
    return per_example.mean() if reduction == "example" else per_example


def _token_losses(llm: Gemma, states: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy of the logits of states [n, D] against targets [n] -> [n], in float32."""
    logits = llm.logits(states).float()  # [n, V]
    return F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)  # [n]


class PaliGemma(nn.Module):
    """Image encoder + linear projector + Gemma decoder."""

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision = SigLIPEncoder(config.vision)
        self.projector = nn.Linear(config.vision.width, config.text.width)
        self.llm = Gemma(config.text)
        # The tokenizer that goes with the weights: `checkpoint.load` sets it when a
        # tokenizer.model lies beside them; None for a model built here.
        self.tokenizer: Tokenizer | None = None

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R], or frames [B, F, 3, R, R], to image tokens [B, F * P, D].

        Frames are encoded independently and their tokens concatenated, no separator.
        """
        frames = pixel_values if pixel_values.dim() == 5 else pixel_values[:, None]  # [B, F, 3, R, R]
        b, f = frames.shape[:2]  # B, F
        tokens = self.projector(self.vision(frames.flatten(0, 1)))  # [B * F, P, D]
        return tokens.reshape(b, f * tokens.shape[1], tokens.shape[2])  # [B, F * P, D]

    def forward(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor, mask_ar: torch.Tensor,
                mask_input: torch.Tensor | None = None, cache: PaliGemmaCache | None = None,
                mask_loss: torch.Tensor | None = None) -> torch.Tensor:
        """Text logits [B, T, V] for images and text ids [B, T] laid out as in the docstring above.

        mask_ar [B, T]: 0 = part of the bidirectional prefix block, 1 = a causal step.
        mask_input [B, T]: 1 = real token, 0 = padding (default: all real).
        With a PaliGemmaCache the tokens continue the sequence the cache already holds, and are
        stored in it: the first call (prefill) passes the images, later calls (extend) pass
        None and only the new text tokens.
        With mask_loss [B, T] (training), no logits [B, T, V]: the loss of each example [B],
        from logits at the supervised positions only (`supervised_loss`). Training calls the
        model so, that a wrapper around it (DDP, FSDP) sees the whole step in its forward.
        """
        states = self.text_states(pixel_values, input_ids, mask_ar, mask_input, cache)  # [B, T, D]
        if mask_loss is not None:
            return supervised_loss(self.llm, states, input_ids, mask_loss, reduction="none")  # [B]
        return self.llm.logits(states)  # [B, T, V]

    def text_states(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor, mask_ar: torch.Tensor,
                    mask_input: torch.Tensor | None = None, cache: PaliGemmaCache | None = None) -> torch.Tensor:
        """The decoder's final states [B, T, D] at the text tokens (arguments as in forward).

        forward() turns all of them into logits; a prefill needs the logits of one position per
        row only, and the output embedding ([D, V], V = 257k) is the biggest matmul there is.
        """
        if mask_input is None:
            mask_input = torch.ones_like(input_ids)
        x = self.llm.embed_tokens(input_ids)  # [B, T, D], times sqrt(D)
        # Padding never starts a step (a left pad with mask_ar 1 would cut the image off the prompt).
        mask_ar, valid = mask_ar.long() * mask_input.long(), mask_input.bool()
        num_image = 0
        if pixel_values is not None:
            image = self.embed_image(pixel_values)  # [B, F * P, D], unscaled
            num_image = image.shape[1]  # F * P
            x = torch.cat([image.to(x.dtype), x], dim=1)  # [B, F * P + T, D]
            mask_ar = torch.cat([mask_ar.new_zeros(x.shape[0], num_image), mask_ar], dim=1)  # [B, F * P + T]
            valid = torch.cat([valid.new_ones(x.shape[0], num_image), valid], dim=1)  # [B, F * P + T]

        # Block steps and 0-based positions (real tokens only), continuing the cached ones. The
        # decoder processes F * P + T tokens (F * P = num_image = 0 when no images are passed),
        # against S keys: the cached ones, then this call's.
        step0, pos0 = (0, 0) if cache is None else cache.mask.last_step_and_count()  # [B, 1] each
        steps = step0 + torch.cumsum(mask_ar, dim=1)  # [B, F * P + T]
        positions = (pos0 + torch.cumsum(valid.long(), dim=1) - 1).clamp(min=0)  # [B, F * P + T]
        keys = (steps, valid, positions) if cache is None else cache.mask.append(steps, valid, positions)
        k_steps, k_valid, k_positions = keys  # [B, S] each

        window = self.config.text.sliding_window
        if attention_implementation(self.config.text) == "flex":
            mask = flex_mask(steps, valid, positions, k_steps, k_valid, k_positions)
            local_mask = None if window is None else flex_mask(steps, valid, positions, k_steps, k_valid,
                                                               k_positions, window)
        else:
            mask = block_mask(steps, valid, k_steps, k_valid)  # [B, F * P + T, S]
            local_mask = None if window is None else sliding_window_mask(
                mask, positions, k_positions, steps, k_steps, window)
        hidden = self.llm(x, positions, mask, local_mask, None if cache is None else cache.kv)  # [B, F * P + T, D]
        return hidden[:, num_image:]  # [B, T, D]


def checkpoint_blocks(model: PaliGemma) -> PaliGemma:
    """Activation checkpointing: make every block of both towers keep only its input and
    recompute the rest in the backward pass (non-reentrant torch.utils.checkpoint, which also
    replays the random state, so dropout draws the same masks); return the model. Parameter
    names and results are unchanged; a training step costs about one more forward pass."""
    for block in [*model.vision.blocks, *model.llm.layers]:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
    return model


def set_attention(model: PaliGemma, implementation: str) -> PaliGemma:
    """Switch the decoder's attention to "eager", "sdpa" or "flex" (config.py,
    gemma.attention_implementation) in place, weights untouched; return the model. The choice
    lives in the config, which every attention layer reads, so each copy of it is replaced."""
    text = replace(model.config.text, attn_implementation=implementation)  # checks the name
    model.config = replace(model.config, text=text)
    model.llm.config = text
    for layer in model.llm.layers:
        layer.attn.cfg = text
    return model
