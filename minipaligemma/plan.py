"""Memory of one training step, planned before it runs: will it fit on this card?

    python -m minipaligemma plan --preset paligemma2-3b-224 --batch 8 --text-len 128 --lora 16

A training step holds four kinds of memory:

    parameters       every weight, frozen or not
    gradients        one per trainable weight, in its dtype
    optimizer state  AdamW's two moments per trainable weight; SGD (without momentum) none
    activations      what the forward pass keeps for the backward pass (inputs of matrix
                     products, softmax outputs, ...), plus the temporaries of both passes

The first three follow from parameter counts. The activations depend on every line of the
forward pass and on which weights train: autograd keeps only what some gradient needs, so a
frozen linear layer keeps nothing unless its input needs a gradient. Rather than re-deriving all
of that in formulas that would drift from the code, the planner runs the real step (forward,
loss, backward) on fake tensors, which have shapes, dtypes and a device but no memory and no
data (PyTorch's FakeTensorMode), and a dispatch mode sees every tensor the step creates and the
moment it is freed. The peak of those live bytes is what PyTorch itself allocates, for the 28B at
896 px in seconds and no memory. (Kernels' private scratch space, the allocator's rounding and,
on a GPU, the CUDA context of about 0.5 GB are not counted.)

What is planned is the stage 3 transfer step of train.py: the final logit soft-cap off; a batch of
images with `text_len` text tokens (a quarter prompt, the rest answer, no padding); the loss on
the answer, read out at the supervised positions only (paligemma.supervised_loss); global-norm
clipping; then AdamW (no weight decay) or SGD. `dtype` is the dtype the model is stored and run
in; LoRA's adapters, their gradients and their AdamW moments are float32 (lora.py). The
optimizer step's temporaries follow PyTorch's choice per device: on a GPU the multi-tensor
(foreach) update computes sqrt(second moment) for every trainable tensor at once; on a CPU one
tensor at a time.

The batch is made of real tensors, not fake ones: the loss must know where the supervised tokens
are, which is data. Operations on real tensors alone (the masks, the positions, the images'
conversion) run for real (`RealWhereReal`); they are small beside the step.

Three options change the step:
- `checkpoint_activations` runs each block of both towers under torch.utils.checkpoint
  (paligemma.checkpoint_blocks): a block keeps only its input and recomputes the rest in the
  backward pass, about a third more compute for much less memory.
- `qlora`: the linear layers of both towers' blocks are quantized to NF4 in groups of 64
  (lora.quantize_base; 4 bits and a `dtype` scale per 64 weights), the adapters on top.
- `colab`: the colab recipe's trainable set, the decoder's attention weights (with SGD).
All are traced like the rest.

tests/test_plan.py holds the plan to the peak resident memory of real steps on a CPU.
"""

import weakref
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .config import PRESETS, PaliGemmaConfig, get_config
from .files import BadInput
from .lora import DEFAULT_TARGETS, add_lora, quantize_base
from .paligemma import PaliGemma, checkpoint_blocks
from .quantize import QuantizedLinear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OPTIMIZERS = ("adamw", "sgd")


def example_batch(cfg: PaliGemmaConfig, batch: int, text_len: int) -> dict[str, torch.Tensor]:
    """Random model inputs [B, ...] of the planned shape: images, and text_len tokens of which
    the first quarter is the prompt (mask_ar 0) and the rest the answer (mask_ar 1, supervised).
    Real tensors, built outside the fake mode."""
    size, prompt = cfg.vision.image_size, text_len // 4
    answer = torch.arange(text_len).expand(batch, text_len) >= prompt  # [B, T]
    return {"pixel_values": torch.randn(batch, 3, size, size),
            "input_ids": torch.randint(0, cfg.text.vocab_size, (batch, text_len)),
            "mask_ar": answer.long(), "mask_input": torch.ones(batch, text_len, dtype=torch.long),
            "mask_loss": answer.long()}


def step_loss(model: PaliGemma, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The trainer's loss of one batch (train.paligemma_step_loss without autocast and without
    its token count)."""
    return model(batch["pixel_values"], batch["input_ids"], batch["mask_ar"], batch["mask_input"],
                 mask_loss=batch["mask_loss"]).mean()


class RealWhereReal(TorchDispatchMode):
    """Above a FakeTensorMode: an op whose tensor inputs are all real (the batch's token ids and
    masks) runs for real; every other op, factories included, goes on to the fake mode."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class LiveBytes(TorchDispatchMode):
    """Logs every tensor storage an op creates (+bytes) and the moment it is freed (-bytes).

    Storages that exist when the mode starts (`known`, e.g. the parameters) are not counted,
    nor are views of a storage already counted. `log` holds (storage id, bytes) events in
    order, a negative size for a free; ids are never reused.
    """

    def __init__(self, known=()):
        super().__init__()
        self.known = {t.untyped_storage()._cdata for t in known}
        self.alive: dict[int, tuple[int, weakref.ref]] = {}  # address of a live storage -> its id, a weak ref
        self.log: list[tuple[int, int]] = []

    def storage_id(self, t: torch.Tensor) -> int:
        """The id under which the live tensor t's storage is logged."""
        return self.alive[t.untyped_storage()._cdata][0]

    def _freed(self, address: int, nbytes: int, _ref) -> None:
        self.log.append((self.alive.pop(address)[0], -nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                address = storage._cdata
                if address not in self.known and address not in self.alive:
                    # The weak ref's callback fires when the storage dies, not when this Python
                    # handle goes: PyTorch keeps one Python object per storage while it lives.
                    ref = weakref.ref(storage, partial(self._freed, address, storage.nbytes()))
                    self.alive[address] = (len(self.log), ref)
                    self.log.append((len(self.log), storage.nbytes()))
        return out

    def peaks(self, excluded: set[int]) -> tuple[int, int]:
        """The peak of all logged live bytes, and the peak of those not in `excluded` (ids)."""
        live = live_rest = peak = peak_rest = 0
        for storage, nbytes in self.log:
            live += nbytes
            live_rest += 0 if storage in excluded else nbytes
            peak, peak_rest = max(peak, live), max(peak_rest, live_rest)
        return peak, peak_rest


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of one training step, by kind; `peak` is the step's high-water mark, which is less
    than the sum where gradients build up while activations are freed."""

    setting: str
    total_params: int  # parameter counts, not bytes
    trainable_params: int
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    peak: int

    def table(self) -> str:
        """The plan as a printable table, in GiB (MiB for a plan under 1 GiB)."""
        unit, size = ("GiB", 2**30) if self.peak >= 2**30 else ("MiB", 2**20)
        rows = [("parameters", self.parameters, f"{self.total_params:,} weights"),
                ("gradients", self.gradients, f"{self.trainable_params:,} trainable "
                                              f"({100 * self.trainable_params / self.total_params:.2f} %)"),
                ("optimizer state", self.optimizer_state, ""),
                ("activations", self.activations, "kept for backward + temporaries, at their peak"),
                ("sum", self.parameters + self.gradients + self.optimizer_state + self.activations, ""),
                ("peak", self.peak, "the step's high-water mark")]
        lines = [self.setting, f"{'':<16} {unit:>8}"]
        lines += [f"{name:<16} {nbytes / size:>8.2f}  {note}".rstrip() for name, nbytes, note in rows]
        return "\n".join(lines)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _fake_model(cfg: PaliGemmaConfig, dtype: torch.dtype, lora: int | None, qlora: bool, colab: bool, targets,
                fake: FakeTensorMode) -> PaliGemma:
    """The model with fake parameters and buffers on the CPU: built on the meta device (shapes
    only), then every tensor replaced by a fake one of the same shape, dtype and requires_grad."""
    with torch.device("meta"):
        model = PaliGemma(cfg).to(dtype)
        if qlora:
            quantize_base(model)
        if lora is not None:
            add_lora(model, lora, lora, targets)  # alpha changes no byte
        if colab:  # as train.Transfer("colab"): the decoder's attention weights alone train
            model.requires_grad_(False)
            for layer in model.llm.layers:
                layer.attn.requires_grad_(True)
    with fake:
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad))
            for name, b in list(module.named_buffers(recurse=False)):
                setattr(module, name, torch.empty(b.shape, dtype=b.dtype))
    return model


def optimizer_temporaries(trainable: list[torch.Tensor], optimizer: str, device: str) -> int:
    """Bytes AdamW's update allocates at its peak (SGD updates in place: none). The multi-tensor
    path (GPU) takes sqrt of every second moment at once; the CPU's loop takes sqrt(v) / c for
    one tensor (two temporaries) while the previous tensor's result is still held."""
    if optimizer == "sgd" or not trainable:
        return 0
    sizes = [_nbytes([t]) for t in trainable]
    if device == "cuda":
        return sum(sizes)
    return max(2 * size + previous for size, previous in zip(sizes, [0] + sizes[:-1]))


def plan(config: str | PaliGemmaConfig, batch: int, text_len: int, lora: int | None = None, qlora: bool = False,
         checkpoint_activations: bool = False, optimizer: str = "adamw", dtype: str = "bfloat16",
         lora_targets=DEFAULT_TARGETS, device: str = "cuda", colab: bool = False) -> MemoryPlan:
    """Plan the memory of one training step of `config` (a preset name or a config): full
    fine-tuning, LoRA of rank `lora` on `lora_targets` on a `dtype` or (qlora) 4-bit base, or
    (colab) the decoder's attention weights alone. `device` ("cuda" or "cpu") picks the
    optimizer's update path, as PyTorch does."""
    if optimizer not in OPTIMIZERS or dtype not in DTYPES or device not in ("cuda", "cpu"):
        raise BadInput(f"optimizer must be one of {OPTIMIZERS}, dtype one of {list(DTYPES)}, device cuda or cpu; "
                         f"got {optimizer!r}, {dtype!r}, {device!r}")
    if qlora and lora is None:
        raise BadInput("QLoRA trains LoRA adapters on the quantized base: give a LoRA rank")
    if colab and lora is not None:
        raise BadInput("the colab recipe trains attention weights, LoRA adapters: choose one")
    if isinstance(config, str) and config not in PRESETS:
        raise BadInput(f"unknown preset {config!r}; known presets: {', '.join(PRESETS)}")
    cfg = get_config(config) if isinstance(config, str) else config
    cfg = replace(cfg, text=replace(cfg.text, final_softcap=None))  # as stage 3 transfers
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    model = _fake_model(cfg, DTYPES[dtype], lora, qlora, colab, lora_targets, fake)
    if checkpoint_activations:
        checkpoint_blocks(model)
    params, buffers = list(model.parameters()), list(model.buffers())  # buffers: QLoRA's codes and scales
    trainable = [p for p in params if p.requires_grad]
    batch_inputs = example_batch(cfg, batch, text_len)
    live = LiveBytes(known=params + buffers)
    with fake, RealWhereReal(), live:
        step_loss(model, batch_inputs).backward()
        gradients = {live.storage_id(p.grad) for p in trainable}

    parameters, grads = _nbytes(params + buffers), _nbytes(trainable)
    states = 2 * grads if optimizer == "adamw" else 0
    backward_peak, activations = live.peaks(excluded=gradients)  # with and without the gradients
    update_peak = grads + optimizer_temporaries(trainable, optimizer, device)
    peak = parameters + states + max(backward_peak, update_peak)

    name = config if isinstance(config, str) else "config"
    method = ("the colab recipe (decoder attention)" if colab else "full fine-tuning" if lora is None
              else f"{'QLoRA' if qlora else 'LoRA'} rank {lora} on {','.join(lora_targets)}")
    setting = (f"{name}, batch {batch}, text length {text_len}: {method}, {optimizer}, {dtype}"
               f"{', activation checkpointing' if checkpoint_activations else ''}, {device} optimizer path")
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return MemoryPlan(setting, sum(p.numel() for p in params) + quantized, sum(p.numel() for p in trainable),
                      parameters, grads, states, activations, peak)
