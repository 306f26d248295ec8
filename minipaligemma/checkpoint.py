"""Checkpoint key maps and strict loading.

Our modules are named after the paper and big_vision (`vision.blocks.3.attn.q_proj`,
`llm.layers.5.pre_ffw_norm`). A checkpoint in transformers' layout names the same tensors
differently, and three spellings of that layout are in circulation:

    in memory (v5)      model.vision_tower.*     model.language_model.*   lm_head.weight
    save_pretrained     vision_tower.*           language_model.model.*   (no lm_head)
    hub files (4.x)     vision_tower.vision_model.*  language_model.model.*  language_model.lm_head.weight

`hf_key_map` lists, for a model of ours, the transformers name of every parameter (one
canonical spelling); `canonical_hf_key` rewrites any of the three spellings to it. Loading is
then a renaming plus checks: every tensor must be present, expected, of the right shape and
floating point. All that is wrong is reported at once, in one CheckpointError (a BadInput)
that names the file, each key and both shapes, a bounded number of keys per kind of
problem. The output embedding is tied to the input embedding, so a stored `lm_head` must
equal it and is then dropped. `check_checkpoint` makes every check of `load` without
allocating a model, which is what `python -m minipaligemma inspect` runs.
"""

import json
import math
import re
import shutil
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .config import PRESETS, PaliGemmaConfig, TextConfig, VisionConfig
from .files import BadInput, atomic_write, read_json
from .gemma import Gemma
from .paligemma import PaliGemma
from .siglip import SigLIPEncoder, resample_pos_embed
from .tokenizer import find_tokenizer


class CheckpointError(BadInput):
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


def _listing(keys: list[str], bound: int = 10) -> str:
    """The first `bound` keys as a list, and how many more there are."""
    return f"{keys[:bound]}{f' and {len(keys) - bound} more' if len(keys) > bound else ''}"


def bounded(items: list[str], bound: int = 10) -> str:
    """The first `bound` items joined by "; ", and how many more there are: error messages
    list every problem of a kind up to a bound, so that they stay short."""
    return "; ".join(items[:bound]) + (f"; and {len(items) - bound} more" if len(items) > bound else "")


def tensor_problems(expected: dict[str, tuple], found: dict[str, torch.Tensor]) -> list[str]:
    """What is wrong with `found` against the `expected` shapes, one entry per kind of problem:
    missing keys, unexpected keys, mis-shaped tensors, tensors that are not floating point
    (integer or boolean weights are a broken file, never cast). Each lists every key it
    concerns, up to a bound. Empty when all is well."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    present = [key for key in expected if key in found]
    misshaped = [f"{key} has shape {list(found[key].shape)}, the model expects {list(expected[key])}"
                 for key in present if tuple(found[key].shape) != tuple(expected[key])]
    untyped = [f"{key} is {str(found[key].dtype).removeprefix('torch.')}"
               for key in present if not found[key].is_floating_point()]
    problems = [f"missing keys {_listing(missing)}"] if missing else []
    problems += [f"unexpected keys {_listing(unexpected)}"] if unexpected else []
    problems += [bounded(misshaped)] if misshaped else []
    problems += [f"not floating point: {bounded(untyped)}"] if untyped else []
    return problems


def raise_problems(problems: list[str], source: str) -> None:
    """One CheckpointError naming `source` and every problem (tensor_problems' list), if any."""
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def _renamed(tensors: dict[str, torch.Tensor], rename: Callable[[str], str], source: str) -> dict[str, torch.Tensor]:
    """The tensors under new names; two keys that become one name are an error."""
    out, origin = {}, {}
    for key, value in tensors.items():
        name = rename(key)
        if name in out:
            raise CheckpointError(f"{source}: {origin[name]!r} and {key!r} are two copies of the tensor {name!r}")
        out[name], origin[name] = value, key
    return out


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors named as our parameters into the model (shapes already checked)."""
    params = model.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)


def check_hf_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor],
                        source: str = "state dict") -> dict[str, torch.Tensor]:
    """Check a transformers-layout state dict against `model` (which may live on the meta
    device) and return its tensors under our parameter names.

    Any spelling of the keys is accepted. Raises CheckpointError naming `source` and every
    missing, unexpected, mis-shaped or non-float tensor (with both shapes), and a stored
    lm_head that is not a copy of the (tied) embedding.
    """
    tensors = _renamed(state_dict, canonical_hf_key, source)
    lm_head = tensors.pop("lm_head.weight", None)
    embedding_key = _embedding_key(model)
    if lm_head is not None and embedding_key is None:
        tensors["lm_head.weight"] = lm_head  # a tower alone has no embedding: lm_head is unexpected
    key_map = hf_key_map(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = tensor_problems({theirs: shapes[ours] for ours, theirs in key_map.items()}, tensors)
    embedding = tensors.get(embedding_key)
    if lm_head is not None and embedding is not None and not (
            embedding.shape == lm_head.shape and embedding.dtype == lm_head.dtype and torch.equal(embedding, lm_head)):
        problems.append("lm_head.weight is not a copy of the input embedding; PaliGemma ties them and this "
                        "model has no separate output layer")
    raise_problems(problems, source)
    return {ours: tensors[theirs] for ours, theirs in key_map.items()}


def load_hf_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy a transformers-layout state dict into `model`, strictly (see `check_hf_state_dict`)."""
    _copy_into(model, check_hf_state_dict(model, state_dict, source))


# ---------------------------------------------------------------------------------------------
# big_vision's .npz layout: "/"-joined flax paths, the layers of each tower
# stacked on a leading axis, einsum-shaped attention kernels. Each rule names one big_vision
# array, the parameter(s) of ours it holds, and the two transforms between them. The transforms
# are inverses of each other; a round trip through both is bit-exact.

class Rule(NamedTuple):
    bv_key: str
    ours: tuple[str, ...]  # our parameter names; "{i}" stands for the layer in per-layer rules
    to_ours: Callable  # big_vision array (one layer's slice) -> tuple of our tensors
    to_bv: Callable  # our tensors -> big_vision array (one layer's slice)


def _same(name: str, bv_key: str) -> Rule:
    return Rule(bv_key, (name,), lambda a: (a,), lambda t: t)


def _dense(name: str, bv_key: str) -> Rule:
    """A flax Dense kernel is [in, out]; a torch Linear weight is [out, in]."""
    return Rule(bv_key, (name,), lambda a: (a.T,), lambda t: t.T)


def _vision_rules(cfg) -> tuple[list[Rule], list[Rule]]:
    """(global rules, per-layer rules) of the SigLIP tower and the projector."""
    w, heads, hd = cfg.width, cfg.num_heads, cfg.head_dim
    glob = [
        Rule("img/embedding/kernel", ("vision.patch_embed.weight",),  # HWIO <-> OIHW
             lambda a: (a.permute(3, 2, 0, 1),), lambda t: t.permute(2, 3, 1, 0)),
        _same("vision.patch_embed.bias", "img/embedding/bias"),
        Rule("img/pos_embedding", ("vision.pos_embed",), lambda a: (a[0],), lambda t: t[None]),
        _same("vision.norm.weight", "img/Transformer/encoder_norm/scale"),
        _same("vision.norm.bias", "img/Transformer/encoder_norm/bias"),
        _dense("projector.weight", "img/head/kernel"),
        _same("projector.bias", "img/head/bias"),
    ]
    block, attn = "img/Transformer/encoderblock/", "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
    ours = "vision.blocks.{i}."
    layer = [
        _same(ours + "norm1.weight", block + "LayerNorm_0/scale"), _same(ours + "norm1.bias", block + "LayerNorm_0/bias"),
        _same(ours + "norm2.weight", block + "LayerNorm_1/scale"), _same(ours + "norm2.bias", block + "LayerNorm_1/bias"),
        _dense(ours + "mlp.fc1.weight", block + "MlpBlock_0/Dense_0/kernel"),
        _same(ours + "mlp.fc1.bias", block + "MlpBlock_0/Dense_0/bias"),
        _dense(ours + "mlp.fc2.weight", block + "MlpBlock_0/Dense_1/kernel"),
        _same(ours + "mlp.fc2.bias", block + "MlpBlock_0/Dense_1/bias"),
        Rule(attn + "out/kernel", (ours + "attn.out_proj.weight",),  # [N, H, D] <-> [D, N*H]
             lambda a: (a.reshape(w, w).T,), lambda t: t.T.reshape(heads, hd, w)),
        _same(ours + "attn.out_proj.bias", attn + "out/bias"),
    ]
    for bv_name, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        layer += [
            Rule(attn + f"{bv_name}/kernel", (ours + f"attn.{name}.weight",),  # [D, N, H] <-> [N*H, D]
                 lambda a: (a.reshape(w, w).T,), lambda t: t.T.reshape(w, heads, hd)),
            Rule(attn + f"{bv_name}/bias", (ours + f"attn.{name}.bias",),
                 lambda a: (a.reshape(w),), lambda t: t.reshape(heads, hd)),
        ]
    return glob, layer


def _llm_rules(cfg) -> tuple[list[Rule], list[Rule]]:
    """(global rules, per-layer rules) of the Gemma decoder."""
    d, n, k, h = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    glob = [_same("llm.embed.weight", "llm/embedder/input_embedding"),
            _same("llm.final_norm.weight", "llm/final_norm/scale")]
    ours = "llm.layers.{i}."
    layer = [
        Rule("llm/layers/attn/q_einsum/w", (ours + "attn.q_proj.weight",),  # [N, D, H] <-> [N*H, D]
             lambda a: (a.permute(0, 2, 1).reshape(n * h, d),), lambda t: t.reshape(n, h, d).permute(0, 2, 1)),
        Rule("llm/layers/attn/kv_einsum/w", (ours + "attn.k_proj.weight", ours + "attn.v_proj.weight"),
             lambda a: tuple(a[j].permute(0, 2, 1).reshape(k * h, d) for j in (0, 1)),  # [2, K, D, H]
             lambda tk, tv: torch.stack([t.reshape(k, h, d).permute(0, 2, 1) for t in (tk, tv)])),
        Rule("llm/layers/attn/attn_vec_einsum/w", (ours + "attn.o_proj.weight",),  # [N, H, D] <-> [D, N*H]
             lambda a: (a.permute(2, 0, 1).reshape(d, n * h),), lambda t: t.reshape(d, n, h).permute(1, 2, 0)),
        Rule("llm/layers/mlp/gating_einsum", (ours + "mlp.gate_proj.weight", ours + "mlp.up_proj.weight"),
             lambda a: (a[0].T, a[1].T), lambda tg, tu: torch.stack([tg.T, tu.T])),  # [2, D, M]
        _dense(ours + "mlp.down_proj.weight", "llm/layers/mlp/linear"),
        _same(ours + "pre_attention_norm.weight", "llm/layers/pre_attention_norm/scale"),
        _same(ours + "pre_ffw_norm.weight", "llm/layers/pre_ffw_norm/scale"),
    ]
    if cfg.post_norms:
        layer += [_same(ours + "post_attention_norm.weight", "llm/layers/post_attention_norm/scale"),
                  _same(ours + "post_ffw_norm.weight", "llm/layers/post_ffw_norm/scale")]
    return glob, layer


def _bigvision_rules(cfg: PaliGemmaConfig):
    """Yield (rule, depth) pairs: depth None for global rules, the layer count for stacked ones."""
    for (glob, layer), depth in ((_vision_rules(cfg.vision), cfg.vision.depth), (_llm_rules(cfg.text), cfg.text.depth)):
        yield from ((rule, None) for rule in glob)
        yield from ((rule, depth) for rule in layer)


def to_bigvision(model: PaliGemma) -> dict[str, torch.Tensor]:
    """Our parameters as big_vision arrays (flat "/" keys, layers stacked). Works on meta tensors."""
    params = model.state_dict()
    out = {}
    for rule, depth in _bigvision_rules(model.config):
        if depth is None:
            out[rule.bv_key] = rule.to_bv(*(params[name] for name in rule.ours))
        else:
            out[rule.bv_key] = torch.stack([rule.to_bv(*(params[name.format(i=i)] for name in rule.ours))
                                            for i in range(depth)])
    return out


def check_bigvision_params(model: PaliGemma, params: dict[str, torch.Tensor],
                           source: str = "npz") -> dict[str, torch.Tensor]:
    """Check big_vision arrays (keys with or without the "params/" prefix) against `model`
    (which may live on the meta device) and return them as our parameters. Raises
    CheckpointError naming every missing, unexpected, mis-shaped or non-float array."""
    params = _renamed(params, lambda key: key.removeprefix("params/"), source)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in to_bigvision(PaliGemma(model.config)).items()}
    raise_problems(tensor_problems(expected, params), source)
    ours = {}
    for rule, depth in _bigvision_rules(model.config):
        slices = [params[rule.bv_key]] if depth is None else list(params[rule.bv_key])
        for i, array in enumerate(slices):
            ours.update({name.format(i=i): t for name, t in zip(rule.ours, rule.to_ours(array))})
    return ours


def load_bigvision_params(model: PaliGemma, params: dict[str, torch.Tensor], source: str = "npz") -> None:
    """Copy big_vision arrays into `model`, strictly (see `check_bigvision_params`)."""
    _copy_into(model, check_bigvision_params(model, params, source))


# ---------------------------------------------------------------------------------------------
# Configs: transformers' config.json <-> ours, and inference from shapes when there is none.

def hf_vision_config(v: VisionConfig) -> dict:
    """Our image encoder as transformers' SiglipVisionConfig fields (no pooling head)."""
    return dict(model_type="siglip_vision_model", hidden_size=v.width, intermediate_size=v.mlp_dim,
                num_hidden_layers=v.depth, num_attention_heads=v.num_heads, patch_size=v.patch_size,
                image_size=v.image_size, layer_norm_eps=v.norm_eps, hidden_act="gelu_pytorch_tanh",
                vision_use_head=False)


def hf_text_config(t: TextConfig) -> dict:
    """Our decoder as transformers' GemmaConfig or Gemma2Config fields.

    Every Gemma 2 layer is written as a full-attention layer unless our config sets a window,
    so that transformers computes big_vision's function.
    """
    text = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim, num_hidden_layers=t.depth,
                num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
                rms_norm_eps=t.norm_eps, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                max_position_embeddings=t.max_positions,
                rope_parameters={"rope_type": "default", "rope_theta": t.rope_base})
    if t.version == 1:
        if t.query_pre_attn_scalar != t.head_dim:
            raise ValueError("transformers' Gemma 1 scales queries by head_dim; this config does not")
        return dict(text, model_type="gemma", hidden_act="gelu_pytorch_tanh")
    window = t.sliding_window
    return dict(text, model_type="gemma2", hidden_activation="gelu_pytorch_tanh",
                query_pre_attn_scalar=t.query_pre_attn_scalar, attn_logit_softcapping=t.attn_softcap,
                final_logit_softcapping=t.final_softcap, sliding_window=window or 8192,
                layer_types=[("sliding_attention" if window and i % 2 == 0 else "full_attention")
                             for i in range(t.depth)])


def hf_config_dict(cfg: PaliGemmaConfig) -> dict:
    """Our config as transformers' PaliGemmaConfig fields (what config.json holds). The
    `<image>` placeholder id is 257152 for the official 257216-row embedding, else the first id
    past the vocabulary."""
    t = cfg.text
    image_token = OFFICIAL_BV_VOCAB if t.vocab_size == OFFICIAL_HF_VOCAB else t.vocab_size
    return dict(model_type="paligemma", architectures=["PaliGemmaForConditionalGeneration"],
                vision_config=hf_vision_config(cfg.vision), text_config=hf_text_config(t), projection_dim=t.width,
                hidden_size=t.width, image_token_index=image_token, pad_token_id=0, bos_token_id=2, eos_token_id=1)


OFFICIAL_BV_VOCAB = 257152  # 256000 Gemma pieces + 1024 <loc> + 128 <seg>
OFFICIAL_HF_VOCAB = 257216  # + <image> (257152), padded to a multiple of 64


def _unknowns(vision_width: int, text_width: int, version: int, stated: dict, source: str) -> dict:
    """The fields tensor shapes cannot tell: those `stated` (by a config.json), else those of
    the official preset with the same widths, else Gemma's defaults where there are any.

    Keys: vision_heads, head_dim, query_pre_attn_scalar, attn_softcap, final_softcap, the two
    norm epsilons and max_positions.
    """
    like = next((c for name, c in PRESETS.items() if name.startswith("paligemma")
                 and (c.vision.width, c.text.width, c.text.version) == (vision_width, text_width, version)), None)
    known = {} if like is None else dict(vision_heads=like.vision.num_heads, head_dim=like.text.head_dim,
                                         query_pre_attn_scalar=like.text.query_pre_attn_scalar)
    known.update({k: v for k, v in stated.items() if v is not None})
    if "vision_heads" not in known or "head_dim" not in known:
        raise CheckpointError(f"{source}: the tensors do not tell the number of attention heads and no "
                              "config.json says it; pass config=... to load()")
    known.setdefault("query_pre_attn_scalar", known["head_dim"])
    known.setdefault("attn_softcap", None if version == 1 else 50.0)
    known.setdefault("final_softcap", None if version == 1 else 30.0)
    known.setdefault("vision_eps", 1e-6)
    known.setdefault("text_eps", 1e-6)
    known.setdefault("max_positions", TextConfig.max_positions)
    return known


def _count_layers(keys, pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def _size_tensor(shapes: dict[str, tuple], name: str, ndim: int, source: str) -> tuple[int, ...]:
    """The shape of the tensor `name` that the model's sizes are read from; "{i}" in the name
    stands for a layer, and the lowest layer that has the tensor is used."""
    pattern = re.compile(re.escape(name).replace(r"\{i\}", r"(\d+)"))
    found = sorted((int(m.group(1)) if pattern.groups else 0, k) for k in shapes if (m := pattern.fullmatch(k)))
    if not found:
        raise CheckpointError(f"{source}: missing keys ['{name.format(i=0)}'], from which the model's sizes are read")
    key = found[0][1]
    if len(shapes[key]) != ndim or 0 in shapes[key]:
        raise CheckpointError(f"{source}: {key} has shape {list(shapes[key])}; the model's sizes are read from it, "
                              f"which needs {ndim} non-zero dimensions")
    return tuple(shapes[key])


def _config(vision: dict, text: dict, source: str) -> PaliGemmaConfig:
    """The config of these sizes; sizes that do not fit together are a CheckpointError."""
    try:
        return PaliGemmaConfig(VisionConfig(**vision), TextConfig(**text))
    except BadInput:
        raise
    except ValueError as err:  # e.g. a width that is not a multiple of the number of heads
        raise CheckpointError(f"{source}: the tensor shapes give no valid model: {err}") from None


# The config.json fields read, with what each must be: (section, field, kind).
_STATED = {
    "vision_heads": ("vision_config", "num_attention_heads", "count"),
    "vision_depth": ("vision_config", "num_hidden_layers", "count"),
    "vision_eps": ("vision_config", "layer_norm_eps", "number"),
    "head_dim": ("text_config", "head_dim", "count"),
    "text_depth": ("text_config", "num_hidden_layers", "count"),
    "query_pre_attn_scalar": ("text_config", "query_pre_attn_scalar", "number"),
    "text_eps": ("text_config", "rms_norm_eps", "number"),
    "max_positions": ("text_config", "max_position_embeddings", "count"),
    "attn_softcap": ("text_config", "attn_logit_softcapping", "number or null"),
    "final_softcap": ("text_config", "final_logit_softcapping", "number or null"),
}


def _stated(config_json, source: str) -> dict:
    """The config.json fields of `_STATED` that it states (null only where a cap may be off);
    a field of the wrong type is a CheckpointError naming it."""
    if config_json is None:
        return {}
    if not isinstance(config_json, dict):
        raise CheckpointError(f"{source}: config.json holds {type(config_json).__name__}, expected a JSON object")
    stated = {}
    for name, (section, field, kind) in _STATED.items():
        fields = config_json.get(section, {})
        if not isinstance(fields, dict):
            raise CheckpointError(f"{source}: config.json {section} is {fields!r:.40}, expected a JSON object")
        if field not in fields or (fields[field] is None and kind != "number or null"):
            continue
        value = fields[field]
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if not (number and (kind != "count" or isinstance(value, int)) or value is None):
            expected = "a positive integer" if kind == "count" else f"a positive {kind}"
            raise CheckpointError(f"{source}: config.json {section}.{field} is {value!r:.40}, expected {expected}")
        stated[name] = value
    return stated


def config_from_hf(shapes: dict[str, tuple], config_json: dict | None, source: str = "checkpoint") -> PaliGemmaConfig:
    """Our config from a transformers checkpoint: sizes from the tensor shapes (canonical keys),
    head counts, query scalar, caps, context length and layer counts from config.json when
    it states them (so that a missing layer is reported as missing).

    The sliding window of transformers' Gemma 2 configs is ignored: big_vision has none.
    """
    stated = _stated(config_json, source)
    width, _, patch_size, _ = _size_tensor(shapes, "vision_tower.embeddings.patch_embedding.weight", 4, source)
    patches = _size_tensor(shapes, "vision_tower.embeddings.position_embedding.weight", 2, source)[0]
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise CheckpointError(f"{source}: vision_tower.embeddings.position_embedding.weight has {patches} rows, "
                              "not the patches of a square grid")
    vision = dict(width=width, patch_size=patch_size, image_size=grid * patch_size,
                  depth=stated.get("vision_depth") or _count_layers(shapes, r"vision_tower\.encoder\.layers\.(\d+)\."),
                  mlp_dim=_size_tensor(shapes, "vision_tower.encoder.layers.{i}.mlp.fc1.weight", 2, source)[0])
    version = 2 if any(re.fullmatch(r"language_model\.layers\.\d+\.post_feedforward_layernorm\.weight", k)
                       for k in shapes) else 1
    vocab_size, text_width = _size_tensor(shapes, "language_model.embed_tokens.weight", 2, source)
    if version == 1:  # Gemma 1 has no caps, whatever a config.json says
        stated.pop("attn_softcap", None), stated.pop("final_softcap", None)
    u = _unknowns(width, text_width, version, stated, source)
    # transformers writes null for a cap that is off: that null must survive the defaults
    u.update({cap: stated[cap] for cap in ("attn_softcap", "final_softcap") if cap in stated})
    head_dim = u["head_dim"]
    q_rows = _size_tensor(shapes, "language_model.layers.{i}.self_attn.q_proj.weight", 2, source)[0]
    kv_rows = _size_tensor(shapes, "language_model.layers.{i}.self_attn.k_proj.weight", 2, source)[0]
    if q_rows % head_dim or kv_rows % head_dim:
        raise CheckpointError(f"{source}: the attention weights have {q_rows} (query) and {kv_rows} (key) rows, "
                              f"not both multiples of head_dim {head_dim}")
    text = dict(
        version=version, vocab_size=vocab_size, width=text_width,
        depth=stated.get("text_depth") or _count_layers(shapes, r"language_model\.layers\.(\d+)\."),
        mlp_dim=_size_tensor(shapes, "language_model.layers.{i}.mlp.gate_proj.weight", 2, source)[0],
        num_heads=q_rows // head_dim, num_kv_heads=kv_rows // head_dim, head_dim=head_dim,
        query_pre_attn_scalar=u["query_pre_attn_scalar"], norm_eps=u["text_eps"], max_positions=u["max_positions"],
        attn_softcap=u["attn_softcap"], final_softcap=u["final_softcap"])
    return _config(dict(vision, num_heads=u["vision_heads"], norm_eps=u["vision_eps"]), text, source)


def config_from_bigvision(shapes: dict[str, tuple], source: str = "checkpoint") -> PaliGemmaConfig:
    """Our config from big_vision arrays: the einsum shapes tell every size, including heads.

    Only Gemma 2's query scalar cannot be read off: the official preset with the same widths
    gives it (144 for the 27B), else head_dim.
    """
    patch_size, _, _, width = _size_tensor(shapes, "img/embedding/kernel", 4, source)  # [patch, patch, 3, D]
    patches = _size_tensor(shapes, "img/pos_embedding", 3, source)[1]  # [1, N, W]
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise CheckpointError(f"{source}: img/pos_embedding has {patches} positions, not the patches of a square grid")
    attention = "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"
    depth, _, heads, _ = _size_tensor(shapes, attention, 4, source)  # [L, D, N, H]
    mlp = _size_tensor(shapes, "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel", 3, source)  # [L, W, F]
    vision = dict(width=width, patch_size=patch_size, image_size=grid * patch_size, depth=depth, mlp_dim=mlp[2],
                  num_heads=heads)
    lq = _size_tensor(shapes, "llm/layers/attn/q_einsum/w", 4, source)  # [L, N, D, H]
    kv = _size_tensor(shapes, "llm/layers/attn/kv_einsum/w", 5, source)  # [L, 2, K, D, H]
    gating = _size_tensor(shapes, "llm/layers/mlp/gating_einsum", 4, source)  # [L, 2, D, F]
    vocab_size, text_width = _size_tensor(shapes, "llm/embedder/input_embedding", 2, source)
    version = 2 if "llm/layers/post_ffw_norm/scale" in shapes else 1
    u = _unknowns(width, text_width, version, dict(vision_heads=heads, head_dim=lq[3]), source)
    text = dict(version=version, vocab_size=vocab_size, width=text_width, depth=lq[0], mlp_dim=gating[3],
                num_heads=lq[1], num_kv_heads=kv[2], head_dim=lq[3], query_pre_attn_scalar=u["query_pre_attn_scalar"],
                attn_softcap=u["attn_softcap"], final_softcap=u["final_softcap"])
    return _config(vision, text, source)


# ---------------------------------------------------------------------------------------------
# Files. Nothing here unpickles: safetensors, and numpy with allow_pickle=False. Whatever a
# damaged file makes the parsing libraries raise becomes one CheckpointError naming the file.

def _npy_header(member) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of one .npy member of an .npz, read before its data."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    else:  # 2.0 and 3.0 share a layout (3.0 allows UTF-8 field names, which weights never have)
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    return shape, dtype


def _npz_arrays(archive: zipfile.ZipFile, path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz archive, each header checked before its data is read: arrays
    that are not numbers (pickled Python objects above all) are refused unread, and a header
    that promises more (or fewer) bytes than the member holds is refused before any memory is
    reserved for it."""
    arrays, not_numbers = {}, []
    for info in archive.infolist():
        key = info.filename.removesuffix(".npy")
        with archive.open(info) as member:
            shape, dtype = _npy_header(member)
            data_bytes = info.file_size - member.tell()
        if dtype.hasobject:
            not_numbers.append(f"{key} (Python objects, which would have to be unpickled)")
            continue
        if dtype.kind not in "biufc" and dtype != np.dtype("V2"):  # V2: bfloat16, which numpy cannot name
            not_numbers.append(f"{key} ({dtype})")
            continue
        if math.prod(shape) * dtype.itemsize != data_bytes:
            raise CheckpointError(f"{path}: array {key} claims shape {list(shape)} of {dtype} "
                                  f"({math.prod(shape) * dtype.itemsize} bytes) but holds {data_bytes} bytes")
        with archive.open(info) as member:
            arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
    if not_numbers:
        raise CheckpointError(f"{path}: arrays that hold no numbers: {bounded(not_numbers)}; this package never "
                              "unpickles, and weights are float arrays")
    return arrays


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """big_vision arrays from an .npz; bfloat16 arrays (stored as 2-byte void) come back as bfloat16,
    other numbers as the torch dtype of the same name (integers too: the loaders refuse them)."""
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = _npz_arrays(archive, path)
    except (BadInput, MemoryError):
        raise
    except Exception as err:  # zipfile, zlib and numpy raise a dozen types for truncated or corrupt files
        raise CheckpointError(f"{path}: not a readable big_vision .npz (truncated or corrupt?): "
                              f"{type(err).__name__}: {err}") from None
    tensors = {}
    for key, array in arrays.items():
        if array.dtype == np.dtype("V2"):
            tensors[key] = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
        else:
            tensors[key] = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))  # native order
    return tensors


def write_npz(params: dict[str, torch.Tensor], path: Path) -> None:
    """Write big_vision arrays as an .npz, bfloat16 as 2-byte void exactly as the official files."""
    arrays = {}
    for key, t in params.items():
        t = t.detach().cpu().contiguous()
        arrays[key] = t.view(torch.int16).numpy().view("V2") if t.dtype == torch.bfloat16 else t.numpy()
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def read_safetensors_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors under their stored names, the metadata strings) of one safetensors file.

    A missing, truncated or corrupt file is a CheckpointError naming it. The reader for every
    safetensors file of the package, training checkpoints included.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    try:
        with safe_open(path, "pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except MemoryError:
        raise
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, keys in canonical transformers spelling."""
    return _renamed(read_safetensors_file(path)[0], canonical_hf_key, str(path))


def _shard_names(index: Path) -> list[str]:
    """The shard files that model.safetensors.index.json names, each checked to be in its folder."""
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f'{index}: expected {{"weight_map": {{tensor name: shard file name}}}}')
    names = sorted(set(weight_map.values()))
    outside = [name for name in names if Path(name).name != name or name in ("", ".", "..")]
    if outside:
        raise CheckpointError(f"{index}: shard names must be file names in the index's folder, got {_listing(outside)}")
    return names


def read_hf_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors (canonical keys) and config.json (or None) of a transformers checkpoint folder,
    one file or sharded with model.safetensors.index.json. A tensor in two shards is an error."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = _shard_names(index)
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json in this folder")
    tensors, shard_of = {}, {}
    for name in files:
        for key, value in read_safetensors(path / name).items():
            if key in tensors:
                raise CheckpointError(f"{path}: the tensor {key!r} is in two shards, {shard_of[key]} and {name}")
            tensors[key], shard_of[key] = value, name
    config = path / "config.json"
    return tensors, (read_json(config) if config.exists() else None)


def to_hf_state_dict(model: PaliGemma) -> dict[str, torch.Tensor]:
    """Our parameters under the published hub names (vision_tower.vision_model.*,
    language_model.model.*), which every transformers version loads; lm_head is tied, so omitted."""
    params = model.state_dict()
    hub = {"vision_tower.": "vision_tower.vision_model.", "language_model.": "language_model.model.",
           "multi_modal_projector.": "multi_modal_projector."}
    out = {}
    for ours, theirs in hf_key_map(model).items():
        prefix = next(p for p in hub if theirs.startswith(p))
        out[hub[prefix] + theirs.removeprefix(prefix)] = params[ours].detach().contiguous()
    return out


def write_hf_folder(tensors: dict[str, torch.Tensor], cfg: PaliGemmaConfig, path: Path) -> None:
    """A transformers checkpoint folder: model.safetensors and config.json."""
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "model.safetensors", lambda f: f.write(safetensors_bytes(tensors, metadata={"format": "pt"})))
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    config = dict(hf_config_dict(cfg), dtype=dtype)
    atomic_write(path / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))


# ---------------------------------------------------------------------------------------------
# The official vocabulary in both layouts. transformers' files carry 64 more embedding rows than
# big_vision's: `<image>` (257152) and padding to a multiple of 64, none of which a tokenizer
# emits. Going to big_vision they are dropped; coming back they are filled with the mean
# embedding (the centre of the distribution transformers samples them from).

def _bigvision_to_hf_vocab(embedding: torch.Tensor) -> torch.Tensor:
    if embedding.shape[0] != OFFICIAL_BV_VOCAB:
        return embedding
    extra = embedding.float().mean(0, keepdim=True).expand(OFFICIAL_HF_VOCAB - OFFICIAL_BV_VOCAB, -1)
    return torch.cat([embedding, extra.to(embedding.dtype)])


def _hf_to_bigvision_vocab(embedding: torch.Tensor) -> torch.Tensor:
    return embedding[:OFFICIAL_BV_VOCAB] if embedding.shape[0] == OFFICIAL_HF_VOCAB else embedding


# ---------------------------------------------------------------------------------------------
# The entry points.

def _empty_model(cfg: PaliGemmaConfig, dtype: torch.dtype) -> PaliGemma:
    """A model whose tensors are allocated but not initialised: the loader fills every one."""
    with torch.device("meta"):
        model = PaliGemma(cfg)
    return model.to_empty(device="cpu").to(dtype)


def read_checkpoint(path: Path) -> tuple[str, dict[str, torch.Tensor], dict | None]:
    """(format, tensors, config.json or None) of a checkpoint: an HF folder or file, or an .npz."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        fmt, (tensors, config_json) = "hf", read_hf_folder(path)
    elif path.suffix == ".safetensors":
        fmt, tensors, config_json = "hf", read_safetensors(path), None
    elif path.suffix == ".npz":
        tensors = _renamed(read_npz(path), lambda k: k.removeprefix("params/"), str(path))
        fmt, config_json = "npz", None
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format; expected a transformers folder, "
                              ".safetensors or a big_vision .npz")
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors")
    return fmt, tensors, config_json


def config_of(fmt: str, tensors: dict[str, torch.Tensor], config_json: dict | None, source: str) -> PaliGemmaConfig:
    """The config of a checkpoint that `read_checkpoint` returned: from config.json and the shapes."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    return config_from_hf(shapes, config_json, source) if fmt == "hf" else config_from_bigvision(shapes, source)


def check_checkpoint(fmt: str, tensors: dict[str, torch.Tensor], config: PaliGemmaConfig,
                     source: str) -> dict[str, torch.Tensor]:
    """Every check `load` makes, without allocating a model: raises CheckpointError naming each
    missing, unexpected, mis-shaped or non-float tensor; returns the tensors as our parameters."""
    with torch.device("meta"):
        skeleton = PaliGemma(config)
    check = check_hf_state_dict if fmt == "hf" else check_bigvision_params
    return check(skeleton, tensors, source)


def load(path, dtype: torch.dtype | None = None, device=None, config: PaliGemmaConfig | None = None,
         image_size: int | None = None) -> PaliGemma:
    """Load official-format weights: a transformers folder (one file or sharded, any key
    spelling) or .safetensors file, or a big_vision .npz (float32 or bfloat16).

    The config comes from `config`, else config.json and the tensor shapes. Every tensor is
    checked before the model is allocated (`check_checkpoint`). dtype defaults to the file's.
    `image_size` runs the model at another resolution, resampling the position embeddings. A
    `tokenizer.model` (or else a `tokenizer.json`) beside the weights is loaded as
    `model.tokenizer` (else None). Returns the model in eval mode. Anything wrong with the
    files is a BadInput naming the file.
    """
    path = Path(path)
    fmt, tensors, config_json = read_checkpoint(path)
    config = config or config_of(fmt, tensors, config_json, str(path))
    ours = check_checkpoint(fmt, tensors, config, str(path))
    model = _empty_model(config, dtype or next(iter(ours.values())).dtype)
    _copy_into(model, ours)
    if image_size is not None and image_size != config.vision.image_size:
        model = at_resolution(model, image_size)
    model.tokenizer = find_tokenizer(path if path.is_dir() else path.parent)
    return model.to(device).eval()


def at_resolution(model: PaliGemma, image_size: int) -> PaliGemma:
    """The same weights in a model for another image size, position embeddings resampled."""
    cfg = replace(model.config, vision=replace(model.config.vision, image_size=image_size))
    state = model.state_dict()
    state["vision.pos_embed"] = resample_pos_embed(state["vision.pos_embed"], cfg.vision.grid_size)
    resized = _empty_model(cfg, state["vision.pos_embed"].dtype)
    resized.load_state_dict(state, strict=True)
    return resized


def convert(src, dst) -> None:
    """Convert between the two official formats: an .npz destination gets big_vision arrays,
    anything else a transformers folder (with the source's tokenizer, if it has one). Values
    and dtype are kept bit for bit.

    Nothing is overwritten, and nothing half-written is left: the folder is written under a
    temporary name beside `dst` and renamed into place when complete (an .npz is written
    atomically).
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise BadInput(f"{dst}: already exists; convert writes a new file or folder and overwrites nothing")
    model = load(src)
    if dst.suffix == ".npz":
        params = to_bigvision(model)
        params["llm/embedder/input_embedding"] = _hf_to_bigvision_vocab(params["llm/embedder/input_embedding"])
        write_npz(params, dst)
        return
    tensors = to_hf_state_dict(model)
    embed = "language_model.model.embed_tokens.weight"
    tensors[embed] = _bigvision_to_hf_vocab(tensors[embed])
    cfg = replace(model.config, text=replace(model.config.text, vocab_size=tensors[embed].shape[0]))
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        write_hf_folder(tensors, cfg, partial)
        if model.tokenizer is not None:
            model.tokenizer.save(partial / "tokenizer.model")
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
