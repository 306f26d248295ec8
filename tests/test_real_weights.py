"""Our model against transformers on real official weights, when a user has put them under
weights/ (see weights/README.md). Skipped when there are none: they cannot be downloaded here.

Both models run in bfloat16 on the same weights and the same input; the checks are the design
contract's: relative error <= 2e-2 and top-1 agreement >= 99 % on every text position.
"""

from pathlib import Path

import pytest
import torch

from minipaligemma import convert, load
from minipaligemma.tokenizer import encode_example

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
CHECKPOINTS = sorted([p for p in WEIGHTS.iterdir() if (p / "config.json").exists() or p.suffix == ".npz"]
                     if WEIGHTS.exists() else [])


@pytest.mark.skipif(not CHECKPOINTS, reason="no official weights under weights/ (see weights/README.md)")
@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.name)
def test_real_weights_match_transformers(path, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = load(path, dtype=torch.bfloat16)
    hf_folder = path if path.is_dir() else tmp_path / "hf"
    if not path.is_dir():
        convert(path, hf_folder)
    hf_config = transformers.AutoConfig.from_pretrained(hf_folder)
    if ours.config.text.version == 2:  # big_vision has no sliding window; make transformers agree
        hf_config.text_config.layer_types = ["full_attention"] * ours.config.text.depth
    hf = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        hf_folder, config=hf_config, dtype=torch.bfloat16, attn_implementation="eager").eval()

    cfg = ours.config
    size = cfg.vision.image_size
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if ours.tokenizer is not None:
        example = encode_example(ours.tokenizer, "caption en", "a cat sitting on a table")
        ids, mask_ar = torch.tensor([example["input_ids"]]), torch.tensor([example["mask_ar"]])
    else:
        ids = torch.randint(3, min(256000, cfg.text.vocab_size), (1, 12), generator=torch.Generator().manual_seed(1))
        mask_ar = torch.tensor([[0] * 5 + [1] * 7])
    p = cfg.num_image_tokens
    with torch.no_grad():
        ours_logits = ours(pixels.bfloat16(), ids, mask_ar).float()
        hf_ids = torch.cat([torch.full((1, p), hf.config.image_token_index), ids], 1)
        hf_logits = hf(pixel_values=pixels.bfloat16(), input_ids=hf_ids,
                       token_type_ids=torch.cat([torch.zeros(1, p, dtype=torch.long), mask_ar], 1)).logits[:, p:].float()
    vocab = min(ours_logits.shape[-1], 257152)  # compare the ids a tokenizer can emit
    a, b = ours_logits[..., :vocab], hf_logits[..., :vocab]
    rel = ((a - b).norm() / b.norm()).item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"{path.name}: bf16 relative error {rel:.2e}, top-1 agreement {top1:.1%}")
    assert rel <= 2e-2 and top1 >= 0.99
