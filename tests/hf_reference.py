"""Build transformers reference models that compute the same function as ours.

transformers is the independent oracle (reference-testing.md). Its traps, handled here:
- a `text_config` without `model_type: gemma2` silently becomes Gemma 1;
- Gemma 1 spells the activation `hidden_act`, Gemma 2 `hidden_activation`;
- eager attention, since SDPA cannot soft-cap;
- norms initialise to 0 and embedding row 0 to 0: every parameter is overwritten with random
  values, so a `w` versus `1 + w` mistake cannot hide;
- Gemma 2 layers alternate sliding and full attention; with our window off, every layer is
  made a full-attention layer.
"""

import math

import torch

transformers = __import__("pytest").importorskip("transformers")

from minipaligemma.config import PaliGemmaConfig, TextConfig, VisionConfig  # noqa: E402


def hf_vision_config(v: VisionConfig) -> dict:
    return dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                num_attention_heads=v.num_heads, patch_size=v.patch_size, image_size=v.image_size,
                layer_norm_eps=v.norm_eps, hidden_act="gelu_pytorch_tanh", vision_use_head=False)


def hf_text_config(t: TextConfig) -> dict:
    common = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                  num_hidden_layers=t.depth, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                  head_dim=t.head_dim, rms_norm_eps=t.norm_eps, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                  max_position_embeddings=8192)
    if t.version == 1:
        assert t.query_pre_attn_scalar == t.head_dim, "transformers' Gemma 1 scales queries by head_dim"
        return dict(common, model_type="gemma", hidden_act="gelu_pytorch_tanh")
    window = t.sliding_window
    layer_types = [("sliding_attention" if window and i % 2 == 0 else "full_attention") for i in range(t.depth)]
    return dict(common, model_type="gemma2", hidden_activation="gelu_pytorch_tanh",
                query_pre_attn_scalar=t.query_pre_attn_scalar, attn_logit_softcapping=t.attn_softcap,
                final_logit_softcapping=t.final_softcap, sliding_window=window or 8192, layer_types=layer_types)


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
    hf_cfg = transformers.PaliGemmaConfig(
        vision_config=hf_vision_config(cfg.vision), text_config=hf_text_config(cfg.text),
        projection_dim=cfg.text.width, image_token_index=cfg.text.vocab_size)
    model = transformers.PaliGemmaForConditionalGeneration(hf_cfg).eval()
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
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**hf_vision_config(v))).eval()
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
