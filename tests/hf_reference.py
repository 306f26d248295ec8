"""Build transformers reference models that compute the same function as ours.

transformers is the independent oracle (docs/differences.md §14). Its traps, handled here:
- a `text_config` without `model_type: gemma2` silently becomes Gemma 1;
- Gemma 1 spells the activation `hidden_act`, Gemma 2 `hidden_activation`;
- eager attention, since SDPA cannot soft-cap;
- norms initialise to 0 and embedding row 0 to 0: every parameter is overwritten with random
  values, so a `w` versus `1 + w` mistake cannot hide;
- Gemma 2 layers alternate sliding and full attention; with our window off, every layer is
  made a full-attention layer.
The configs come from minipaligemma.checkpoint_config.hf_config_dict (the one convert() writes): a
mistake there would make transformers compute another function, which the tests would catch.
"""

import math

import torch

transformers = __import__("pytest").importorskip("transformers")

from minipaligemma import PaliGemma  # noqa: E402
from minipaligemma.checkpoint_config import hf_config_dict, hf_text_config, hf_vision_config  # noqa: E402
from minipaligemma.config import PaliGemmaConfig, TextConfig, VisionConfig  # noqa: E402
from minipaligemma.layouts import load_hf_state_dict  # noqa: E402


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter: matrices ~ N(0, 1/fan_in), vectors (norms, biases) ~ N(0, 0.5²)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            std = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def hf_paligemma(cfg: PaliGemmaConfig, seed: int = 0):
    """A random transformers PaliGemmaForConditionalGeneration with our config's shapes.

    The image token id is the first id past our vocabulary, so both models share one vocabulary.
    """
    model = transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig(**hf_config_dict(cfg))).eval()
    model.set_attn_implementation("eager")
    randomize_(model, seed)
    return model


def hf_gemma(t: TextConfig, seed: int = 0):
    """A random transformers GemmaForCausalLM or Gemma2ForCausalLM."""
    d = hf_text_config(t)
    cls, cfg_cls = ((transformers.GemmaForCausalLM, transformers.GemmaConfig) if t.version == 1
                    else (transformers.Gemma2ForCausalLM, transformers.Gemma2Config))
    d.pop("model_type")
    model = cls(cfg_cls(**d)).eval()
    model.set_attn_implementation("eager")
    randomize_(model, seed)
    return model


def hf_siglip(v: VisionConfig, seed: int = 0):
    """A random transformers SiglipVisionModel."""
    fields = {k: val for k, val in hf_vision_config(v).items() if k != "model_type"}
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**fields)).eval()
    model.set_attn_implementation("eager")
    randomize_(model, seed)
    return model


def hf_inputs(cfg: PaliGemmaConfig, input_ids, mask_ar, mask_input, num_frames: int = 1):
    """Our (input_ids, mask_ar, mask_input) [B, T] as transformers' PaliGemma inputs.

    Image placeholders go in front; token_type_ids are 0 on the prefix block (image tokens and
    mask_ar = 0 text), 1 on the suffix, as the PaliGemma processor makes them.
    """
    b = input_ids.shape[0]
    p = cfg.num_image_tokens * num_frames
    image = torch.full((b, p), cfg.text.vocab_size, dtype=torch.long)
    ones = torch.ones(b, p, dtype=torch.long)
    return dict(input_ids=torch.cat([image, input_ids], 1),
                attention_mask=torch.cat([ones, mask_input.long()], 1),
                token_type_ids=torch.cat([0 * ones, mask_ar.long()], 1))


def ours_from_hf(cfg, hf_model, cls=PaliGemma, dtype=torch.float32):
    """Our model holding transformers' weights. Built on the meta device (no wasted random
    init), then every tensor is filled by the strict loader."""
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device="cpu").eval()
    load_hf_state_dict(model, hf_model.state_dict(), source="transformers model")
    return model.to(dtype)
