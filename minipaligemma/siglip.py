"""The SigLIP image encoder (a ViT), as PaliGemma uses it.

An image becomes a sequence of tokens in four steps (docs/architecture.md §2):

1. A 14x14 convolution with stride 14 cuts the image into patches and embeds each one
   (224 px -> a 16x16 grid -> 256 tokens, read row by row).
2. A learned position embedding is added to each token (no class token).
3. Transformer blocks, pre-LayerNorm: x += Attention(LN(x)); x += MLP(LN(x)), the MLP with the
   tanh approximation of GELU, the attention ordinary multi-head attention with biases.
4. A final LayerNorm over every token. PaliGemma uses no pooling head: all tokens go on to the
   language model.

Module names follow the roles in the paper and big_vision; layouts.py maps the official key
names onto them.
"""


import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import VisionConfig


class Attention(nn.Module):
    """Multi-head self-attention with biases; every token sees every token."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q_proj(x), "b p (n h) -> b n p h", n=self.num_heads)  # [B, N, P, H]
        k = rearrange(self.k_proj(x), "b p (n h) -> b n p h", n=self.num_heads)  # [B, N, P, H]
        v = rearrange(self.v_proj(x), "b p (n h) -> b n p h", n=self.num_heads)  # [B, N, P, H]
        # Softmax(q.k / sqrt(head_dim)) v; PyTorch's fused kernel computes exactly this.
        out = F.scaled_dot_product_attention(q, k, v)  # [B, N, P, H]
        return self.out_proj(rearrange(out, "b n p h -> b p (n h)"))  # [B, P, D]


class MLP(nn.Module):
    """Two dense layers with the tanh-approximated GELU between them."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    """One pre-LayerNorm transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def resample_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Resize learned position embeddings [P, D] (a square grid) to grid_size x grid_size.

    Used to run a checkpoint at another resolution (PaliGemma's stage 2 goes 224 -> 448 -> 896
    px). Bilinear with corners aligned, as big_vision's `scipy.ndimage.zoom(order=1)` does.
    """
    old = int(round(pos_embed.shape[0] ** 0.5))
    if old * old != pos_embed.shape[0]:
        raise ValueError(f"{pos_embed.shape[0]} position embeddings do not form a square grid")
    grid = rearrange(pos_embed.float(), "(gh gw) d -> 1 d gh gw", gh=old)  # [1, D, old, old]
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bilinear", align_corners=True)
    return rearrange(grid, "1 d gh gw -> (gh gw) d").to(pos_embed.dtype)  # [grid_size², D]


class SigLIPEncoder(nn.Module):
    """Images [B, 3, R, R] in [-1, 1] to tokens [B, P, D] (P = num_patches, D = width)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(cfg.num_patches, cfg.width) * cfg.width**-0.5)  # big_vision's init
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.shape[-3:] != (3, size, size):
            raise ValueError(f"expected images of shape [B, 3, {size}, {size}], got {list(pixel_values.shape)}")
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype))  # [B, D, grid, grid]
        x = rearrange(x, "b d gh gw -> b (gh gw) d")  # [B, P, D], row-major patches
        x = x + self.pos_embed  # [B, P, D]
        for block in self.blocks:
            x = block(x)  # [B, P, D]
        return self.norm(x)  # [B, P, D]
