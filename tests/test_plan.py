"""The memory planner (minipaligemma/plan.py): its byte counts, and its peak against the peak
resident memory of real training steps on this CPU."""

import json
import os
import subprocess
import sys
from dataclasses import asdict

from functools import partial

import pytest
import torch
from torch import nn

from minipaligemma import PaliGemma, PaliGemmaConfig, TextConfig, VisionConfig, get_config
from minipaligemma.__main__ import main
from minipaligemma.lora import add_lora, trainable_parameters
from minipaligemma.plan import LiveBytes, optimizer_temporaries, plan

# Small, but not trivial: both towers, grouped-query soft-capped attention, and a vocabulary
# large enough that the logits weigh as they do at full size. A step takes about a second.
SMALL = PaliGemmaConfig(
    vision=VisionConfig(image_size=64, patch_size=8, width=128, depth=2, mlp_dim=256, num_heads=4),
    text=TextConfig(version=2, vocab_size=16384, width=128, depth=2, mlp_dim=512, num_heads=4, num_kv_heads=2,
                    head_dim=32, query_pre_attn_scalar=32))
BATCH, TEXT_LEN = 8, 64

# A fresh process measures each setting in turn: it builds the model, takes one step (the
# optimizer state, the library code), then measures what a second step adds to its resident set
# at the peak (Linux's VmHWM, reset through /proc/self/clear_refs). glibc is told to map every
# allocation over 64 KiB on its own: by default it keeps up to 64 MB of freed memory in its heap
# (its dynamic thresholds), which would swamp a step of 100 MB; so told, the resident set
# follows the tensors, and what one setting frees goes back before the next is measured.
MEASURE = r"""
import ctypes, gc, json, re, sys
from dataclasses import replace
import torch
from minipaligemma import PaliGemma, PaliGemmaConfig, TextConfig, VisionConfig
from minipaligemma.lora import add_lora, quantize_base
from minipaligemma.paligemma import checkpoint_blocks
from minipaligemma.plan import example_batch, step_loss

def resident(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024

def release():
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)

def measure(cfg, batch, text_len, lora, checkpoint, qlora):
    model = PaliGemma(cfg).train()
    if qlora:
        quantize_base(model)
    if lora:
        add_lora(model, lora, lora, ("llm.attn", "llm.mlp"))
    if checkpoint:
        checkpoint_blocks(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        step_loss(model, example_batch(cfg, batch, text_len)).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()

    step()
    optimizer.zero_grad(set_to_none=True)
    release()
    before = resident("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return resident("VmHWM") - before

spec = json.loads(sys.argv[1])
cfg = PaliGemmaConfig(vision=VisionConfig(**spec["vision"]), text=TextConfig(**spec["text"]))
cfg = replace(cfg, text=replace(cfg.text, final_softcap=None))
results = []
for lora, checkpoint, qlora in spec["settings"]:
    results.append(measure(cfg, spec["batch"], spec["text_len"], lora, checkpoint, qlora))
    release()
print(json.dumps(results))
"""
# (LoRA rank, checkpointing, QLoRA): full fine-tuning; LoRA; LoRA with checkpointing; QLoRA
SETTINGS = [(None, False, False), (8, False, False), (8, True, False), (8, False, True)]


@pytest.fixture(scope="module")
def measured() -> dict[tuple, int]:
    """Bytes each setting's second step adds at its peak, measured in one fresh process."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc to measure")
    spec = dict(asdict(SMALL), batch=BATCH, text_len=TEXT_LEN, settings=SETTINGS)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(spec)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return dict(zip(SETTINGS, json.loads(out.stdout.splitlines()[-1])))


@pytest.mark.parametrize("lora,checkpoint,qlora", SETTINGS)
def test_planned_step_matches_measured_peak_memory(measured, lora, checkpoint, qlora):
    """What the step adds above the weights and optimizer state, planned and measured, within 15 %."""
    p = plan(SMALL, BATCH, TEXT_LEN, lora=lora, qlora=qlora, checkpoint_activations=checkpoint, dtype="float32",
             device="cpu")
    planned = p.peak - p.parameters - p.optimizer_state
    measured_bytes = measured[(lora, checkpoint, qlora)]
    print(f"planned {planned / 2**20:.1f} MiB, measured {measured_bytes / 2**20:.1f} MiB")
    assert measured_bytes > 50 * 2**20  # far above the resident set's noise of a few MB
    assert abs(planned - measured_bytes) <= 0.15 * measured_bytes, (planned / 2**20, measured_bytes / 2**20)


def test_parameters_gradients_and_optimizer_state_count_the_model():
    cfg = get_config("tiny")
    model = PaliGemma(cfg)
    weights = sum(p.numel() for p in model.parameters())
    full = plan(cfg, 2, 16, dtype="float32")
    assert (full.total_params, full.trainable_params) == (weights, weights)
    assert full.parameters == full.gradients == 4 * weights and full.optimizer_state == 8 * weights
    assert plan(cfg, 2, 16, dtype="float32", optimizer="sgd").optimizer_state == 0
    assert plan(cfg, 2, 16, dtype="bfloat16").parameters == 2 * weights

    adapters = sum(trainable_parameters(add_lora(model, 4, 4, ("llm.attn", "llm.mlp"))).values())
    lora = plan(cfg, 2, 16, lora=4, dtype="bfloat16")
    assert lora.trainable_params == adapters
    assert lora.parameters == 2 * weights + 4 * adapters  # a bfloat16 base, float32 adapters
    assert lora.gradients == 4 * adapters and lora.optimizer_state == 8 * adapters

    t, v = cfg.text, cfg.vision  # QLoRA: the blocks' linear weights at 4.25 bits instead of 16
    linear = (t.depth * t.width * (2 * t.num_heads * t.head_dim + 2 * t.num_kv_heads * t.head_dim + 3 * t.mlp_dim)
              + v.depth * v.width * (4 * v.width + 2 * v.mlp_dim))
    qlora = plan(cfg, 2, 16, lora=4, qlora=True, dtype="bfloat16")
    assert qlora.parameters == lora.parameters - 2 * linear + round(linear * 4.25 / 8)
    assert (qlora.total_params, qlora.trainable_params) == (lora.total_params, lora.trainable_params)

    attention = sum(p.numel() for layer in PaliGemma(cfg).llm.layers for p in layer.attn.parameters())  # colab's
    colab = plan(cfg, 2, 16, colab=True, optimizer="sgd", dtype="float32")
    assert colab.trainable_params == attention and colab.gradients == 4 * attention and colab.optimizer_state == 0


@pytest.mark.parametrize("optimizer,device", [("adamw", "cpu"), ("adamw", "cuda"), ("sgd", "cpu")])
def testoptimizer_temporaries_are_those_of_pytorchs_update(optimizer, device):
    """The planned temporaries of the update against a real step of PyTorch's optimizer, traced:
    one tensor at a time on a CPU, every tensor at once in the multi-tensor path of a GPU."""
    params = [nn.Parameter(torch.randn(rows, 64)) for rows in (300, 100, 500, 200)]
    for p in params:
        p.grad = torch.randn_like(p)
    foreach = device == "cuda"
    make = partial(torch.optim.AdamW, weight_decay=0.0) if optimizer == "adamw" else torch.optim.SGD
    update = make(params, lr=1e-3, foreach=foreach)
    update.step()  # creates the optimizer state, which the plan counts apart
    state = [t for s in update.state.values() for t in s.values()]
    live = LiveBytes(known=params + [p.grad for p in params] + state)
    with live:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=foreach)
        update.step()
    traced, _ = live.peaks(excluded=set())
    assert abs(traced - optimizer_temporaries(params, optimizer, device)) < 1024  # norms: a few scalars


def test_checkpointing_lowers_the_activations_and_the_table_shows_every_part():
    plain = plan(SMALL, BATCH, TEXT_LEN, lora=8)
    checkpointed = plan(SMALL, BATCH, TEXT_LEN, lora=8, checkpoint_activations=True)
    assert checkpointed.activations < 0.9 * plain.activations
    assert checkpointed.parameters == plain.parameters
    table = plain.table()
    for row in ("parameters", "gradients", "optimizer state", "activations", "peak"):
        assert row in table


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        plan("paligemma2-3b-225", 8, 128)
    with pytest.raises(ValueError, match="QLoRA"):
        plan("tiny", 8, 128, qlora=True)
    with pytest.raises(ValueError, match="optimizer"):
        plan("tiny", 8, 128, optimizer="adam")
    with pytest.raises(ValueError, match="choose one"):
        plan("tiny", 8, 128, lora=4, colab=True)


def test_plan_command(capsys):
    assert main(["plan", "--preset", "tiny", "--batch", "2", "--text-len", "16", "--lora", "4",
                 "--lora-targets", "llm.q,vision.attn", "--checkpoint-activations"]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 4 on llm.q,vision.attn" in out and "activation checkpointing" in out and "activations" in out
    assert main(["plan", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
