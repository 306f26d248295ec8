"""Stage 0 at toy scale: the models and losses of unimodal pretraining.

PaliGemma starts from two unimodal models, an image encoder and a language model, each
pretrained alone (PaliGemma paper, arXiv 2407.07726, §3.2.1). At toy scale the trainer does both:

- The image encoder, SigLIP style (arXiv 2303.15343): images and their captions are embedded by
  two towers, and every (image, text) pair of a batch is classified independently as matching
  or not with a sigmoid, instead of a softmax over the batch (CLIP's loss, kept here for
  comparison). The text tower and the pooling head exist only for this stage; PaliGemma keeps
  the image encoder alone. The image side pools its tokens with SigLIP's attention-pooling
  ("MAP") head, a learned probe that attends to every token: with a plain mean instead, the
  encoder is free to make all of a frame's tokens alike (the mean is all the loss sees), and
  the decoder then gets tokens that say little about where things are.
- The decoder as a causal language model on the world's text (`CausalLM`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .paligemma import make_attn_mask, prefix_lm_loss
from .siglip import MLP, EncoderBlock, SigLIPEncoder


class TextEncoder(nn.Module):
    """A small transformer over token ids [B, T] -> one embedding per text [B, E], taken at
    the last real token (the EOS), like SigLIP's "last" pooling."""

    def __init__(self, cfg: VisionConfig, vocab_size: int, max_len: int, embed_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(max_len, cfg.width) * cfg.width**-0.5)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.width, embed_dim)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) + self.pos_embed[: input_ids.shape[1]]  # [B, T, D]
        for block in self.blocks:
            x = block(x)  # [B, T, D]
        last = self.norm(x)[torch.arange(x.shape[0]), lengths - 1]  # [B, D]
        return self.head(last)  # [B, E]


class MAPHead(nn.Module):
    """SigLIP's multihead attention pooling: a learned probe token attends to the image tokens
    [B, P, D], followed by a residual MLP; the probe's output is the image's vector [B, D]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, cfg.width) * cfg.width**-0.5)
        self.attn = nn.MultiheadAttention(cfg.width, cfg.num_heads, batch_first=True)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(tokens.shape[0], -1, -1)  # [B, 1, D]
        pooled = self.attn(probe, tokens, tokens, need_weights=False)[0]  # [B, 1, D]
        return (pooled + self.mlp(self.norm(pooled)))[:, 0]  # [B, D]


POOLINGS = ("map", "mean")


class SigLIP(nn.Module):
    """Two towers and the sigmoid loss's learned temperature and bias. `pooling` is how the
    image tokens become one vector: "map" (SigLIP's head, the default) or "mean" (to compare)."""

    def __init__(self, image: SigLIPEncoder, text: TextEncoder, embed_dim: int, pooling: str = "map"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.image = image
        self.pool = MAPHead(image.config) if pooling == "map" else None  # None: the mean of the tokens
        self.image_head = nn.Linear(image.config.width, embed_dim)
        self.text = text
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))  # SigLIP's initial t = 10
        self.bias = nn.Parameter(torch.tensor(-10.0))  # and b = -10: most pairs are negatives

    def forward(self, pixel_values, input_ids, lengths) -> torch.Tensor:
        """The sigmoid loss of a batch of matching (image, text) pairs."""
        tokens = self.image(pixel_values)  # [B, P, D]
        pooled = tokens.mean(dim=1) if self.pool is None else self.pool(tokens)  # [B, D]
        zimg = F.normalize(self.image_head(pooled), dim=-1)  # [B, E]
        ztxt = F.normalize(self.text(input_ids, lengths), dim=-1)  # [B, E]
        return sigmoid_loss(zimg, ztxt, self.log_temperature.exp(), self.bias)


def sigmoid_loss(zimg: torch.Tensor, ztxt: torch.Tensor, temperature, bias) -> torch.Tensor:
    """SigLIP's loss: every pair (i, j) is a binary problem, positive iff i == j.

    logits = t * zimg @ ztxt^T + b; loss = -mean over images of sum over texts of
    log sigmoid(label * logit), label +1 on the diagonal and -1 elsewhere.
    """
    logits = temperature * zimg @ ztxt.T + bias  # [B, B]
    labels = 2 * torch.eye(len(logits), device=logits.device) - 1  # [B, B], +1 / -1
    return -F.logsigmoid(labels * logits).sum() / len(logits)


def softmax_contrastive_loss(zimg: torch.Tensor, ztxt: torch.Tensor, temperature) -> torch.Tensor:
    """CLIP's loss, for comparison: cross-entropy over the batch, image->text and text->image."""
    logits = temperature * zimg @ ztxt.T  # [B, B]
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class CausalLM(nn.Module):
    """Stage 0's language-model pretraining of the decoder: every real token predicts the next."""

    def __init__(self, llm: nn.Module):
        super().__init__()
        self.llm = llm

    def forward(self, input_ids: torch.Tensor, mask_input: torch.Tensor) -> torch.Tensor:
        mask = make_attn_mask(torch.ones_like(input_ids), mask_input)  # causal, padding hidden
        positions = (torch.cumsum(mask_input, dim=1) - 1).clamp(min=0)  # [B, T]
        hidden = self.llm(self.llm.embed_tokens(input_ids), positions, mask)  # [B, T, D]
        return prefix_lm_loss(self.llm.logits(hidden), input_ids, mask_input)
