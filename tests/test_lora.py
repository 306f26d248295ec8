"""Fine-tuning in little memory: LoRA adapters (minipaligemma/lora.py: identity at init, merging,
saving, strict loading, what trains, dropout), the loss read out at the supervised positions
only, activation checkpointing, QLoRA on a 4-bit base, and the trainer's transfer options.

Every "nothing changes" check is paired with one showing that the same comparison does see a
change (a non-zero B moves the logits), so that no check passes vacuously.
"""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from PIL import Image
from torch import nn

from minipaligemma import PaliGemma, get_config, prefix_lm_loss
from minipaligemma.__main__ import main
from minipaligemma.checkpoint import load, to_hf_state_dict, write_hf_folder
from minipaligemma.data import Example
from minipaligemma.files import BadInput
from minipaligemma.generate import generate
from minipaligemma.lora import (DEFAULT_TARGETS, LoRALinear, add_lora, dequantize_base, describe_trainable, load_lora,
                                lora_layers, merge_lora, quantize_base, save_lora, trainable_parameters)
from minipaligemma.paligemma import checkpoint_blocks, supervised_loss
from minipaligemma.quantize import QuantizedLinear
from minipaligemma.tokenizer import train_tokenizer
from minipaligemma.train import RECIPES, Transfer, paligemma_batch, run

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
    unchanged = []  # every adapted layer computes exactly what its base computes
    hooks = [layer.register_forward_hook(lambda layer, args, out: unchanged.append(torch.equal(out, layer.base(*args))))
             for layer in lora_layers(model).values()]
    after = logits(model, x)
    for hook in hooks:
        hook.remove()
    assert len(unchanged) == len(hooks) and all(unchanged)
    # The logits agree to float32 rounding, not always bit for bit: with AVX2-only kernels
    # (ATEN_CPU_CAPABILITY=avx2) one logit in the model moved by one unit in the last place,
    # though every layer's output above was bit-identical.
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
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


# ---------------------------------------------------------------------------------------------
# The loss read out at the supervised positions only.

def loss_batch(cfg, batch: int = 3, text_len: int = 9):
    """`inputs` and its mask_loss: the answer (from position 3) is supervised, the second row's
    padding is not, and the third row has no supervised token at all."""
    x = inputs(cfg, batch, text_len)
    mask_loss = x["mask_ar"] * x["mask_input"]
    mask_loss[2] = 0
    return x, mask_loss


def close(ours: torch.Tensor, reference: torch.Tensor, tol: float) -> bool:
    """Equal up to `tol` of the reference's largest magnitude, plus 1e-9: the image encoder's key
    biases get gradients that are zero up to rounding (softmax ignores a shift of every key)."""
    return bool((ours - reference).abs().max() <= tol * reference.abs().max() + 1e-9)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gemma1"])  # with and without the final soft-cap
def test_loss_at_supervised_positions_equals_the_full_logits_loss(preset):
    cfg = get_config(preset)
    model = PaliGemma(cfg)
    x, mask_loss = loss_batch(cfg)
    supervised = int(mask_loss[:, 1:].sum())
    full_readout, rows_read = model.llm.logits, []

    def counting_readout(hidden):
        rows_read.append(hidden.shape[0])
        return full_readout(hidden)

    with torch.no_grad():
        states = model.text_states(**x)  # [B, T, D]
        model.llm.logits = counting_readout
        for reduction, smoothing in (("example", 0.0), ("token", 0.1), ("none", 0.0)):
            reference = prefix_lm_loss(full_readout(states), x["input_ids"], mask_loss, reduction, smoothing)
            rows_read.clear()
            ours = supervised_loss(model.llm, states, x["input_ids"], mask_loss, reduction, smoothing, chunk=4)
            assert close(ours, reference, 1e-6), (ours, reference)
            assert sum(rows_read) == supervised and max(rows_read) <= 4  # the supervised rows, 4 at a time
        del model.llm.logits

    def gradients(loss_fn) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    reference = gradients(lambda: prefix_lm_loss(model(**x), x["input_ids"], mask_loss))
    ours = gradients(lambda: model(**x, mask_loss=mask_loss).mean())  # the trainer's call
    assert ours.keys() == reference.keys() == dict(model.named_parameters()).keys()
    assert all(close(ours[name], reference[name], 1e-6) for name in reference)


# ---------------------------------------------------------------------------------------------
# Activation checkpointing.

def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Every weight trains and the adapters drop out, so the recomputation must replay the
    random state; a forward hook sees each block run twice (forward, then recomputed)."""
    cfg = get_config("tiny")
    plain, checkpointed = base_and_copy(cfg)
    for model in (plain, checkpointed):
        add_lora(model, rank=4, alpha=4, targets=ALL, dropout=0.3).requires_grad_(True).train()
    randomise(plain)
    checkpointed.load_state_dict(plain.state_dict())
    checkpoint_blocks(checkpointed)
    x, mask_loss = loss_batch(cfg)
    calls = {"plain": 0, "checkpointed": 0}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        model.llm.layers[1].mlp.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        loss = model(**x, mask_loss=mask_loss).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert close(loss_ckpt, loss, 1e-6)
    assert all(close(grads_ckpt[n], grads[n], 1e-6) for n in grads)
    assert calls == {"plain": 1, "checkpointed": 2}
    torch.manual_seed(2)  # the same comparison sees other dropout masks
    assert not close(checkpointed(**x, mask_loss=mask_loss).mean().detach(), loss, 1e-4)


# ---------------------------------------------------------------------------------------------
# QLoRA: LoRA on a 4-bit base.

def copy_adapters(source, target) -> None:
    with torch.no_grad():
        for name, layer in lora_layers(source).items():
            target.get_submodule(name).lora_a.copy_(layer.lora_a)
            target.get_submodule(name).lora_b.copy_(layer.lora_b)


@pytest.mark.parametrize("scheme,group_size", [("nf4", 64), ("int4", 48)])  # 48: rows padded to whole groups
def test_qlora_equals_lora_on_the_dequantized_base(scheme, group_size):
    cfg = get_config("tiny")
    qlora, dequantized = base_and_copy(cfg)
    original = PaliGemma(cfg)
    original.load_state_dict(qlora.state_dict())
    quantize_base(qlora, scheme, group_size)
    quantized = {name: m for name, m in qlora.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == cfg.text.depth * 7 + cfg.vision.depth * 6  # the blocks' layers, not the projector
    with torch.no_grad():
        for name, layer in quantized.items():
            dequantized.get_submodule(name).weight.copy_(layer.dequantize())
    for model in (qlora, dequantized, original):
        add_lora(model, rank=4, alpha=8, targets=ALL).train()
    randomise(qlora)
    copy_adapters(qlora, dequantized)
    copy_adapters(qlora, original)
    x, mask_loss = loss_batch(cfg)

    def step(model):
        loss = model(**x, mask_loss=mask_loss).mean()
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    (loss, grads), (reference_loss, reference_grads) = step(qlora), step(dequantized)
    assert grads.keys() == reference_grads.keys() == trainable_parameters(qlora).keys()
    assert close(loss, reference_loss, 1e-5)
    assert all(close(grads[n], reference_grads[n], 1e-5) for n in grads)
    assert not close(step(original)[0], reference_loss, 1e-4)  # the 4 bits do change the function

    quantized = [name for name, m in qlora.named_modules() if isinstance(m, QuantizedLinear)]  # adapters' bases
    before = {k: v.clone() for k, v in qlora.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in qlora.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    optimizer.step()
    after = qlora.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {f"{name}.lora_{ab}" for name in lora_layers(qlora) for ab in "ab"}
    assert all(torch.equal(before[f"{n}.{b}"], after[f"{n}.{b}"]) for n in quantized for b in ("codes", "scale"))


def test_qlora_keeps_no_dequantized_weight_for_the_backward_pass():
    """Plain autograd keeps the dequantized W [out, in] of a quantized layer until the backward
    pass; the adapter's frozen path keeps none of it, and gives the same gradient."""
    base = QuantizedLinear.from_linear(nn.Linear(96, 160), "nf4", 32)
    layer = LoRALinear(base, rank=2, alpha=2)
    x = torch.randn(3, 96, requires_grad=True)

    def saved_shapes_and_grad(forward):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            forward().square().sum().backward()
        grad, x.grad = x.grad, None
        return shapes, grad

    plain_shapes, plain_grad = saved_shapes_and_grad(lambda: base(x))
    shapes, grad = saved_shapes_and_grad(lambda: layer(x))  # B = 0: the same function
    assert (96, 160) in plain_shapes  # W^T
    assert (160, 96) not in shapes and (96, 160) not in shapes
    torch.testing.assert_close(grad, plain_grad, rtol=1e-6, atol=1e-6)


def test_qlora_adapters_load_onto_a_quantized_base_and_merge_into_float_layers(tmp_path):
    cfg = get_config("tiny")
    model, fresh = base_and_copy(cfg)
    quantize_base(model)
    quantize_base(fresh)  # quantization is deterministic: the same codes
    add_lora(model, rank=4, alpha=8, targets=("llm.attn", "llm.mlp", "vision.attn"))  # not the image encoder's MLP
    randomise(model)
    x = inputs(cfg)
    adapted = logits(model.eval(), x)
    save_lora(model, tmp_path / "adapter.safetensors")
    load_lora(fresh, tmp_path / "adapter.safetensors")
    assert torch.equal(logits(fresh.eval(), x), adapted)
    merge_lora(model)
    assert not lora_layers(model) and isinstance(model.vision.blocks[0].mlp.fc1, QuantizedLinear)
    dequantize_base(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert model.vision.blocks[0].attn.q_proj.bias is not None and model.vision.blocks[0].mlp.fc1.bias is not None
    assert close(logits(model, x), adapted, 1e-5)


# ---------------------------------------------------------------------------------------------
# The trainer's transfer options.

def test_qlora_transfer_keeps_a_bfloat16_4bit_base_and_optimizes_the_adapters_only(tmp_path):
    """train --stages 3 --init ... --data ... --lora 4 --qlora --base-dtype bfloat16
    --checkpoint-activations, two steps: what the checkpoint holds, and the exported model."""
    colours = ["red", "green", "blue", "yellow"]
    tokenizer = train_tokenizer([f"answer en what colour is it? {c}" for c in colours] * 50, 300,
                                tmp_path / "tokenizer.model")
    cfg = get_config("tiny")
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=tokenizer.vocab_size))
    write_hf_folder(to_hf_state_dict(PaliGemma(cfg)), cfg, tmp_path / "init")
    tokenizer.save(tmp_path / "init" / "tokenizer.model")
    rows = []
    for i, colour in enumerate(colours):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "prefix": "answer en what colour is it?", "suffix": colour}))
    (tmp_path / "train.jsonl").write_text("\n".join(rows))
    recipe = replace(RECIPES["tiny"], batch_size=4, stage3_steps=2)
    transfer = Transfer("qlora", lora_rank=4, base_dtype="bfloat16", checkpoint_activations=True)
    run(recipe, tmp_path / "out", stages=(3,), init=tmp_path / "init", data=tmp_path / "train.jsonl",
        transfer=transfer)

    saved = load_file(tmp_path / "out" / "stage3" / "checkpoint.safetensors")
    adapters = {f"{name}.lora_{ab}" for name in target_names(cfg) for ab in "ab"}
    optimized = {key.removeprefix("optimizer/").rsplit("/", 1)[0] for key in saved if key.startswith("optimizer/")}
    assert optimized == adapters
    assert all(saved[f"model/{name}"].dtype == torch.float32 for name in adapters)
    assert saved["model/llm.layers.0.mlp.up_proj.base.codes"].dtype == torch.uint8
    assert saved["model/vision.blocks.0.attn.q_proj.codes"].dtype == torch.uint8  # quantized, no adapter
    for key in ("llm.layers.0.mlp.up_proj.base.scale", "llm.embed.weight", "llm.final_norm.weight", "projector.weight"):
        assert saved[f"model/{key}"].dtype == torch.bfloat16, key
    exported = load(tmp_path / "out" / "stage3" / "model")
    assert exported.llm.layers[0].mlp.up_proj.weight.dtype == torch.float32  # merged in float32

    with pytest.raises(ValueError, match="base_dtype"):
        Transfer("full", base_dtype="bfloat16")
    assert main(["train", "--out", str(tmp_path / "cli"), "--stages", "3", "--qlora"]) == 2  # needs --lora


def target_names(cfg) -> list[str]:
    """The decoder's linear layers, every block: what DEFAULT_TARGETS adapt."""
    roles = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    return [f"llm.layers.{i}.{role}" for i in range(cfg.text.depth) for role in roles]


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
QUESTION = "answer en what colour is it?"


def noisy_colour(rgb, seed: int) -> Image.Image:
    """A 40 x 30 image of one colour, each pixel shifted by up to 25 levels (its own noise per seed)."""
    noise = np.random.default_rng(seed).integers(-25, 26, (30, 40, 3))
    return Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8))


def test_lora_transfer_on_jsonl_lowers_the_held_out_loss_and_answers_the_colours(tmp_path):
    """train --stages 3 --init ... --data train.jsonl --lora 4, 40 steps from random weights:
    16 rows (4 noisy images per colour); 4 held-out images with noise of their own. Measured
    (default and AVX2 kernels alike to 2 decimals): each held-out loss falls from about 7.3
    (uniform over the 1,452 tokens) to about 6.1, the most that frozen random output embeddings
    allow; greedy answers go from <loc> tokens to the four colours. The test asks for half that
    fall on every example and three colours of four."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer([f"{QUESTION} {c}" for c in COLOURS] * 50, 300, tmp_path / "tokenizer.model")
    cfg = get_config("tiny")
    cfg = replace(cfg, text=replace(cfg.text, vocab_size=tokenizer.vocab_size))
    write_hf_folder(to_hf_state_dict(PaliGemma(cfg)), cfg, tmp_path / "init")
    tokenizer.save(tmp_path / "init" / "tokenizer.model")
    rows, held_out = [], []
    for i, (colour, rgb) in enumerate(COLOURS.items()):
        for k in range(4):
            noisy_colour(rgb, 10 * i + k).save(tmp_path / f"{colour}{k}.png")
            rows.append(json.dumps({"image": f"{colour}{k}.png", "prefix": QUESTION, "suffix": colour}))
        held_out.append(Example(noisy_colour(rgb, 1000 + i), QUESTION, colour, "answer"))
    (tmp_path / "train.jsonl").write_text("\n".join(rows))
    batch = paligemma_batch(held_out, tokenizer, cfg.vision.image_size, "cpu")

    def losses_and_answers(model):
        with torch.no_grad():
            losses = model.eval()(batch["pixel_values"], batch["input_ids"], batch["mask_ar"], batch["mask_input"],
                                  mask_loss=batch["mask_loss"])  # [4], each example's suffix loss
        return losses, generate(model, tokenizer, [e.image for e in held_out], [QUESTION] * 4, max_new_tokens=6)

    before, answers_before = losses_and_answers(load(tmp_path / "init", dtype=torch.float32))
    recipe = replace(RECIPES["tiny"], batch_size=8, stage3_steps=40, lora_lr=3e-2)
    run(recipe, tmp_path / "out", stages=(3,), init=tmp_path / "init", data=tmp_path / "train.jsonl",
        transfer=Transfer("lora", lora_rank=4))
    after, answers = losses_and_answers(load(tmp_path / "out" / "stage3" / "model", dtype=torch.float32))
    assert (before - after).min() > 0.5, (before, after)
    assert not any(a == c for a, c in zip(answers_before, COLOURS)), answers_before
    assert sum(a == c for a, c in zip(answers, COLOURS)) >= 3, answers
