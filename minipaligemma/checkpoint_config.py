"""The config of a checkpoint: transformers' config.json <-> our config, and inference from shapes.

`hf_config_dict` writes our config as the config.json of a transformers folder (the one
`convert` and `write_hf_folder` write). `config_from_hf` and `config_from_bigvision` go the
other way: the tensor shapes give almost every size, and what they cannot tell (head counts in
transformers' files, the query scalar, soft-caps, norm epsilons, context length) comes from a
config.json when there is one, else from the official preset with the same widths, else from
Gemma's defaults. A config.json field of the wrong type, or shapes that give no valid model,
is a CheckpointError naming the file. See docs/checkpoints.md §7.

A quantized checkpoint (docs/checkpoints.md §9) is ours alone and its codes do not have the
shapes of the float weights, so it states our config whole in its header instead
(`config_to_header`, `config_from_header`).
"""

import json
import math
import re
from dataclasses import asdict, fields
from typing import get_args

from .config import PRESETS, PaliGemmaConfig, TextConfig, VisionConfig
from .files import BadInput
from .layouts import OFFICIAL_BV_VOCAB, OFFICIAL_HF_VOCAB, CheckpointError


# ---------------------------------------------------------------------------------------------
# transformers' config.json fields from ours.

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


# ---------------------------------------------------------------------------------------------
# Our config from a checkpoint's shapes, and its config.json when there is one.

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


def _config(vision: dict, text: dict, source: str, origin: str = "the tensor shapes") -> PaliGemmaConfig:
    """The config of these sizes; sizes that do not fit together are a CheckpointError."""
    try:
        return PaliGemmaConfig(VisionConfig(**vision), TextConfig(**text))
    except BadInput:
        raise
    except ValueError as err:  # e.g. a width that is not a multiple of the number of heads
        raise CheckpointError(f"{source}: {origin} give no valid model: {err}") from None


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
# Our config whole, as JSON: the header of a quantized checkpoint.

def config_to_header(cfg: PaliGemmaConfig) -> str:
    """Every field of our config as a JSON object {"vision": {...}, "text": {...}}."""
    return json.dumps(asdict(cfg))


def _of_type(value, annotation) -> bool:
    """Whether a JSON value fits a config field's annotation (int, float, str, or one of them | None)."""
    allowed = get_args(annotation) or (annotation,)
    if float in allowed:
        allowed += (int,)  # JSON writes 10000.0 as a float, but a hand-edited 10000 means the same
    return not isinstance(value, bool) and isinstance(value, allowed)


def config_from_header(text: str, source: str) -> PaliGemmaConfig:
    """The config that config_to_header wrote. Not JSON, a field missing, unknown or of the
    wrong type, or sizes that give no valid model: a CheckpointError naming `source`."""
    try:
        stated = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{source}: the header's config is not valid JSON ({err})") from None
    parts = {"vision": VisionConfig, "text": TextConfig}
    if not isinstance(stated, dict) or set(stated) != set(parts) or not all(isinstance(v, dict) for v in stated.values()):
        raise CheckpointError(f"{source}: the header's config must be a JSON object {{\"vision\": {{...}}, \"text\": {{...}}}}")
    problems = []
    for part, cls in parts.items():
        names = {f.name for f in fields(cls)}
        missing, unknown = sorted(names - set(stated[part])), sorted(set(stated[part]) - names)
        wrong = [f"{f.name}={stated[part][f.name]!r:.20}" for f in fields(cls)
                 if f.name in stated[part] and not _of_type(stated[part][f.name], f.type)]
        problems += [f"{part} fields missing {missing}"] if missing else []
        problems += [f"unknown {part} fields {unknown}"] if unknown else []
        problems += [f"{part} fields of the wrong type {wrong}"] if wrong else []
    if problems:
        raise CheckpointError(f"{source}: the header's config: {'; '.join(problems)}")
    return _config(stated["vision"], stated["text"], source, origin="the header's config fields")
