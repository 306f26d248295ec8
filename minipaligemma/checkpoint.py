"""Checkpoint key maps and strict loading.

Our modules are named after the paper and big_vision (`vision.blocks.3.attn.q_proj`,
`llm.layers.5.pre_ffw_norm`). A checkpoint in transformers' layout names the same tensors
differently, and three spellings of that layout are in circulation (reference-testing.md):

    in memory (v5)      model.vision_tower.*     model.language_model.*   lm_head.weight
    save_pretrained     vision_tower.*           language_model.model.*   (no lm_head)
    hub files (4.x)     vision_tower.vision_model.*  language_model.model.*  language_model.lm_head.weight

`hf_key_map` lists, for a model of ours, the transformers name of every parameter (one
canonical spelling); `canonical_hf_key` rewrites any of the three spellings to it. Loading is
then a renaming plus checks: every tensor must be present, expected and of the right shape,
or the error names the key and both shapes. The output embedding is tied to the input
embedding, so a stored `lm_head` must equal it and is then dropped.
"""

import re

import torch
from torch import nn

from .gemma import Gemma
from .paligemma import PaliGemma
from .siglip import SigLIPEncoder


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: names the keys and shapes involved."""


def _siglip_hf_names(cfg) -> dict[str, str]:
    """Our SigLIP parameter names -> transformers' SiglipVisionTransformer names."""
    names = {
        "patch_embed.weight": "embeddings.patch_embedding.weight",
        "patch_embed.bias": "embeddings.patch_embedding.bias",
        "pos_embed": "embeddings.position_embedding.weight",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    per_block = {"norm1": "layer_norm1", "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
                 **{f"attn.{p}": f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}}
    for i in range(cfg.depth):
        for ours, theirs in per_block.items():
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{kind}"] = f"encoder.layers.{i}.{theirs}.{kind}"
    return names


def _gemma_hf_names(cfg) -> dict[str, str]:
    """Our Gemma parameter names -> transformers' GemmaModel / Gemma2Model names.

    Careful with one name: in transformers' Gemma 1, `post_attention_layernorm` is the norm
    *before* the MLP (our pre_ffw_norm); in Gemma 2 it is the post-attention norm.
    """
    names = {"embed.weight": "embed_tokens.weight", "final_norm.weight": "norm.weight"}
    per_layer = {f"attn.{p}": f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    per_layer |= {f"mlp.{p}": f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    per_layer["pre_attention_norm"] = "input_layernorm"
    if cfg.version == 1:
        per_layer["pre_ffw_norm"] = "post_attention_layernorm"
    else:
        per_layer |= {"post_attention_norm": "post_attention_layernorm",
                      "pre_ffw_norm": "pre_feedforward_layernorm",
                      "post_ffw_norm": "post_feedforward_layernorm"}
    for i in range(cfg.depth):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}.weight"] = f"layers.{i}.{theirs}.weight"
    return names


def hf_key_map(model: nn.Module) -> dict[str, str]:
    """Every parameter name of `model` -> its canonical transformers name.

    Works for a whole PaliGemma and for each tower alone (SigLIPEncoder, Gemma).
    """
    if isinstance(model, SigLIPEncoder):
        return _siglip_hf_names(model.config)
    if isinstance(model, Gemma):
        return _gemma_hf_names(model.config)
    if isinstance(model, PaliGemma):
        return {
            **{f"vision.{k}": f"vision_tower.{v}" for k, v in _siglip_hf_names(model.config.vision).items()},
            "projector.weight": "multi_modal_projector.linear.weight",
            "projector.bias": "multi_modal_projector.linear.bias",
            **{f"llm.{k}": f"language_model.{v}" for k, v in _gemma_hf_names(model.config.text).items()},
        }
    raise TypeError(f"no transformers key map for {type(model).__name__}")


# Each spelling's prefix, rewritten to the canonical one. The first matching rule applies.
_HF_SPELLINGS = [
    (r"^(model\.)?vision_tower\.(vision_model\.)?", "vision_tower."),  # PaliGemma, all three
    (r"^(model\.)?multi_modal_projector\.", "multi_modal_projector."),
    (r"^(model\.language_model\.|language_model\.model\.)", "language_model."),
    (r"^(language_model\.)?lm_head\.", "lm_head."),
    (r"^vision_model\.", ""),  # SiglipVisionModel alone
    (r"^model\.", ""),  # GemmaForCausalLM / Gemma2ForCausalLM alone
]


def canonical_hf_key(key: str) -> str:
    """Rewrite any of the transformers spellings of a key to the one `hf_key_map` uses."""
    for pattern, replacement in _HF_SPELLINGS:
        new_key, found = re.subn(pattern, replacement, key)
        if found:
            return new_key
    return key


def _embedding_key(model: nn.Module) -> str | None:
    """The canonical name of the tied embedding, if the model has one."""
    return {Gemma: "embed_tokens.weight", PaliGemma: "language_model.embed_tokens.weight"}.get(type(model))


def load_hf_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy a transformers-layout state dict into `model`, strictly.

    Any spelling of the keys is accepted. Raises CheckpointError naming `source`, the key and
    both shapes if a tensor is missing, unexpected or mis-shaped, or if a stored lm_head is not
    a copy of the (tied) embedding.
    """
    tensors = {canonical_hf_key(k): v for k, v in state_dict.items()}
    lm_head = tensors.pop("lm_head.weight", None)
    if lm_head is None:
        lm_head = tensors.pop("language_model.lm_head.weight", None)
    embedding_key = _embedding_key(model)
    if lm_head is not None:
        embedding = tensors.get(embedding_key) if embedding_key else None
        if embedding is None or embedding.shape != lm_head.shape or not torch.equal(embedding, lm_head):
            raise CheckpointError(f"{source}: lm_head.weight is not a copy of the input embedding; "
                                  "PaliGemma ties them and this model has no separate output layer")

    key_map = hf_key_map(model)
    ours = {k: v for k, v in model.state_dict().items() if k in key_map}
    expected = {key_map[k]: k for k in ours}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                              f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for theirs, our_key in expected.items():
        want, got = tuple(ours[our_key].shape), tuple(tensors[theirs].shape)
        if want != got:
            raise CheckpointError(f"{source}: {theirs} has shape {list(got)}, the model's {our_key} "
                                  f"expects {list(want)}")
    with torch.no_grad():
        for theirs, our_key in expected.items():
            ours[our_key].copy_(tensors[theirs])
