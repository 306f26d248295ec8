"""Stage 0's contrastive losses (SigLIP's sigmoid loss, CLIP's softmax loss) and its pooling head."""

import math

import pytest
import torch
import torch.nn.functional as F

from minipaligemma import get_config
from minipaligemma.pretrain import MAPHead, SigLIP, TextEncoder, sigmoid_loss, softmax_contrastive_loss
from minipaligemma.siglip import SigLIPEncoder


def test_sigmoid_loss_equals_the_pairwise_definition():
    torch.manual_seed(0)
    zimg, ztxt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    t, b = 7.0, -3.0
    expected = 0.0
    for i in range(5):
        for j in range(5):
            label = 1.0 if i == j else -1.0
            expected += -math.log(1 / (1 + math.exp(-label * (t * float(zimg[i] @ ztxt[j]) + b))))
    assert abs(sigmoid_loss(zimg, ztxt, t, b).item() - expected / 5) < 1e-4


def test_matching_pairs_score_lower_than_shuffled_pairs():
    torch.manual_seed(1)
    z = F.normalize(torch.randn(6, 16), dim=-1)
    shuffled = z[torch.roll(torch.arange(6), 1)]
    for loss in (lambda a, b: sigmoid_loss(a, b, 10.0, -5.0), lambda a, b: softmax_contrastive_loss(a, b, 10.0)):
        assert loss(z, z) < loss(z, shuffled)


def test_two_towers_train_on_a_toy_batch():
    torch.manual_seed(2)
    cfg = get_config("tiny").vision
    model = SigLIP(SigLIPEncoder(cfg), TextEncoder(cfg, vocab_size=50, max_len=8, embed_dim=16), embed_dim=16)
    pixels, ids = torch.randn(8, 3, 32, 32), torch.randint(0, 50, (8, 8))
    lengths = torch.tensor([8, 5, 3, 8, 2, 7, 8, 4])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model(pixels, ids, lengths).item()
    for _ in range(30):
        opt.zero_grad()
        loss = model(pixels, ids, lengths)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_map_head_is_attention_pooling_with_a_residual_mlp():
    """Written out by hand: one probe query, softmax over the tokens, value average, out
    projection, then x + MLP(LayerNorm(x)). A token repeated P times pools to what one gives."""
    torch.manual_seed(3)
    cfg = get_config("tiny").vision
    head = MAPHead(cfg)
    tokens = torch.randn(2, 5, cfg.width)
    w_q, w_k, w_v = head.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = head.attn.in_proj_bias.chunk(3)
    heads, d = cfg.num_heads, cfg.width // cfg.num_heads
    q = (head.probe[0] @ w_q.T + b_q).view(1, heads, d)  # [1, N, H]
    k = (tokens @ w_k.T + b_k).view(2, 5, heads, d)  # [B, P, N, H]
    v = (tokens @ w_v.T + b_v).view(2, 5, heads, d)
    weights = torch.softmax(torch.einsum("qnh,bpnh->bnp", q, k) / math.sqrt(d), dim=-1)  # [B, N, P]
    pooled = head.attn.out_proj(torch.einsum("bnp,bpnh->bnh", weights, v).reshape(2, cfg.width))  # [B, D]
    expected = pooled + head.mlp(head.norm(pooled))
    assert torch.allclose(head(tokens), expected, atol=1e-5)
    one = tokens[:, :1]
    assert torch.allclose(head(one.expand(2, 5, cfg.width)), head(one), atol=1e-5)


def test_pooling_choices():
    cfg = get_config("tiny").vision
    towers = SigLIPEncoder(cfg), TextEncoder(cfg, vocab_size=50, max_len=8, embed_dim=16)
    assert isinstance(SigLIP(*towers, embed_dim=16).pool, MAPHead)
    assert SigLIP(*towers, embed_dim=16, pooling="mean").pool is None
    with pytest.raises(ValueError, match="pooling must be one of"):
        SigLIP(*towers, embed_dim=16, pooling="max")
