"""How the official formats name and shape our tensors, and the strict checks against a model.

Our modules are named after the paper and big_vision (`vision.blocks.3.attn.q_proj`,
`llm.layers.5.pre_ffw_norm`). A checkpoint in transformers' layout names the same tensors
differently, and three spellings of that layout are in circulation:

    in memory (v5)      model.vision_tower.*     model.language_model.*   lm_head.weight
    save_pretrained     vision_tower.*           language_model.model.*   (no lm_head)
    hub files (4.x)     vision_tower.vision_model.*  language_model.model.*  language_model.lm_head.weight

`hf_key_map` lists, for a model of ours, the transformers name of every parameter (one
canonical spelling); `canonical_hf_key` rewrites any of the three spellings to it. big_vision's
.npz layout stacks each tower's layers and shapes attention kernels for einsums; its `Rule`s
name each array and the transforms between it and our parameters (`to_bigvision`). Loading
either layout is then a renaming plus checks: every tensor must be present, expected, of the
right shape and floating point. All that is wrong is reported at once, in one CheckpointError
(a BadInput) that names the file, each key and both shapes, a bounded number of keys per kind
of problem. The output embedding is tied to the input embedding, so a stored `lm_head` must
equal it and is then dropped. Last, the official vocabulary has 64 more rows in transformers'
files than in big_vision's.

docs/checkpoints.md describes all of this: §2 transformers' layout, §3 big_vision's, §4
the vocabulary rows. This module knows tensors and names only, not files or configs:
checkpoint_config.py and checkpoint.py build on it.
"""

import re
from typing import Callable, NamedTuple

import torch
from torch import nn

from .config import OFFICIAL_BV_VOCAB, PaliGemmaConfig
from .files import BadInput
from .gemma import Gemma
from .paligemma import PaliGemma
from .siglip import SigLIPEncoder


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


def listing(keys: list[str], bound: int = 10) -> str:
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
    problems = [f"missing keys {listing(missing)}"] if missing else []
    problems += [f"unexpected keys {listing(unexpected)}"] if unexpected else []
    problems += [bounded(misshaped)] if misshaped else []
    problems += [f"not floating point: {bounded(untyped)}"] if untyped else []
    return problems


def raise_problems(problems: list[str], source: str) -> None:
    """One CheckpointError naming `source` and every problem (tensor_problems' list), if any."""
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def renamed(tensors: dict[str, torch.Tensor], rename: Callable[[str], str], source: str) -> dict[str, torch.Tensor]:
    """The tensors under new names; two keys that become one name are an error."""
    out, origin = {}, {}
    for key, value in tensors.items():
        name = rename(key)
        if name in out:
            raise CheckpointError(f"{source}: {origin[name]!r} and {key!r} are two copies of the tensor {name!r}")
        out[name], origin[name] = value, key
    return out


def copy_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
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
    tensors = renamed(state_dict, canonical_hf_key, source)
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
    copy_into(model, check_hf_state_dict(model, state_dict, source))


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
    params = renamed(params, lambda key: key.removeprefix("params/"), source)
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
    copy_into(model, check_bigvision_params(model, params, source))


# ---------------------------------------------------------------------------------------------
# The official vocabulary in both layouts. transformers' files carry 64 more embedding rows than
# big_vision's: `<image>` (257152) and padding to a multiple of 64, none of which a tokenizer
# emits. Going to big_vision they are dropped; coming back they are filled with the mean
# embedding (the centre of the distribution transformers samples them from).

OFFICIAL_HF_VOCAB = 257216  # + <image> (257152), padded to a multiple of 64


def bigvision_to_hf_vocab(embedding: torch.Tensor) -> torch.Tensor:
    """big_vision's official embedding [257152, D] with transformers' 64 extra rows appended
    (the mean embedding); any other embedding unchanged."""
    if embedding.shape[0] != OFFICIAL_BV_VOCAB:
        return embedding
    extra = embedding.float().mean(0, keepdim=True).expand(OFFICIAL_HF_VOCAB - OFFICIAL_BV_VOCAB, -1)
    return torch.cat([embedding, extra.to(embedding.dtype)])


def hf_to_bigvision_vocab(embedding: torch.Tensor) -> torch.Tensor:
    """transformers' official embedding [257216, D] without its 64 extra rows; any other
    embedding unchanged."""
    return embedding[:OFFICIAL_BV_VOCAB] if embedding.shape[0] == OFFICIAL_HF_VOCAB else embedding
