"""Checkpoint files in the official layouts, written from random weights, loaded by us.

The transformers files come from transformers itself (save_pretrained, then renamed to the
hub 4.x spelling, then sharded). The big_vision .npz files are written here by following
docs/checkpoints.md §3.2-§3.3 (transformers' conversion transforms, inverted), independently of
minipaligemma.layouts. Each file must give transformers' logits on the same weights.
"""

import json
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_reference import hf_inputs, hf_paligemma
from minipaligemma import PaliGemma, convert, get_config, load
from minipaligemma.checkpoint import read_npz, to_hf_state_dict, write_npz
from minipaligemma.layouts import OFFICIAL_BV_VOCAB, OFFICIAL_HF_VOCAB, CheckpointError, to_bigvision
from minipaligemma.siglip import resample_pos_embed

# The tiny preset scales queries by 24 != head_dim; an .npz cannot say so, so these file tests
# use a tiny config whose scalar is head_dim (and pass config= where a test needs the other).
TINY = replace(get_config("tiny"), text=replace(get_config("tiny").text, query_pre_attn_scalar=16))
TINY1 = get_config("tiny-gemma1")


def bf16_void(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits stored as 2-byte void, as the official .bf16.npz files are."""
    return torch.from_numpy(array).to(torch.bfloat16).view(torch.int16).numpy().view("V2")


def npz_by_hand(hf_state: dict, cfg, bf16: bool = False, prefix: str = "") -> dict:
    """big_vision arrays from a transformers state dict, by docs/checkpoints.md §3.2 (keys, shapes) and §3.3."""
    g = {k: v.float().numpy() for k, v in hf_state.items()}
    vt, lm = "model.vision_tower.", "model.language_model."
    w, heads, hd = cfg.vision.width, cfg.vision.num_heads, cfg.vision.head_dim
    d, n, k, h = cfg.text.width, cfg.text.num_heads, cfg.text.num_kv_heads, cfg.text.head_dim

    def stack(depth, f):
        return np.stack([f(i) for i in range(depth)])

    enc, att = "img/Transformer/encoderblock/", "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
    vl = lambda i, name: g[f"{vt}encoder.layers.{i}.{name}"]  # noqa: E731
    p = {
        "img/embedding/kernel": g[vt + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),  # HWIO
        "img/embedding/bias": g[vt + "embeddings.patch_embedding.bias"],
        "img/pos_embedding": g[vt + "embeddings.position_embedding.weight"][None],
        "img/Transformer/encoder_norm/scale": g[vt + "post_layernorm.weight"],
        "img/Transformer/encoder_norm/bias": g[vt + "post_layernorm.bias"],
        "img/head/kernel": g["model.multi_modal_projector.linear.weight"].T,
        "img/head/bias": g["model.multi_modal_projector.linear.bias"],
        "llm/embedder/input_embedding": g[lm + "embed_tokens.weight"],
        "llm/final_norm/scale": g[lm + "norm.weight"],
    }
    L = cfg.vision.depth
    for j, name in ((0, "layer_norm1"), (1, "layer_norm2")):
        p[enc + f"LayerNorm_{j}/scale"] = stack(L, lambda i: vl(i, f"{name}.weight"))
        p[enc + f"LayerNorm_{j}/bias"] = stack(L, lambda i: vl(i, f"{name}.bias"))
    for bv, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        p[att + f"{bv}/kernel"] = stack(L, lambda i: vl(i, f"self_attn.{hf}.weight").T.reshape(w, heads, hd))
        p[att + f"{bv}/bias"] = stack(L, lambda i: vl(i, f"self_attn.{hf}.bias").reshape(heads, hd))
    p[att + "out/kernel"] = stack(L, lambda i: vl(i, "self_attn.out_proj.weight").T.reshape(heads, hd, w))
    p[att + "out/bias"] = stack(L, lambda i: vl(i, "self_attn.out_proj.bias"))
    for j, name in ((0, "fc1"), (1, "fc2")):
        p[enc + f"MlpBlock_0/Dense_{j}/kernel"] = stack(L, lambda i: vl(i, f"mlp.{name}.weight").T)
        p[enc + f"MlpBlock_0/Dense_{j}/bias"] = stack(L, lambda i: vl(i, f"mlp.{name}.bias"))

    ll = lambda i, name: g[f"{lm}layers.{i}.{name}"]  # noqa: E731
    L = cfg.text.depth
    p["llm/layers/attn/q_einsum/w"] = stack(L, lambda i: ll(i, "self_attn.q_proj.weight").reshape(n, h, d)
                                            .transpose(0, 2, 1))
    p["llm/layers/attn/kv_einsum/w"] = stack(L, lambda i: np.stack(
        [ll(i, f"self_attn.{x}_proj.weight").reshape(k, h, d).transpose(0, 2, 1) for x in "kv"]))
    p["llm/layers/attn/attn_vec_einsum/w"] = stack(L, lambda i: ll(i, "self_attn.o_proj.weight")
                                                   .reshape(d, n, h).transpose(1, 2, 0))
    p["llm/layers/mlp/gating_einsum"] = stack(L, lambda i: np.stack([ll(i, "mlp.gate_proj.weight").T,
                                                                      ll(i, "mlp.up_proj.weight").T]))
    p["llm/layers/mlp/linear"] = stack(L, lambda i: ll(i, "mlp.down_proj.weight").T)
    norms = ({"pre_attention_norm": "input_layernorm", "pre_ffw_norm": "post_attention_layernorm"}
             if cfg.text.version == 1 else
             {"pre_attention_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
              "pre_ffw_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"})
    for bv, hf in norms.items():
        p[f"llm/layers/{bv}/scale"] = stack(L, lambda i: ll(i, f"{hf}.weight"))
    return {prefix + key: (bf16_void(a) if bf16 else a) for key, a in p.items()}


def logits_of(model, cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.text.vocab_size, (2, 8), generator=gen)
    mask_ar = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)
    pixels = torch.rand(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen) * 2 - 1
    with torch.no_grad():
        if isinstance(model, PaliGemma):
            return model(pixels.to(next(model.parameters()).dtype), ids, mask_ar).float()
        out = model(pixel_values=pixels, **hf_inputs(cfg, ids, mask_ar, torch.ones_like(ids)))
        return out.logits[:, cfg.num_image_tokens:]


@pytest.fixture(scope="module", params=[TINY, TINY1], ids=["paligemma2", "paligemma1"])
def reference(request):
    cfg = request.param
    hf = hf_paligemma(cfg, seed=21)
    return cfg, hf, logits_of(hf, cfg)


def assert_logits_match(model, cfg, expected, label):
    diff = (logits_of(model, cfg) - expected).abs().max().item()
    print(f"{label}: max |delta logit| {diff:.2e}")
    assert diff <= 1e-5


def test_save_pretrained_folder(reference, tmp_path):
    cfg, hf, expected = reference
    hf.save_pretrained(tmp_path)
    model = load(tmp_path)
    assert model.config == cfg and not model.training
    assert_logits_match(model, cfg, expected, f"save_pretrained v{cfg.text.version}")


def test_hub_4x_spelling_with_lm_head(reference, tmp_path):
    cfg, hf, expected = reference
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
    renamed["language_model.lm_head.weight"] = renamed["language_model.model.embed_tokens.weight"].clone()
    (tmp_path / "model.safetensors").unlink()
    save_file(renamed, tmp_path / "model.safetensors")
    assert_logits_match(load(tmp_path), cfg, expected, f"hub 4.x spelling v{cfg.text.version}")


def test_sharded_folder(reference, tmp_path):
    cfg, hf, expected = reference
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_logits_match(load(tmp_path), cfg, expected, f"sharded v{cfg.text.version}")


def test_npz_float32(reference, tmp_path):
    cfg, hf, expected = reference
    np.savez(tmp_path / "pt.npz", **npz_by_hand(hf.state_dict(), cfg))
    model = load(tmp_path / "pt.npz")
    assert model.config == cfg and model.llm.embed.weight.dtype == torch.float32
    assert_logits_match(model, cfg, expected, f"npz f32 v{cfg.text.version}")


def test_npz_bfloat16_with_params_prefix(reference, tmp_path):
    """bf16 stored as 2-byte void; compared with transformers holding the same rounded weights."""
    cfg, hf, _ = reference
    np.savez(tmp_path / "pt.bf16.npz", **npz_by_hand(hf.state_dict(), cfg, bf16=True, prefix="params/"))
    model = load(tmp_path / "pt.bf16.npz")
    assert model.llm.embed.weight.dtype == torch.bfloat16
    rounded = hf_paligemma(cfg, seed=21)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert_logits_match(load(tmp_path / "pt.bf16.npz", dtype=torch.float32), cfg, logits_of(rounded, cfg),
                        f"npz bf16 (computed in f32) v{cfg.text.version}")


def test_convert_round_trips_are_bit_exact(reference, tmp_path):
    cfg, hf, expected = reference
    for bf16 in (False, True):
        src = tmp_path / f"src{bf16}.npz"
        np.savez(src, **npz_by_hand(hf.state_dict(), cfg, bf16=bf16))
        convert(src, tmp_path / f"hf{bf16}")
        convert(tmp_path / f"hf{bf16}", tmp_path / f"back{bf16}.npz")
        a, b = read_npz(src), read_npz(tmp_path / f"back{bf16}.npz")
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    # transformers -> npz -> transformers, and transformers itself reads our folder.
    hf.save_pretrained(tmp_path / "orig")
    convert(tmp_path / "orig", tmp_path / "mid.npz")
    convert(tmp_path / "mid.npz", tmp_path / "again")
    before, after = load_file(tmp_path / "orig" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    after = {k.replace("vision_tower.vision_model.", "vision_tower.", 1): v for k, v in after.items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    transformers = pytest.importorskip("transformers")
    reloaded = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "again").eval()
    reloaded.set_attn_implementation("eager")
    assert (logits_of(reloaded, cfg) - expected).abs().max() <= 1e-5


def test_official_vocabulary_rows_between_layouts(tmp_path):
    """big_vision's 257152 rows become transformers' 257216 (64 mean rows) and back, bit-exact."""
    cfg = replace(TINY, text=replace(TINY.text, vocab_size=OFFICIAL_BV_VOCAB, width=16, num_heads=2,
                                     num_kv_heads=1, head_dim=8, query_pre_attn_scalar=8, mlp_dim=16, depth=1))
    model = PaliGemma(cfg)
    write_npz(to_bigvision(model), tmp_path / "a.npz")
    convert(tmp_path / "a.npz", tmp_path / "hf")
    embed = load_file(tmp_path / "hf" / "model.safetensors")["language_model.model.embed_tokens.weight"]
    assert embed.shape[0] == OFFICIAL_HF_VOCAB
    assert torch.allclose(embed[OFFICIAL_BV_VOCAB:], model.llm.embed.weight.mean(0).expand(64, -1))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["image_token_index"] == OFFICIAL_BV_VOCAB
    convert(tmp_path / "hf", tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_config_from_shapes_without_config_json(tmp_path):
    """Official widths tell the preset; the heads then come from it (none are in the shapes)."""
    full = get_config("paligemma2-3b-224")
    cfg = replace(full, vision=replace(full.vision, depth=1), text=replace(full.text, depth=1, vocab_size=300))
    with torch.device("meta"):
        shapes = PaliGemma(cfg)
    tensors = {k: torch.zeros(v.shape) for k, v in to_hf_state_dict(shapes).items()}
    save_file(tensors, tmp_path / "weights.safetensors")
    assert load(tmp_path / "weights.safetensors").config == cfg


def test_tiny_without_config_json_asks_for_a_config(tmp_path):
    model = PaliGemma(TINY)
    save_file(to_hf_state_dict(model), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="number of attention heads.*config="):
        load(tmp_path / "w.safetensors")
    assert load(tmp_path / "w.safetensors", config=TINY).config == TINY


def test_loading_at_another_resolution_resamples_positions(tmp_path):
    model = PaliGemma(TINY)
    write_npz(to_bigvision(model), tmp_path / "a.npz")
    bigger = load(tmp_path / "a.npz", image_size=64)
    assert bigger.config.vision.image_size == 64 and bigger.vision.pos_embed.shape == (64, 64)
    logits = bigger(torch.zeros(1, 3, 64, 64), torch.tensor([[2, 5, 6]]), torch.tensor([[0, 0, 1]]))
    assert logits.shape == (1, 3, TINY.text.vocab_size)


def test_resampling_keeps_a_linear_position_code_linear():
    """Bilinear with aligned corners maps a code linear in (row, col) to the same plane."""
    old, new = 4, 7
    plane = lambda g: torch.stack([torch.linspace(0, 1, g)[:, None].expand(g, g),  # noqa: E731
                                   torch.linspace(0, 1, g)[None, :].expand(g, g)], -1).reshape(g * g, 2)
    assert torch.allclose(resample_pos_embed(plane(old), new), plane(new), atol=1e-6)


# ----- the official key sets of all 12 presets, at full size, on the meta device -------------

def spec_hf_keys(cfg) -> dict[str, tuple]:
    """docs/checkpoints.md §2.2: the hub file's keys and shapes (lm_head omitted: tied)."""
    v, t = cfg.vision, cfg.text
    w, d, n, h, k = v.width, t.width, t.num_heads, t.head_dim, t.num_kv_heads
    keys = {"vision_tower.vision_model.embeddings.patch_embedding.weight": (w, 3, 14, 14),
            "vision_tower.vision_model.embeddings.patch_embedding.bias": (w,),
            "vision_tower.vision_model.embeddings.position_embedding.weight": (v.num_patches, w),
            "vision_tower.vision_model.post_layernorm.weight": (w,), "vision_tower.vision_model.post_layernorm.bias": (w,),
            "multi_modal_projector.linear.weight": (d, w), "multi_modal_projector.linear.bias": (d,),
            "language_model.model.embed_tokens.weight": (OFFICIAL_HF_VOCAB, d), "language_model.model.norm.weight": (d,)}
    for i in range(v.depth):
        pre = f"vision_tower.vision_model.encoder.layers.{i}."
        keys |= {pre + f"{ln}.{p}": (w,) for ln in ("layer_norm1", "layer_norm2") for p in ("weight", "bias")}
        keys |= {pre + f"self_attn.{x}_proj.weight": (w, w) for x in ("q", "k", "v", "out")}
        keys |= {pre + f"self_attn.{x}_proj.bias": (w,) for x in ("q", "k", "v", "out")}
        keys |= {pre + "mlp.fc1.weight": (v.mlp_dim, w), pre + "mlp.fc1.bias": (v.mlp_dim,),
                 pre + "mlp.fc2.weight": (w, v.mlp_dim), pre + "mlp.fc2.bias": (w,)}
    norms = ["input_layernorm", "post_attention_layernorm"]
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if t.version == 2 else []
    for i in range(t.depth):
        pre = f"language_model.model.layers.{i}."
        keys |= {pre + "self_attn.q_proj.weight": (n * h, d), pre + "self_attn.k_proj.weight": (k * h, d),
                 pre + "self_attn.v_proj.weight": (k * h, d), pre + "self_attn.o_proj.weight": (d, n * h),
                 pre + "mlp.gate_proj.weight": (t.mlp_dim, d), pre + "mlp.up_proj.weight": (t.mlp_dim, d),
                 pre + "mlp.down_proj.weight": (d, t.mlp_dim)}
        keys |= {pre + f"{x}.weight": (d,) for x in norms}
    return keys


def spec_npz_keys(cfg) -> dict[str, tuple]:
    """docs/checkpoints.md §3.2: the big_vision file's keys and shapes."""
    v, t = cfg.vision, cfg.text
    w, L, d, Lt = v.width, v.depth, t.width, t.depth
    enc, att = "img/Transformer/encoderblock/", "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
    keys = {"img/embedding/kernel": (14, 14, 3, w), "img/embedding/bias": (w,), "img/pos_embedding": (1, v.num_patches, w),
            "img/Transformer/encoder_norm/scale": (w,), "img/Transformer/encoder_norm/bias": (w,),
            "img/head/kernel": (w, d), "img/head/bias": (d,), "llm/embedder/input_embedding": (OFFICIAL_BV_VOCAB, d),
            "llm/final_norm/scale": (d,), att + "out/kernel": (L, 16, 72, w), att + "out/bias": (L, w),
            enc + "MlpBlock_0/Dense_0/kernel": (L, w, 4304), enc + "MlpBlock_0/Dense_0/bias": (L, 4304),
            enc + "MlpBlock_0/Dense_1/kernel": (L, 4304, w), enc + "MlpBlock_0/Dense_1/bias": (L, w),
            "llm/layers/attn/q_einsum/w": (Lt, t.num_heads, d, t.head_dim),
            "llm/layers/attn/kv_einsum/w": (Lt, 2, t.num_kv_heads, d, t.head_dim),
            "llm/layers/attn/attn_vec_einsum/w": (Lt, t.num_heads, t.head_dim, d),
            "llm/layers/mlp/gating_einsum": (Lt, 2, d, t.mlp_dim), "llm/layers/mlp/linear": (Lt, t.mlp_dim, d)}
    keys |= {enc + f"LayerNorm_{j}/{p}": (L, w) for j in (0, 1) for p in ("scale", "bias")}
    keys |= {att + f"{x}/kernel": (L, w, 16, 72) for x in ("query", "key", "value")}
    keys |= {att + f"{x}/bias": (L, 16, 72) for x in ("query", "key", "value")}
    norms = ["pre_attention_norm", "pre_ffw_norm"] + (["post_attention_norm", "post_ffw_norm"] if t.version == 2 else [])
    keys |= {f"llm/layers/{x}/scale": (Lt, d) for x in norms}
    return keys


@pytest.mark.parametrize("name", [n for n in ("paligemma-3b", "paligemma2-3b", "paligemma2-10b", "paligemma2-28b")
                                  for n in (f"{n}-224", f"{n}-448", f"{n}-896")])
def test_official_key_sets_map_one_to_one(name):
    cfg = get_config(name)
    hf_cfg = replace(cfg, text=replace(cfg.text, vocab_size=OFFICIAL_HF_VOCAB))
    with torch.device("meta"):
        bv_model, hf_model = PaliGemma(cfg), PaliGemma(hf_cfg)
    assert {k: tuple(v.shape) for k, v in to_bigvision(bv_model).items()} == spec_npz_keys(cfg)
    assert {k: tuple(v.shape) for k, v in to_hf_state_dict(hf_model).items()} == spec_hf_keys(cfg)


# ----- bad input: one clear message each ----------------------------------------------------

def test_missing_file():
    with pytest.raises(CheckpointError, match="no such file"):
        load("/nonexistent/pt_224.npz")


def test_unknown_format(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load(tmp_path / "weights.bin")


def test_folder_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load(tmp_path)


def test_truncated_safetensors(tmp_path):
    save_file(to_hf_state_dict(PaliGemma(TINY)), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="w.safetensors: not a readable safetensors file"):
        load(tmp_path / "w.safetensors", config=TINY)


def test_truncated_npz(tmp_path):
    write_npz(to_bigvision(PaliGemma(TINY)), tmp_path / "a.npz")
    data = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "a.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="a.npz: not a readable big_vision .npz"):
        load(tmp_path / "a.npz")


def test_pickled_npz_is_refused_without_unpickling(tmp_path):
    np.savez(tmp_path / "evil.npz", params=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickled"):
        load(tmp_path / "evil.npz")


def test_pickle_file_is_refused(tmp_path):
    (tmp_path / "model.npz").write_bytes(pickle.dumps({"img/embedding/kernel": [1.0]}))
    with pytest.raises(CheckpointError, match="not a readable big_vision .npz"):
        load(tmp_path / "model.npz")


def test_npz_missing_key_and_shape_mismatch(tmp_path):
    params = {k: v.numpy() for k, v in to_bigvision(PaliGemma(TINY)).items()}
    missing = dict(params)
    del missing["llm/layers/mlp/linear"]
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(CheckpointError, match=r"missing.npz: missing keys \['llm/layers/mlp/linear'\]"):
        load(tmp_path / "missing.npz", config=TINY)
    bad = dict(params, **{"img/head/bias": np.zeros(65, np.float32)})
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(CheckpointError, match=r"img/head/bias has shape \[65\], the model expects \[64\]"):
        load(tmp_path / "bad.npz", config=TINY)
