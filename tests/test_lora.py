"""LoRA adapters (minipaligemma/lora.py): identity at init, merging, saving, strict loading,
what trains, dropout.

Every "nothing changes" check is paired with one showing that the same comparison does see a
change (a non-zero B moves the logits), so that no check passes vacuously.
"""

import math
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minipaligemma import PaliGemma, get_config
from minipaligemma.files import BadInput
from minipaligemma.lora import (DEFAULT_TARGETS, LoRALinear, add_lora, describe_trainable, load_lora, lora_layers,
                                merge_lora, save_lora, trainable_parameters)

ALL = ("llm.attn", "llm.mlp", "vision.attn", "vision.mlp")  # every linear layer of both towers' blocks


def inputs(cfg, batch: int = 2, text_len: int = 7) -> dict[str, torch.Tensor]:
    """Images and text: a 3-token prompt, then the answer; the second row padded by two."""
    size = cfg.vision.image_size
    mask_input = torch.ones(batch, text_len, dtype=torch.long)
    mask_input[1, -2:] = 0
    return {"pixel_values": torch.rand(batch, 3, size, size) * 2 - 1,
            "input_ids": torch.randint(0, cfg.text.vocab_size, (batch, text_len)),
            "mask_ar": (torch.arange(text_len) >= 3).long().expand(batch, text_len), "mask_input": mask_input}


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(**x)


def randomise(model, scale: float = 0.5) -> None:
    """Give every adapter random A and B, so that it changes what its layer computes."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_a.normal_(0, scale / math.sqrt(layer.lora_a.shape[1]))
            layer.lora_b.normal_(0, scale / math.sqrt(layer.rank))


def base_and_copy(cfg):
    """A random base model in eval mode and an independent model with the same weights."""
    base = PaliGemma(cfg).eval()
    twin = PaliGemma(cfg).eval()
    twin.load_state_dict(base.state_dict())
    return base, twin


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma1"])
def test_identity_at_init_and_a_nonzero_b_changes_the_logits(preset):
    cfg = get_config(preset)
    model = PaliGemma(cfg).eval()
    x = inputs(cfg)
    before = logits(model, x)
    add_lora(model, rank=4, alpha=8, targets=ALL)
    assert len(lora_layers(model)) == cfg.text.depth * 7 + cfg.vision.depth * 6
    assert torch.equal(logits(model, x), before)
    with torch.no_grad():  # the same comparison sees one adapter's correction
        model.llm.layers[0].attn.v_proj.lora_b.normal_(0, 0.1)
    assert (logits(model, x) - before).abs().max() > 1e-3


def test_forward_is_base_plus_scaled_low_rank_update():
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, alpha=12)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 6)
    by_hand = x @ base.weight.T + base.bias + (12 / 3) * (x @ layer.lora_a.T) @ layer.lora_b.T
    torch.testing.assert_close(layer(x), by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma1"])
def test_merge_equals_the_adapted_model(preset):
    cfg = get_config(preset)
    model = PaliGemma(cfg).eval()
    x = inputs(cfg)
    base_logits = logits(model, x)
    base_keys = set(model.state_dict())
    add_lora(model, rank=4, alpha=8, targets=ALL)
    randomise(model)
    adapted = logits(model, x)
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapters do change the function
    layer = model.llm.layers[1].mlp.down_proj
    by_hand = layer.base.weight + 2.0 * layer.lora_b @ layer.lora_a
    merge_lora(model)
    torch.testing.assert_close(model.llm.layers[1].mlp.down_proj.weight, by_hand, rtol=1e-6, atol=1e-7)
    assert not lora_layers(model) and set(model.state_dict()) == base_keys  # a plain model again
    merged = logits(model, x)
    assert (merged - adapted).abs().max() <= 1e-5 * adapted.abs().max()


def test_round_trip_through_a_file_onto_a_fresh_base(tmp_path):
    cfg = get_config("tiny")
    model, fresh = base_and_copy(cfg)
    x = inputs(cfg)
    add_lora(model, rank=4, alpha=16, targets=("llm.attn", "vision.q", "vision.down"), dropout=0.1)
    randomise(model)
    model.eval()
    path = tmp_path / "adapter.safetensors"
    save_lora(model, path)
    with safe_open(path, "pt") as f:  # the adapters alone: two tensors per adapted layer
        assert set(f.keys()) == {f"{n}.lora_{ab}" for n in lora_layers(model) for ab in "ab"}
    assert path.stat().st_size < 4 * sum(trainable_parameters(model).values()) + 10_000
    assert not torch.equal(logits(fresh, x), logits(model, x))
    load_lora(fresh, path)
    fresh.eval()
    assert torch.equal(logits(fresh, x), logits(model, x))
    layer = fresh.llm.layers[1].attn.k_proj
    assert (layer.rank, layer.alpha, layer.dropout_p) == (4, 16, 0.1)
    assert not lora_layers(fresh.llm.layers[0].mlp)  # only the saved targets


def _rewrite(src, dst, change) -> None:
    """Copy an adapter file with its tensors edited by change(dict) and the same metadata."""
    with safe_open(src, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors)
    save_file(tensors, dst, metadata=metadata)


@pytest.fixture
def adapter_file(tmp_path):
    model = add_lora(PaliGemma(get_config("tiny")), rank=4, alpha=4, targets=("llm.attn",))
    randomise(model)
    save_lora(model, tmp_path / "adapter.safetensors")
    return tmp_path / "adapter.safetensors"


def test_strict_loading_missing_and_unexpected_keys(adapter_file, tmp_path):
    key = "llm.layers.1.attn.o_proj.lora_b"
    missing, unexpected = tmp_path / "missing.safetensors", tmp_path / "unexpected.safetensors"
    _rewrite(adapter_file, missing, lambda t: t.pop(key))
    _rewrite(adapter_file, unexpected, lambda t: t.update({"llm.layers.0.mlp.up_proj.lora_a": torch.zeros(4, 64)}))
    for path, name in ((missing, key), (unexpected, "llm.layers.0.mlp.up_proj.lora_a")):
        model = PaliGemma(get_config("tiny"))
        with pytest.raises(BadInput, match=str(path)) as err:
            load_lora(model, path)
        assert name in str(err.value)
        assert not lora_layers(model)  # a failed load leaves the model as it was


def test_strict_loading_wrong_rank_names_key_and_both_shapes(adapter_file, tmp_path):
    wrong = tmp_path / "rank8.safetensors"  # the metadata says rank 4, one tensor has rank 8
    _rewrite(adapter_file, wrong, lambda t: t.update({"llm.layers.0.attn.q_proj.lora_a": torch.zeros(8, 64)}))
    with pytest.raises(BadInput) as err:
        load_lora(PaliGemma(get_config("tiny")), wrong)
    message = str(err.value)
    assert str(wrong) in message and "llm.layers.0.attn.q_proj.lora_a" in message
    assert "[8, 64]" in message and "[4, 64]" in message


def test_strict_loading_onto_the_wrong_base(adapter_file):
    cfg = get_config("tiny")
    wider = replace(cfg, text=replace(cfg.text, width=96))
    with pytest.raises(BadInput) as err:
        load_lora(PaliGemma(wider), adapter_file)
    assert str(adapter_file) in str(err.value) and "[4, 64]" in str(err.value) and "[4, 96]" in str(err.value)
    deeper = replace(cfg, text=replace(cfg.text, depth=3))  # layer 2 has no adapter in the file
    with pytest.raises(BadInput, match="llm.layers.2.attn"):
        load_lora(PaliGemma(deeper), adapter_file)
    load_lora(PaliGemma(cfg), adapter_file)  # the right base loads


def test_a_file_without_lora_metadata_is_rejected(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"llm.layers.0.attn.q_proj.lora_a": torch.zeros(4, 64)}, path)
    with pytest.raises(BadInput, match="not a LoRA adapter file"):
        load_lora(PaliGemma(get_config("tiny")), path)
    with pytest.raises(BadInput, match="not found"):
        load_lora(PaliGemma(get_config("tiny")), tmp_path / "absent.safetensors")


def test_bad_targets_and_double_wrapping_are_errors():
    model = PaliGemma(get_config("tiny"))
    for targets in (("vision.gate",), ("decoder.q",), ("llm.qkv",)):
        with pytest.raises(ValueError, match="LoRA target"):
            add_lora(model, 4, 4, targets)
    add_lora(model, 4, 4, DEFAULT_TARGETS)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, 4, 4, DEFAULT_TARGETS)


def test_only_adapters_train_and_only_they_move():
    cfg = get_config("tiny")
    model = add_lora(PaliGemma(cfg), rank=4, alpha=4, targets=("llm.attn", "llm.mlp", "vision.attn"))
    t, v = cfg.text, cfg.vision
    shapes = [(t.width, t.num_heads * t.head_dim), (t.width, t.num_kv_heads * t.head_dim),
              (t.width, t.num_kv_heads * t.head_dim), (t.num_heads * t.head_dim, t.width),
              (t.width, t.mlp_dim), (t.width, t.mlp_dim), (t.mlp_dim, t.width)]
    expected = t.depth * sum(4 * (i + o) for i, o in shapes) + v.depth * 4 * 4 * (v.width + v.width)
    trainable = trainable_parameters(model)
    assert all(name.endswith((".lora_a", ".lora_b")) for name in trainable)
    assert sum(trainable.values()) == expected
    assert f"{expected:,} of" in describe_trainable(model)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x = inputs(cfg)
    for _ in range(3):  # B moves at step 1; A only once B is non-zero
        optimizer.zero_grad()
        model(**x).logsumexp(-1).mean().backward()
        optimizer.step()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {f"{name}.lora_{ab}" for name in lora_layers(model) for ab in "ab"}


def test_dropout_only_in_training_mode():
    cfg = get_config("tiny")
    model, plain = base_and_copy(cfg)
    add_lora(model, rank=4, alpha=4, targets=ALL, dropout=0.5)
    randomise(model)
    add_lora(plain, rank=4, alpha=4, targets=ALL)
    plain.load_state_dict(model.state_dict())  # the same adapters, without dropout
    x = inputs(cfg)
    model.train()
    assert not torch.equal(logits(model, x), logits(model, x))  # a new dropout mask each call
    model.eval()
    assert torch.equal(logits(model, x), logits(plain.eval(), x))
