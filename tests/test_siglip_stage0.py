"""Stage 0's contrastive losses: SigLIP's sigmoid loss and CLIP's softmax loss."""

import math

import torch
import torch.nn.functional as F

from minipaligemma import get_config
from minipaligemma.pretrain import SigLIP, TextEncoder, sigmoid_loss, softmax_contrastive_loss
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
