"""LoRA: fine-tune a frozen PaliGemma through small low-rank adapters.

Fine-tuning every weight keeps, beside the weights, their gradients and AdamW's two moments:
four copies of the model. LoRA (Hu et al., 2021) freezes the model and learns, beside each
chosen linear layer y = W x, a low-rank correction:

    y = W x + (alpha / r) * B (A x)        A [r, in], B [out, r], r much smaller than in, out

Only A and B train. At rank 16 on every linear layer of PaliGemma 2 3B's decoder they hold
about 0.7 % of its parameters, so their gradients and optimizer state cost almost nothing.

- B starts at zero and A at random (nn.Linear's own init, uniform in +-1/sqrt(in)). The
  correction is then exactly zero, so the wrapped model computes the same function as before,
  while B's first gradient (which goes through A x) is not zero. With both at zero neither
  would ever get a gradient.
- alpha / r scales the correction: at a fixed alpha, a larger rank does not make the first
  updates larger, so a learning rate found at one rank carries over to another.
- Dropout, if any, applies to the adapter's input only, and only in training mode; the frozen
  path always sees the clean input.
- A and B are float32 whatever the base's dtype: they are small, and AdamW's tiny updates would
  round away in bfloat16. The correction is computed in the input's dtype, like the base layer.
- `merge_lora` folds W + (alpha / r) B A into each weight and puts the plain nn.Linear back: the
  result is an ordinary PaliGemma, as fast as the base, saved and exported as usual.
- `save_lora` writes the adapters alone, a few MB, as safetensors with their configuration in
  the metadata; `load_lora` puts them on a fresh base, strictly: a missing, unexpected or
  mis-shaped adapter (another base model, another rank) is an error naming the key and shapes.

Targets name the layers to adapt as "TOWER.ROLE": TOWER is `llm` (the Gemma decoder) or `vision`
(the SigLIP image encoder), ROLE one of q, k, v, o (attention) or gate, up, down (MLP), or
`attn` / `mlp` for a group. The image encoder's MLP has no gate: its fc1 is `up` and fc2 `down`.
Every block of the tower gets the adapter.

QLoRA (Dettmers et al., 2023, arXiv 2305.14314) is LoRA on a base whose weights are stored in 4
bits: `quantize_base` turns the linear layers of both towers' blocks into quantize.py's
QuantizedLinear (NF4 in groups of 64 by default: 4.25 bits a weight with bfloat16 scales), and
`add_lora` wraps those as it wraps nn.Linear. The frozen path multiplies by the dequantized
weight; the adapters' gradients flow through it to the layers below, and the 4-bit codes, being
buffers, never get one. The backward pass dequantizes each weight again rather than keeping the
forward's float copy (`DequantizedMatmul`), so a step holds no float copy of the base. Merging
folds B A into the dequantized weight, and `dequantize_base` turns the layers without an adapter
back into float ones: the result is the float model that was trained.
"""

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .files import BadInput, atomic_write
from .checkpoint import read_safetensors_file
from .layouts import raise_problems, tensor_problems
from .quantize import QuantizedLinear, quantize_model

# Where each role's linear layer sits inside one block of each tower (see gemma.py, siglip.py).
BLOCKS = {"llm": "llm.layers", "vision": "vision.blocks"}
ROLES = {
    "llm": {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    "vision": {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.out_proj",
               "up": "mlp.fc1", "down": "mlp.fc2"},
}
GROUPS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
DEFAULT_TARGETS = ("llm.attn", "llm.mlp")  # every linear layer of the decoder


class DequantizedMatmul(torch.autograd.Function):
    """y = layer(x) for a frozen QuantizedLinear, differentiable with respect to x only.

    Under plain autograd, F.linear(x, W) keeps the dequantized W [out, in] until the backward
    pass, which needs it for dL/dx = dL/dy W: for a whole model, a float copy of the base, which
    is what the 4 bits were meant to save. This keeps nothing and dequantizes W again there.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer(x)  # [..., out]; autograd is off in here, so nothing is kept

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantize().to(grad.dtype), None  # dL/dx [..., in]; the layer gets none


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear, or QuantizedLinear for QLoRA) plus its trainable
    low-rank correction (alpha / rank) * B A."""

    def __init__(self, base: nn.Linear | QuantizedLinear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.dropout_p, self.scale = rank, alpha, dropout, alpha / rank
        device = (base.scale if isinstance(base, QuantizedLinear) else base.weight).device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device))  # [r, in]
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))  # [out, r]
        bound = 1 / math.sqrt(base.in_features)
        nn.init.uniform_(self.lora_a, -bound, bound)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # Identity: no copy of x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> W x + b + scale * B (A dropout(x)), [..., out]."""
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        correction = F.linear(F.linear(self.dropout(x), a), b)  # [..., out], through [..., r]
        frozen = DequantizedMatmul.apply(x, self.base) if isinstance(self.base, QuantizedLinear) else self.base(x)
        return frozen + self.scale * correction

    def merged(self) -> nn.Linear:
        """The plain nn.Linear computing W + scale * B A (summed in float32): the base itself,
        updated in place, or for a quantized base a float layer holding the dequantized W."""
        layer = dequantized_linear(self.base) if isinstance(self.base, QuantizedLinear) else self.base
        delta = self.scale * (self.lora_b.float() @ self.lora_a.float())  # [out, in]
        with torch.no_grad():
            layer.weight.copy_(layer.weight.float() + delta)
        return layer.requires_grad_(False)


def dequantized_linear(layer: QuantizedLinear) -> nn.Linear:
    """A frozen float nn.Linear holding the quantized layer's dequantized weight (in its scales'
    dtype) and its bias: the same function, as an ordinary layer."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=layer.scale.device, dtype=layer.scale.dtype)
    with torch.no_grad():
        linear.weight.copy_(layer.dequantize())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear.requires_grad_(False)


def parse_target(target: str) -> tuple[str, list[str]]:
    """A target "TOWER.ROLE" or "TOWER.GROUP" -> its tower and the roles it names there."""
    tower, _, role = target.partition(".")
    if tower not in ROLES:
        raise BadInput(f"LoRA target {target!r}: the tower must be one of {list(ROLES)}")
    if role in GROUPS:
        return tower, [r for r in GROUPS[role] if r in ROLES[tower]]  # the image encoder has no gate
    if role in ROLES[tower]:
        return tower, [role]
    raise BadInput(f"LoRA target {target!r}: {tower} has the roles {list(ROLES[tower])} "
                     f"and the groups {list(GROUPS)}")


def target_layers(model: nn.Module, targets) -> list[str]:
    """The names of the linear layers that `targets` (strings "TOWER.ROLE", see the module
    docstring) pick in `model`, every block of the tower, e.g. "llm.layers.0.attn.q_proj"."""
    names = []
    for target in targets:
        tower, roles = parse_target(target)
        for i in range(len(model.get_submodule(BLOCKS[tower]))):
            names += [f"{BLOCKS[tower]}.{i}.{ROLES[tower][role]}" for role in roles]
    return list(dict.fromkeys(names))  # each layer once, in order


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapted layer of `model`, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, rank: int, alpha: float, targets, dropout: float = 0.0) -> nn.Module:
    """Freeze `model` and wrap the target linear layers (e.g. DEFAULT_TARGETS) with adapters;
    return the model.

    Afterwards only the adapters' A and B require gradients, and the model computes exactly
    what it computed before (B is zero) until they train.
    """
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1; got {rank}, {alpha}, {dropout}")
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters: merge_lora() them first")
    names = target_layers(model, targets)
    model.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        base = model.get_submodule(name)
        if not isinstance(base, (nn.Linear, QuantizedLinear)):
            raise ValueError(f"LoRA target layer {name} is a {type(base).__name__}, not an nn.Linear or QuantizedLinear")
        setattr(model.get_submodule(parent), child, LoRALinear(base, rank, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put a plain nn.Linear back; return the model.

    The merged model computes what the adapted one did, as an ordinary model (its parameters
    stay frozen: `model.requires_grad_(True)` to train them all). A quantized base's layers
    become float layers holding the dequantized weight plus the adapter's correction.
    """
    for name, layer in lora_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.merged())
    return model


def quantize_base(model: nn.Module, scheme: str = "nf4", group_size: int = 64) -> nn.Module:
    """QLoRA's base: replace the linear layers of both towers' blocks by QuantizedLinear layers
    (quantize.py, scheme "nf4" or "int4"; scales in the model's dtype), in place, before
    add_lora; return the model. The token table, projector and norms stay as they are."""
    if scheme not in ("nf4", "int4"):
        raise ValueError(f"QLoRA quantizes the base to 4 bits: scheme 'nf4' or 'int4', not {scheme!r}")
    for blocks in BLOCKS.values():
        quantize_model(model.get_submodule(blocks), scheme, group_size, include_embedding=False)
    return model


def dequantize_base(model: nn.Module) -> nn.Module:
    """Undo quantize_base up to its rounding: every QuantizedLinear of both towers' blocks (an
    adapter's base included) becomes a float nn.Linear holding its dequantized weight; return the
    model. With merge_lora, what a QLoRA model exports."""
    for blocks in BLOCKS.values():
        for parent in list(model.get_submodule(blocks).modules()):
            for name, child in parent.named_children():
                if isinstance(child, QuantizedLinear):
                    setattr(parent, name, dequantized_linear(child))
    return model


def adapted_targets(model: nn.Module) -> list[str]:
    """The targets ("TOWER.ROLE") that reproduce the model's adapters; an error if some block
    of a tower is adapted where another is not (adapters not made by add_lora)."""
    layers, targets = lora_layers(model), []
    for tower, roles in ROLES.items():
        for role in roles:
            adapted = [name in layers for name in target_layers(model, [f"{tower}.{role}"])]
            if all(adapted):
                targets.append(f"{tower}.{role}")
            elif any(adapted):
                raise ValueError(f"only some blocks of {tower} have a {role} adapter; add_lora adapts every block")
    return targets


def save_lora(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's adapters alone to a safetensors file (A and B of each adapted layer,
    float32), with rank, alpha, dropout and targets in its metadata."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save: add_lora() first")
    first = next(iter(layers.values()))
    config = {"rank": first.rank, "alpha": first.alpha, "dropout": first.dropout_p, "targets": adapted_targets(model)}
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.lora_a"] = layer.lora_a.detach().float().cpu().contiguous()
        tensors[f"{name}.lora_b"] = layer.lora_b.detach().float().cpu().contiguous()
    atomic_write(path, lambda f: f.write(safetensors_bytes(tensors, metadata={"lora": json.dumps(config)})))


def read_lora(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The configuration and tensors of an adapter file written by save_lora."""
    tensors, metadata = read_safetensors_file(Path(path))
    try:
        config = json.loads(metadata["lora"])
        config = {key: config[key] for key in ("rank", "alpha", "dropout", "targets")}
        valid = (isinstance(config["rank"], int) and isinstance(config["alpha"], (int, float))
                 and isinstance(config["dropout"], (int, float)) and isinstance(config["targets"], list)
                 and all(isinstance(t, str) for t in config["targets"]))
    except (KeyError, TypeError, json.JSONDecodeError):
        valid = False
    if not valid:
        raise BadInput(f"{path}: not a LoRA adapter file: its metadata has no 'lora' entry with an integer "
                       f"rank, numbers alpha and dropout and a list of targets (found {metadata})")
    return config, tensors


def load_lora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the adapters saved in `path` on `model` (a base without adapters); return the model.

    Strict: the file must hold exactly the adapters its targets pick in this model, each of the
    shape this model's layers need, or BadInput names the file, the key and both shapes (a
    missing or unexpected adapter, another rank, or another base model).
    """
    config, tensors = read_lora(path)
    if lora_layers(model):
        raise ValueError(f"{path}: the model already has LoRA adapters; load onto a base without them")
    try:
        names = target_layers(model, config["targets"])
    except ValueError as err:
        raise BadInput(f"{path}: {err}") from None
    expected = {}
    for name in names:
        base = model.get_submodule(name)
        expected[f"{name}.lora_a"] = (config["rank"], base.in_features)
        expected[f"{name}.lora_b"] = (base.out_features, config["rank"])
    raise_problems(tensor_problems(expected, tensors), str(path))
    add_lora(model, config["rank"], config["alpha"], config["targets"], config["dropout"])
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_a.copy_(tensors[f"{name}.lora_a"])
            layer.lora_b.copy_(tensors[f"{name}.lora_b"])
    return model


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Name -> number of elements of every parameter that trains (requires_grad)."""
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}


def describe_trainable(model: nn.Module) -> str:
    """One line: how many of the model's parameters train, e.g. for a log."""
    trainable = sum(trainable_parameters(model).values())
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f} %)"
