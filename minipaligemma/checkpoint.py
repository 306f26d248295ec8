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

import json
import re
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .config import PRESETS, PaliGemmaConfig, TextConfig, VisionConfig
from .files import BadInput, atomic_write
from .gemma import Gemma
from .paligemma import PaliGemma
from .siglip import SigLIPEncoder, resample_pos_embed
from .tokenizer import Tokenizer


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


def _listing(keys: list[str]) -> str:
    return f"{keys[:10]}{f' and {len(keys) - 10} more' if len(keys) > 10 else ''}"


def check_keys_and_shapes(expected: dict[str, tuple], found: dict[str, tuple], source: str) -> None:
    """Raise CheckpointError unless `found` has exactly the `expected` keys with the expected shapes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing keys {_listing(missing)}; unexpected keys {_listing(unexpected)}")
    for key, want in expected.items():
        if tuple(found[key]) != tuple(want):
            raise CheckpointError(f"{source}: {key} has shape {list(found[key])}, the model expects {list(want)}")


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors named as our parameters into the model (shapes already checked)."""
    params = model.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)


def load_hf_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy a transformers-layout state dict into `model`, strictly.

    Any spelling of the keys is accepted. Raises CheckpointError naming `source`, the key and
    both shapes if a tensor is missing, unexpected or mis-shaped, or if a stored lm_head is not
    a copy of the (tied) embedding.
    """
    tensors = {canonical_hf_key(k): v for k, v in state_dict.items()}
    lm_head = tensors.pop("lm_head.weight", None)
    embedding_key = _embedding_key(model)
    if lm_head is not None:
        embedding = tensors.get(embedding_key) if embedding_key else None
        if embedding is None or embedding.shape != lm_head.shape or not torch.equal(embedding, lm_head):
            raise CheckpointError(f"{source}: lm_head.weight is not a copy of the input embedding; "
                                  "PaliGemma ties them and this model has no separate output layer")
    key_map = hf_key_map(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys_and_shapes({theirs: shapes[ours] for ours, theirs in key_map.items()},
                          {k: tuple(v.shape) for k, v in tensors.items()}, source)
    _copy_into(model, {ours: tensors[theirs] for ours, theirs in key_map.items()})


# ---------------------------------------------------------------------------------------------
# big_vision's .npz layout (spec §4.1, §4.3): "/"-joined flax paths, the layers of each tower
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
        Rule(attn + "out/kernel", (ours + "attn.out_proj.weight",),  # [heads, hd, W] <-> [W, heads*hd]
             lambda a: (a.reshape(w, w).T,), lambda t: t.T.reshape(heads, hd, w)),
        _same(ours + "attn.out_proj.bias", attn + "out/bias"),
    ]
    for bv_name, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        layer += [
            Rule(attn + f"{bv_name}/kernel", (ours + f"attn.{name}.weight",),  # [W, heads, hd] <-> [heads*hd, W]
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
             lambda a: (a[0].T, a[1].T), lambda tg, tu: torch.stack([tg.T, tu.T])),  # [2, D, F]
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


def load_bigvision_params(model: PaliGemma, params: dict[str, torch.Tensor], source: str = "npz") -> None:
    """Copy big_vision arrays into `model`, strictly (keys with or without the "params/" prefix)."""
    params = {k.removeprefix("params/"): v for k, v in params.items()}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in to_bigvision(PaliGemma(model.config)).items()}
    check_keys_and_shapes(expected, {k: tuple(v.shape) for k, v in params.items()}, source)
    ours = {}
    for rule, depth in _bigvision_rules(model.config):
        slices = [params[rule.bv_key]] if depth is None else list(params[rule.bv_key])
        for i, array in enumerate(slices):
            ours.update({name.format(i=i): t for name, t in zip(rule.ours, rule.to_ours(array))})
    _copy_into(model, ours)


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
                max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": t.rope_base})
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


def _unknowns(vision_width: int, text_width: int, version: int, stated: dict) -> dict:
    """The fields tensor shapes cannot tell: those `stated` (by a config.json), else those of
    the official preset with the same widths, else Gemma's defaults where there are any.

    Keys: vision_heads, head_dim, query_pre_attn_scalar, attn_softcap, final_softcap, and the
    two norm epsilons.
    """
    like = next((c for name, c in PRESETS.items() if name.startswith("paligemma")
                 and (c.vision.width, c.text.width, c.text.version) == (vision_width, text_width, version)), None)
    known = {} if like is None else dict(vision_heads=like.vision.num_heads, head_dim=like.text.head_dim,
                                         query_pre_attn_scalar=like.text.query_pre_attn_scalar)
    known.update({k: v for k, v in stated.items() if v is not None})
    if "vision_heads" not in known or "head_dim" not in known:
        raise CheckpointError("the tensors do not tell the number of attention heads and no config.json "
                              "says it; pass config=... to load()")
    known.setdefault("query_pre_attn_scalar", known["head_dim"])
    known.setdefault("attn_softcap", None if version == 1 else 50.0)
    known.setdefault("final_softcap", None if version == 1 else 30.0)
    known.setdefault("vision_eps", 1e-6)
    known.setdefault("text_eps", 1e-6)
    return known


def _count_layers(keys, pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def config_from_hf(shapes: dict[str, tuple], config_json: dict | None) -> PaliGemmaConfig:
    """Our config from a transformers checkpoint: sizes from the tensor shapes (canonical keys),
    head counts, query scalar and caps from config.json when present.

    The sliding window of transformers' Gemma 2 configs is ignored: big_vision has none.
    """
    patch = shapes["vision_tower.embeddings.patch_embedding.weight"]
    grid = int(round(shapes["vision_tower.embeddings.position_embedding.weight"][0] ** 0.5))
    vision = dict(width=patch[0], patch_size=patch[2], image_size=grid * patch[2],
                  depth=_count_layers(shapes, r"vision_tower\.encoder\.layers\.(\d+)\."),
                  mlp_dim=shapes["vision_tower.encoder.layers.0.mlp.fc1.weight"][0])
    version = 2 if "language_model.layers.0.post_feedforward_layernorm.weight" in shapes else 1
    vocab_size, width = shapes["language_model.embed_tokens.weight"]
    stated = {}
    if config_json:
        vc, tc = config_json.get("vision_config", {}), config_json.get("text_config", {})
        stated = dict(vision_heads=vc.get("num_attention_heads"), vision_eps=vc.get("layer_norm_eps"),
                      head_dim=tc.get("head_dim"), query_pre_attn_scalar=tc.get("query_pre_attn_scalar"),
                      text_eps=tc.get("rms_norm_eps"))
        if version == 2:  # transformers writes null for a cap that is off
            stated.update(attn_softcap=tc.get("attn_logit_softcapping", 50.0),
                          final_softcap=tc.get("final_logit_softcapping", 30.0))
    u = _unknowns(vision["width"], width, version, stated)
    if version == 2 and config_json:  # an explicit null (cap off) must survive the defaults
        u["attn_softcap"], u["final_softcap"] = stated["attn_softcap"], stated["final_softcap"]
    text = TextConfig(
        version=version, vocab_size=vocab_size, width=width, depth=_count_layers(shapes, r"language_model\.layers\.(\d+)\."),
        mlp_dim=shapes["language_model.layers.0.mlp.gate_proj.weight"][0],
        num_heads=shapes["language_model.layers.0.self_attn.q_proj.weight"][0] // u["head_dim"],
        num_kv_heads=shapes["language_model.layers.0.self_attn.k_proj.weight"][0] // u["head_dim"],
        head_dim=u["head_dim"], query_pre_attn_scalar=u["query_pre_attn_scalar"], norm_eps=u["text_eps"],
        attn_softcap=u["attn_softcap"], final_softcap=u["final_softcap"])
    return PaliGemmaConfig(VisionConfig(num_heads=u["vision_heads"], norm_eps=u["vision_eps"], **vision), text)


def config_from_bigvision(shapes: dict[str, tuple]) -> PaliGemmaConfig:
    """Our config from big_vision arrays: the einsum shapes tell every size, including heads.

    Only Gemma 2's query scalar cannot be read off: the official preset with the same widths
    gives it (144 for the 27B), else head_dim.
    """
    patch = shapes["img/embedding/kernel"]  # [P, P, 3, W]
    q = shapes["img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"]  # [L, W, heads, hd]
    grid = int(round(shapes["img/pos_embedding"][1] ** 0.5))
    vision = dict(width=patch[3], patch_size=patch[0], image_size=grid * patch[0], depth=q[0],
                  mlp_dim=shapes["img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"][2])
    lq, kv = shapes["llm/layers/attn/q_einsum/w"], shapes["llm/layers/attn/kv_einsum/w"]  # [L, N, D, H], [L, 2, K, D, H]
    vocab_size, width = shapes["llm/embedder/input_embedding"]
    version = 2 if "llm/layers/post_ffw_norm/scale" in shapes else 1
    u = _unknowns(vision["width"], width, version, dict(vision_heads=q[2], head_dim=lq[3]))
    text = TextConfig(version=version, vocab_size=vocab_size, width=width, depth=lq[0],
                      mlp_dim=shapes["llm/layers/mlp/gating_einsum"][3], num_heads=lq[1], num_kv_heads=kv[2],
                      head_dim=lq[3], query_pre_attn_scalar=u["query_pre_attn_scalar"],
                      attn_softcap=u["attn_softcap"], final_softcap=u["final_softcap"])
    return PaliGemmaConfig(VisionConfig(num_heads=q[2], **vision), text)


# ---------------------------------------------------------------------------------------------
# Files. Nothing here unpickles: safetensors, and numpy with allow_pickle=False.

def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """big_vision arrays from an .npz; bfloat16 arrays (stored as 2-byte void) come back as bfloat16."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable big_vision .npz (truncated, corrupt or pickled?): {err}") from err
    tensors = {}
    for key, array in arrays.items():
        if array.dtype == np.dtype("V2"):  # bfloat16, which numpy cannot name
            tensors[key] = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
        else:
            tensors[key] = torch.from_numpy(array)
    return tensors


def write_npz(params: dict[str, torch.Tensor], path: Path) -> None:
    """Write big_vision arrays as an .npz, bfloat16 as 2-byte void exactly as the official files."""
    arrays = {}
    for key, t in params.items():
        t = t.detach().cpu().contiguous()
        arrays[key] = t.view(torch.int16).numpy().view("V2") if t.dtype == torch.bfloat16 else t.numpy()
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def read_hf_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors (canonical keys) and config.json (or None) of a transformers checkpoint folder,
    one file or sharded with model.safetensors.index.json."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json in this folder")
    tensors = {}
    for name in files:
        tensors.update(read_safetensors(path / name))
    config = path / "config.json"
    return tensors, (json.loads(config.read_text()) if config.exists() else None)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, keys in canonical transformers spelling."""
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    try:
        return {canonical_hf_key(k): v for k, v in load_safetensors(path).items()}
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err


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
        return ("hf", *read_hf_folder(path))
    if path.suffix == ".safetensors":
        return "hf", read_safetensors(path), None
    if path.suffix == ".npz":
        return "npz", {k.removeprefix("params/"): v for k, v in read_npz(path).items()}, None
    raise CheckpointError(f"{path}: unknown checkpoint format; expected a transformers folder, "
                          ".safetensors or a big_vision .npz")


def load(path, dtype: torch.dtype | None = None, device=None, config: PaliGemmaConfig | None = None,
         image_size: int | None = None) -> PaliGemma:
    """Load official-format weights: a transformers folder (one file or sharded, any key
    spelling) or .safetensors file, or a big_vision .npz (float32 or bfloat16).

    The config comes from `config`, else config.json and the tensor shapes. dtype defaults to
    the file's. `image_size` runs the model at another resolution, resampling the position
    embeddings. A `tokenizer.model` beside the weights is loaded as `model.tokenizer` (else
    None). Returns the model in eval mode.
    """
    path = Path(path)
    fmt, tensors, config_json = read_checkpoint(path)
    if config is None:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        config = config_from_hf(shapes, config_json) if fmt == "hf" else config_from_bigvision(shapes)
    file_dtype = next(iter(tensors.values())).dtype
    model = _empty_model(config, dtype or file_dtype)
    if fmt == "hf":
        load_hf_state_dict(model, tensors, source=str(path))
    else:
        load_bigvision_params(model, tensors, source=str(path))
    if image_size is not None and image_size != config.vision.image_size:
        model = at_resolution(model, image_size)
    tokenizer_file = (path if path.is_dir() else path.parent) / "tokenizer.model"
    model.tokenizer = Tokenizer.from_file(tokenizer_file) if tokenizer_file.exists() else None
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
    anything else a transformers folder. Values and dtype are kept bit for bit."""
    src, dst = Path(src), Path(dst)
    model = load(src)
    if dst.suffix == ".npz":
        params = to_bigvision(model)
        params["llm/embedder/input_embedding"] = _hf_to_bigvision_vocab(params["llm/embedder/input_embedding"])
        write_npz(params, dst)
    else:
        tensors = to_hf_state_dict(model)
        embed = "language_model.model.embed_tokens.weight"
        tensors[embed] = _bigvision_to_hf_vocab(tensors[embed])
        cfg = replace(model.config, text=replace(model.config.text, vocab_size=tensors[embed].shape[0]))
        write_hf_folder(tensors, cfg, dst)
