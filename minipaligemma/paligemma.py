"""PaliGemma: SigLIP image tokens in front of Gemma text tokens, one prefix-LM.

The sequence the decoder reads is (paligemma-spec.md §3.1)

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
- Positions are 0-based over the whole sequence, real tokens only: cumsum(mask_input) - 1.
- Logits are returned for the text positions only, as big_vision does.
- The loss is next-token cross-entropy on the suffix only (`mask_loss`), averaged per example
  and then over the batch, as big_vision does; transformers instead averages over all
  supervised tokens of the batch (`reduction="token"` computes that).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import PaliGemmaConfig
from .gemma import Gemma
from .siglip import SigLIPEncoder


def make_attn_mask(mask_ar: torch.Tensor, mask_input: torch.Tensor) -> torch.Tensor:
    """The prefix-LM mask [B, S, S] (True = query may attend key) from mask_ar, mask_input [B, S].

    big_vision's rule: with c = cumsum(mask_ar), query i sees key j iff c[j] <= c[i] and both
    are real tokens (mask_input = 1).
    """
    steps = torch.cumsum(mask_ar.long(), dim=1)  # [B, S]
    causal_blocks = steps[:, None, :] <= steps[:, :, None]  # [B, S(query), S(key)]
    valid = mask_input.bool()
    return causal_blocks & valid[:, None, :] & valid[:, :, None]  # [B, S, S]


def sliding_window_mask(mask: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
    """Restrict a square prefix-LM mask [B, S, S] to keys fewer than `window` positions back.

    transformers' Gemma 2 does this in its local layers; big_vision does not (see config.py).
    As in transformers, the bidirectional block is exempt: two tokens that see each other both
    ways (mask and its transpose) keep seeing each other at any distance.
    """
    distance = positions[:, :, None] - positions[:, None, :]  # [B, S, S], query minus key
    mutual = mask & mask.transpose(1, 2)  # [B, S, S], same bidirectional block
    return mask & ((distance < window) | mutual)


def prefix_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask_loss: torch.Tensor,
                   reduction: str = "example", label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy on the supervised tokens (the suffix).

    logits [B, T, V] at position t predict input_ids[:, t + 1], counted where mask_loss[:, t + 1]
    is 1 (so the "\\n" separator's logit predicts the first suffix token).
    reduction "example" (big_vision): mean over each example's supervised tokens, then mean
    over the batch, so a short answer weighs as much as a long one. "token" (transformers):
    mean over every supervised token of the batch.
    """
    targets = input_ids[:, 1:]  # [B, T-1]
    weights = mask_loss[:, 1:].float()  # [B, T-1]
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets,
                                 reduction="none", label_smoothing=label_smoothing)  # [B, T-1]
    if reduction == "example":
        per_example = (token_loss * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B]
        return per_example.mean()
    if reduction == "token":
        return (token_loss * weights).sum() / weights.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'example' or 'token', got {reduction!r}")


class PaliGemma(nn.Module):
    """Image encoder + linear projector + Gemma decoder."""

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision = SigLIPEncoder(config.vision)
        self.projector = nn.Linear(config.vision.width, config.text.width)
        self.llm = Gemma(config.text)

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W], or frames [B, N, 3, H, W], to image tokens [B, N * P, D].

        Frames are encoded independently and their tokens concatenated, no separator.
        """
        frames = pixel_values if pixel_values.dim() == 5 else pixel_values[:, None]  # [B, N, 3, H, W]
        b, n = frames.shape[:2]
        tokens = self.projector(self.vision(frames.flatten(0, 1)))  # [B * N, P, D]
        return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])  # [B, N * P, D]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, mask_ar: torch.Tensor,
                mask_input: torch.Tensor | None = None) -> torch.Tensor:
        """Text logits [B, T, V] for images and text ids [B, T] laid out as in the docstring above.

        mask_ar [B, T]: 0 = part of the bidirectional prefix block, 1 = a causal step.
        mask_input [B, T]: 1 = real token, 0 = padding (default: all real).
        """
        if mask_input is None:
            mask_input = torch.ones_like(input_ids)
        image = self.embed_image(pixel_values)  # [B, P, D], unscaled
        text = self.llm.embed_tokens(input_ids)  # [B, T, D], times sqrt(D)
        x = torch.cat([image.to(text.dtype), text], dim=1)  # [B, P + T, D]

        num_image = image.shape[1]
        image_flags = torch.ones(input_ids.shape[0], num_image, dtype=torch.long, device=input_ids.device)
        full_ar = torch.cat([0 * image_flags, mask_ar.long()], dim=1)  # [B, P + T]
        full_input = torch.cat([image_flags, mask_input.long()], dim=1)  # [B, P + T]
        mask = make_attn_mask(full_ar, full_input)  # [B, P + T, P + T]
        positions = (torch.cumsum(full_input, dim=1) - 1).clamp(min=0)  # [B, P + T], 0-based

        window = self.config.text.sliding_window
        local_mask = None if window is None else sliding_window_mask(mask, positions, window)
        hidden = self.llm(x, positions, mask, local_mask)  # [B, P + T, D]
        return self.llm.logits(hidden[:, num_image:])  # [B, T, V]
