"""Weight-only quantization from scratch: int8 per output channel, int4 in groups (affine or NF4).

Why: decoding one token multiplies one vector by every weight matrix of the model, so the time
of a step is the time to read the weights from memory (6 GB per token for PaliGemma 2 3B in
bfloat16). Fewer bits per weight means fewer bytes to read. Here only the weights are quantized;
activations, norms and every sum stay in float (weight-only quantization).

Each weight matrix W [N, K] (N outputs, K inputs) becomes integer codes and float scales, and
`dequantize` gives back an approximation of W:

- int8, symmetric per output channel ("absmax"): row n has one scale s_n = max|W[n]| / 127,
  codes q = round(W / s_n) in [-127, 127], and W ~ q * s_n. The error of a weight is at most
  s_n / 2: one large weight (an outlier) in a row coarsens the whole row. 8 bits per weight.
- int4, in groups of G consecutive inputs: 16 levels are too few for a whole row of thousands
  of weights, so every group of G weights of a row gets its own scale, and an outlier only
  coarsens its own group. The scales cost bits too: 4 + (bits of the scale and zero) / G per
  weight, e.g. 4.75 bits at G = 32 with a bfloat16 scale and an 8-bit zero point. Two flavours:
  - "int4", affine: the range [min, max] of the group (widened to include 0) is cut into 15
    equal steps, s = (max - min) / 15; the zero point z is the code of the value 0, and
    W ~ (q - z) * s with q in 0..15. Zero is exactly representable.
  - "nf4", NormalFloat (QLoRA): the group is divided by its absmax, which puts it in [-1, 1],
    and each weight takes the nearest of 16 fixed levels placed at quantiles of a normal
    distribution (`nf4_levels`): trained weights are roughly normal, so the levels are dense
    near 0 where most weights are. W ~ level[q] * s, s = the group's absmax.
  When K is not a multiple of G (SigLIP's MLP is 4304 wide), the rows are padded with zeros to
  the next multiple; the padding dequantizes to exactly 0 and is cut off again.

`QuantizedLinear` stores codes and scales as buffers (not parameters: they take no gradient)
and has two paths, chosen by its `kernel` argument:
- "reference": dequantize W, then F.linear. Reads like the lesson, runs on any device, and
  autograd differentiates it, so adapters on top of it train (QLoRA): gradients flow through
  the dequantized W to the input. (Autograd keeps each dequantized W until the backward pass,
  so a training step holds the float weights of the layers it went through.)
- "cpu": PyTorch's fused weight-only kernels, which read the codes and dequantize on the fly
  (torch.ops.aten._weight_int8pack_mm, and _weight_int4pack_mm_for_cpu for affine int4; there
  is none for NF4). For inference only: they have no backward. The int4 kernel wants its codes
  in a layout of its own that depends on the CPU (AVX2 and AVX-512 interleave rows
  differently), so that copy is built from the stored codes and never saved: for int4 this path
  holds the codes twice in memory, though a forward pass reads only the kernel's copy. The
  kernels are vectorised for bfloat16 inputs; with float32 inputs they run several times
  slower than a float32 matrix product.
  The fused kernels win only for a few rows of input (a decode step), where reading the codes
  is the cost. For many rows (a prefill: 256 image tokens and the prompt) they do the
  arithmetic of a matrix product without the blocking and vector units of a real one, so this
  path then dequantizes the weight a block of output rows at a time and runs the CPU's dense
  matrix product on each block, in the input's dtype where that product is fast and else in
  float32 (`dense_dtype`: bfloat16 products are fast only where oneDNN has bfloat16
  instructions). One block at a time keeps the float copy small (2 MB) instead of a whole
  float weight; dequantizing costs about 0.3 ns a weight for int8 and 1 to 2 ns for int4
  (unpacking the nibbles), so a prefill on this path still takes longer than one on float
  weights.

`quantize_model` swaps every linear layer of both towers and the projector, and the tied token
table (input embedding and output layer at once, `QuantizedEmbedding`), for quantized ones;
norms, the patch embedding (a convolution), position embeddings and biases stay in float.
`quantized_state_dict` / `load_quantized_state_dict` save and strictly load the result, and
`quantization_of` says what a quantized checkpoint's header records (docs/checkpoints.md §9).

Which weights decode fastest depends on the CPU (`fastest_weights`): the fused kernels are fast
where the CPU has wide enough vector instructions for them and compute-bound elsewhere, where
reading more bytes of float32 is quicker than decoding fewer bytes of codes.
"""

import copy
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .gemma import TiedEmbedding
from .layouts import listing, raise_problems

SCHEMES = ("int8", "int4", "nf4")
KERNELS = ("reference", "cpu")
CPU_INT4_GROUP_SIZES = (32, 64, 128, 256)  # the only group sizes _weight_int4pack_mm_for_cpu takes
QUANTIZE_ROWS = 4096  # rows quantized at a time, so the float32 temporaries of a 257152-row table stay small
# Above this many rows of input the "cpu" path dequantizes and runs the dense product. Measured on
# one 9216 x 2304 matrix with bfloat16 inputs, one thread, fused kernel against dense path. An
# AVX-512 CPU with bfloat16 instructions: int8 6.4 vs 9.6 ms at 8 rows, 12.5 vs 11.8 at 16, 49 vs
# 21 at 64; int4 (groups of 64, slower to unpack) 37 vs 51 at 64, 54 vs 52 at 96, 117 vs 88 at 192;
# a dense bfloat16 product alone took 61 ms at 272 rows. The same CPU under AVX2 kernels (the
# dense product in float32): int8 36 vs 37 at 32, 78 vs 59 at 64, 309 vs 192 at 272; int4 75 vs
# 77 at 64, 263 vs 254 at 272.
FUSED_ROWS = {"int8": 16, "int4": 96}
# Weights dequantized at a time on that path: a block of 2**20 (2 MB in bfloat16) stays in the
# CPU's caches for its product; blocks of 2.4 and 9.4 million weights ran up to 1.7x slower.
BLOCK_WEIGHTS = 2**20


# ---------------------------------------------------------------------------------------------
# The 16 NF4 levels.

def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat-4 levels in [-1, 1], from the quantiles of a standard normal [16].

    If a group of weights, divided by its absmax, follows a normal distribution, then levels
    at equally spaced probabilities (quantiles) are each the nearest level for about the same
    share of the weights: no code is wasted on values that almost never occur. The recipe:
    - The 0 and 1 quantiles are infinite, so the outermost levels sit at probability delta from
      either end, delta = (1/32 + 1/30) / 2: half a bin's width for 16 bins and for 15 bins,
      averaged.
    - Zero must be a level (zero weights and the padding stay exactly 0), so the two halves are
      built apart: 8 positive levels at probabilities evenly spaced from 1/2 (excluded: that is
      0) to 1 - delta, 7 negative ones from delta to 1/2 (excluded), and 0 itself.
    - Divided by the largest, the levels run from exactly -1 to exactly 1.
    `torch.special.ndtri` is the inverse of the normal's cumulative distribution function.
    """
    delta = (1 / 32 + 1 / 30) / 2
    positive = torch.special.ndtri(torch.linspace(0.5, 1 - delta, 9, dtype=torch.float64)[1:])  # [8]
    negative = torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])  # [7]
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]) / positive[-1]  # [16]
    return levels.float()


NF4_LEVELS = nf4_levels()


# ---------------------------------------------------------------------------------------------
# Quantize: float rows [n, K] to codes and scales. Arithmetic in float32 whatever the weight's
# dtype; scales are rounded to the storage dtype first, and the codes are computed against the
# scale as stored, so that dequantizing reproduces what the codes were chosen for.

def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax per output channel: rows [n, K] -> codes int8 [n, K], scales [n] (in `dtype`)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)  # [n]
    codes = (w / scale.float()[:, None]).round().clamp(-127, 127)  # [n, K]
    return codes.to(torch.int8), scale


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rows [n, K] -> float32 groups [n, ceil(K / G), G], zero-padded on the right."""
    padding = -weight.shape[1] % group_size
    return F.pad(weight.float(), (0, padding)).view(weight.shape[0], -1, group_size)  # [n, g, G]


def quantize_affine(weight: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine int4 per group: rows [n, K] -> codes [n, g, G], scales [n, g] (in `dtype`) and
    zero points [n, g] (uint8, 0..15), with W ~ (codes - zero) * scale."""
    groups = grouped(weight, group_size)  # [n, g, G]
    low = groups.amin(dim=-1).clamp(max=0)  # [n, g], widened to include 0
    high = groups.amax(dim=-1).clamp(min=0)  # [n, g]
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)  # [n, g]
    zero = (-low / scale.float()).round().clamp(0, 15)  # [n, g]: the code of 0
    codes = (groups / scale.float()[..., None] + zero[..., None]).round().clamp(0, 15)  # [n, g, G]
    return codes.to(torch.uint8), scale, zero.to(torch.uint8)


def quantize_nf4(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 per group: rows [n, K] -> codes [n, g, G] (indices into NF4_LEVELS) and scales [n, g]
    (the groups' absmax, in `dtype`), with W ~ NF4_LEVELS[codes] * scale."""
    groups = grouped(weight, group_size)  # [n, g, G]
    scale = groups.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)  # [n, g]
    normed = groups / scale.float()[..., None]  # [n, g, G], in [-1, 1]
    # The nearest level is the one whose interval between midpoints holds the value: its index
    # is the number of midpoints below it.
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # [15]
    codes = torch.bucketize(normed, midpoints.to(normed.device))  # [n, g, G], 0..15
    return codes.to(torch.uint8), scale


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [..., 2m] (uint8, 0..15) -> bytes [..., m]: column 2i in the low nibble of
    byte i, column 2i + 1 in the high nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., m]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles: bytes [..., m] -> codes [..., 2m]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)  # [..., 2m]


# ---------------------------------------------------------------------------------------------
# The modules.

class QuantizedLinear(nn.Module):
    """y = x W^T + b with W [out, in] stored quantized (see the module docstring).

    Buffers: `codes` (int8 [out, in] for int8; for int4 and nf4 two 4-bit codes a byte, uint8
    [out, padded_in / 2]), `scale` ([out] for int8, [out, groups] otherwise, in the model's
    float dtype) and, for affine int4, `zero` (uint8 [out, groups]). `bias` stays a float
    parameter. Built empty here (a skeleton to load a quantized state dict into); `from_linear`
    quantizes a float layer.
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int = 64,
                 bias: bool = False, dtype: torch.dtype = torch.float32, device=None, kernel: str = "reference"):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if scheme != "int8" and (group_size < 2 or group_size % 2):
            raise ValueError(f"group_size must be an even number >= 2, got {group_size}")
        self.in_features, self.out_features, self.scheme, self.kernel = in_features, out_features, scheme, kernel
        self.group_size = in_features if scheme == "int8" else group_size  # int8: one "group", the whole row
        groups = -(-in_features // self.group_size)
        self.padded_in = groups * self.group_size
        if kernel == "cpu":
            self.check_cpu_kernel()
        if scheme == "int8":
            self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_buffer("codes", torch.zeros(out_features, self.padded_in // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scale", torch.zeros(out_features, groups, dtype=dtype, device=device))
        if scheme == "int4":
            self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        if kernel == "cpu" and scheme == "int4":
            # The int4 kernel's own copy of the codes, and its scales and offsets (see
            # pack_for_cpu_kernel), rebuilt whenever a state dict is loaded into the stored codes.
            self.register_buffer("kernel_codes", torch.zeros_like(self.codes), persistent=False)
            self.register_buffer("kernel_scale_offset", torch.zeros(groups, out_features, 2, dtype=dtype, device=device),
                                 persistent=False)
            self.register_load_state_dict_post_hook(lambda module, incompatible_keys: module.pack_for_cpu_kernel())

    def check_cpu_kernel(self):
        """Raise if torch's CPU kernels cannot run this layer."""
        if self.scheme == "nf4":
            raise ValueError("torch has no fused kernel for NF4: use kernel='reference'")
        if self.scheme == "int4" and self.group_size not in CPU_INT4_GROUP_SIZES:
            raise ValueError(f"the CPU int4 kernel takes group sizes {CPU_INT4_GROUP_SIZES}, not {self.group_size}")
        if self.scheme == "int4" and self.out_features % 16:
            raise ValueError(f"the CPU int4 kernel needs a multiple of 16 outputs, this layer has {self.out_features}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int = 64, kernel: str = "reference") -> "QuantizedLinear":
        """Quantize a float linear layer; its dtype becomes the dtype of the scales and outputs."""
        weight = linear.weight.detach()
        layer = cls(weight.shape[1], weight.shape[0], scheme, group_size, linear.bias is not None,
                    weight.dtype, weight.device, kernel)
        if not weight.is_meta:  # a skeleton on the meta device has nothing to quantize
            layer.quantize_(weight)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor):
        """Fill the buffers with the quantization of a float weight [out, in], rows a few at a time."""
        dtype = self.scale.dtype
        for start in range(0, self.out_features, QUANTIZE_ROWS):
            rows = slice(start, start + QUANTIZE_ROWS)
            if self.scheme == "int8":
                self.codes[rows], self.scale[rows] = quantize_int8(weight[rows], dtype)
                continue
            if self.scheme == "int4":
                codes, self.scale[rows], self.zero[rows] = quantize_affine(weight[rows], self.group_size, dtype)
            else:
                codes, self.scale[rows] = quantize_nf4(weight[rows], self.group_size, dtype)
            self.codes[rows] = pack_nibbles(codes.flatten(1))  # [n, padded_in / 2]
        if self.kernel == "cpu" and self.scheme == "int4":
            self.pack_for_cpu_kernel()

    def dequantize(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """The float weight [out, in] that the codes stand for, in the scales' dtype; with `rows`
        (integer ids of any shape [...], or a slice), only those rows: [..., in]."""
        codes, scale = (self.codes, self.scale) if rows is None else (self.codes[rows], self.scale[rows])
        if self.scheme == "int8":
            return codes.to(scale.dtype) * scale[..., None]  # [..., in]
        groups = unpack_nibbles(codes).unflatten(-1, (-1, self.group_size))  # [..., g, G], codes 0..15
        if self.scheme == "int4":
            zero = self.zero if rows is None else self.zero[rows]  # [..., g]
            weight = (groups.to(scale.dtype) - zero.to(scale.dtype)[..., None]) * scale[..., None]  # [..., g, G]
        else:
            weight = NF4_LEVELS.to(scale.device, scale.dtype)[groups.int()] * scale[..., None]  # [..., g, G]
        return weight.flatten(-2)[..., :self.in_features]  # [..., in]: the padding cut off

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        if self.kernel == "reference":
            return F.linear(x, self.dequantize(), self.bias)  # [..., out]
        return self.cpu_kernel_forward(x)

    # The fast path: torch's fused CPU kernels.

    @torch.no_grad()
    def pack_for_cpu_kernel(self):
        """Fill the int4 kernel's copy of the codes and its table of scales and offsets.

        The kernel takes one code per int32 and interleaves rows in blocks of 32 (AVX2) or 64
        (AVX-512); packing QUANTIZE_ROWS rows at a time (a multiple of both) gives the same
        bytes as packing the whole matrix, without a 4-byte copy of every code. The kernel
        computes W = (q - 8) * scale + offset per group, so a group's offset is (8 - zero) *
        scale: the W of (q - zero) * scale, up to rounding.
        """
        self.kernel_codes = torch.empty_like(self.codes)  # new buffers, on the device of the codes
        for start in range(0, self.out_features, QUANTIZE_ROWS):
            rows = slice(start, start + QUANTIZE_ROWS)
            codes = unpack_nibbles(self.codes[rows]).to(torch.int32)  # [n, padded_in], 0..15
            self.kernel_codes[rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # [n, padded_in / 2]
        offset = (8 - self.zero.float()) * self.scale.float()  # [out, g]
        table = torch.stack([self.scale, offset.to(self.scale.dtype)], dim=-1)  # [out, g, 2]
        self.kernel_scale_offset = table.transpose(0, 1).contiguous()  # [g, out, 2]

    def cpu_kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] through _weight_int8pack_mm or _weight_int4pack_mm_for_cpu,
        or, for more than FUSED_ROWS rows, block by block on the dense product."""
        rows = x.reshape(-1, self.in_features).contiguous()  # [M, in]
        if rows.shape[0] > FUSED_ROWS[self.scheme]:
            dtype = dense_dtype(rows.dtype)
            inputs = rows.to(dtype)  # [M, in], converted once for every block
            step = max(1, BLOCK_WEIGHTS // self.in_features)  # output rows per block
            blocks = [slice(start, start + step) for start in range(0, self.out_features, step)]
            y = torch.cat([F.linear(inputs, self.dequantize(block).to(dtype)) for block in blocks],
                          dim=-1).to(rows.dtype)  # [M, out]
        elif self.scheme == "int8":
            y = torch.ops.aten._weight_int8pack_mm(rows, self.codes, self.scale)  # [M, out]
        else:
            if self.padded_in != self.in_features:
                rows = F.pad(rows, (0, self.padded_in - self.in_features))  # [M, padded_in]; padding weighs 0
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.kernel_codes, self.group_size,
                                                            self.kernel_scale_offset)  # [M, out]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)  # [..., out]

    def extra_repr(self) -> str:
        group = "" if self.scheme == "int8" else f", group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"
                f"{group}, kernel={self.kernel}, bias={self.bias is not None}")


def dense_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which this CPU's dense matrix product is fast, for inputs of `dtype`: float32,
    or bfloat16 itself where oneDNN runs it on bfloat16 instructions (it honours
    ONEDNN_MAX_CPU_ISA); elsewhere a bfloat16 product is emulated, several times slower."""
    if dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


class QuantizedEmbedding(QuantizedLinear):
    """The tied token table [V, D] quantized, read the two ways of gemma.TiedEmbedding: forward
    (token ids -> rows, dequantizing only the rows it reads) and readout (hidden states -> logits,
    the quantized matrix product of QuantizedLinear, kernel included)."""

    @classmethod
    def from_embedding(cls, embedding: TiedEmbedding, scheme: str, group_size: int = 64,
                       kernel: str = "reference") -> "QuantizedEmbedding":
        """Quantize a float token table, one row per token (an output of the readout)."""
        weight = embedding.weight.detach()  # [V, D]
        table = cls(weight.shape[1], weight.shape[0], scheme, group_size, False, weight.dtype, weight.device, kernel)
        if not weight.is_meta:
            table.quantize_(weight)
        return table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> embeddings [..., D]."""
        return self.dequantize(rows=input_ids)  # [..., D]

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., D] -> logits [..., V]."""
        return super().forward(hidden)  # [..., V]


# ---------------------------------------------------------------------------------------------
# The whole model.

def quantize_model(model: nn.Module, scheme: str, group_size: int = 64, include_embedding: bool = True,
                   kernel: str = "reference") -> nn.Module:
    """Replace, in place, every nn.Linear of `model` (for PaliGemma: both towers and the
    projector) by a QuantizedLinear and, with include_embedding, the tied token table by a
    QuantizedEmbedding; return the model. scheme: "int8" (per output channel; group_size is
    ignored), "int4" (affine) or "nf4", in groups of group_size inputs. kernel: "reference" or
    "cpu" (see the module docstring). Everything else (norms, convolution, position
    embeddings, biases) stays as it was.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    kinds = (nn.Linear, TiedEmbedding) if include_embedding else (nn.Linear,)
    # Parents and names only: holding the float layers themselves would keep every one of them
    # in memory until the end, a float copy of the model beside the quantized one.
    targets = [(path, parent, name) for path, parent in model.named_modules()
               for name, child in parent.named_children() if isinstance(child, kinds)]
    for path, parent, name in targets:
        child = getattr(parent, name)
        try:
            if isinstance(child, nn.Linear):
                setattr(parent, name, QuantizedLinear.from_linear(child, scheme, group_size, kernel))
            else:
                setattr(parent, name, QuantizedEmbedding.from_embedding(child, scheme, group_size, kernel))
        except ValueError as err:  # a layer the CPU kernel cannot run: say which
            raise ValueError(f"{path + '.' if path else ''}{name}: {err}") from None
    return model


def quantization_of(model: nn.Module) -> dict | None:
    """What quantize_model did to `model`, as a quantized checkpoint's header records it:
    {"scheme", "group_size" (None for int8, per output channel), "modules" (the quantized
    modules' paths, in the model's order)}; None when nothing is quantized."""
    layers = {path: m for path, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        return None
    schemes = {(m.scheme, None if m.scheme == "int8" else m.group_size) for m in layers.values()}
    if len(schemes) > 1:
        raise ValueError(f"the model mixes quantization schemes {sorted(schemes, key=str)}; a checkpoint holds one")
    (scheme, group_size), = schemes
    return {"scheme": scheme, "group_size": group_size, "modules": list(layers)}


def in_words(scheme: str, group_size: int | None) -> str:
    """A scheme in words, e.g. "int4 (affine) in groups of 64" or "int8 per output channel"."""
    if scheme == "int8":
        return "int8 per output channel"
    return f"{scheme} ({'affine' if scheme == 'int4' else 'NormalFloat'}) in groups of {group_size}"


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict: what a checkpoint of it holds (kernel copies excluded)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that describe a quantized model: codes, scales and zero points of every
    quantized layer, and the float parameters (norms, biases...). Names are the modules' paths,
    e.g. `llm.layers.0.mlp.up_proj.codes`. The CPU kernel's copies are not included: they
    depend on the CPU and are rebuilt when loading."""
    return {key: tensor.detach().contiguous() for key, tensor in model.state_dict().items()}


def load_quantized_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "quantized state dict"):
    """Load `tensors` (from quantized_state_dict) into a model quantized the same way.

    Strict: missing or unexpected keys, shapes that differ, or integer codes of another dtype
    (or float where the model has integers, or the reverse) raise one CheckpointError (a
    BadInput) naming `source` and every problem, each key with what was expected and found.
    Float tensors are converted to the model's dtype. The model may be a skeleton on the meta
    device (quantize_model works there without memory): it then takes the loaded tensors
    themselves.
    """
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    problems = [f"missing keys {listing(missing)}"] if missing else []
    problems += [f"unexpected keys {listing(unexpected)}"] if unexpected else []
    for key in (key for key in expected if key in tensors):
        found, want = tensors[key], expected[key]
        if found.shape != want.shape:
            problems.append(f"{key} has shape {list(found.shape)}, the model expects {list(want.shape)}")
        elif found.dtype != want.dtype and not (found.is_floating_point() and want.is_floating_point()):
            problems.append(f"{key} has dtype {found.dtype}, the model expects {want.dtype}")
    raise_problems(problems, source)
    tensors = {key: tensor.to(expected[key].dtype) for key, tensor in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=any(t.is_meta for t in expected.values()))


# ---------------------------------------------------------------------------------------------
# Quality on a trained model.

def held_out_quality(run, stage: int, schemes=("int8", "int4"), group_size: int = 64, recipe="tiny",
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Every held-out metric of a trained run's stage, for its float32 model and for each
    scheme quantized from it: {"float32": {task: metric}, "int8": {...}, ...}.

    The evaluation is the trainer's (evaluate.py): the stage's model from `run`/stageN/model,
    the world of `seed` and the run's VQ-VAE, the recipe's number of held-out scenes at the
    model's resolution, so the float32 row is the stage's metrics.json. `recipe` is a name or
    a train.Recipe. The quantized layers run the reference path.
    """
    # These modules import this one (through checkpoint.py), so they are imported when needed.
    from .checkpoint import load
    from .data import World
    from .evaluate import evaluate
    from .tasks import mask_to_target
    from .train import RECIPES
    from .vqvae import load_vqvae

    run = Path(run)
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    model = load(run / f"stage{stage}" / "model", dtype=torch.float32)
    vqvae = load_vqvae(run / "stage0" / "vqvae.safetensors")
    world = World(seed, recipe.world, segment_target=partial(mask_to_target, vqvae=vqvae))
    size = model.config.vision.image_size

    def metrics(m: nn.Module) -> dict[str, float]:
        return evaluate(m, model.tokenizer, world, size, recipe.eval_examples, vqvae)
    results = {"float32": metrics(model)}
    for scheme in schemes:
        results[scheme] = metrics(quantize_model(copy.deepcopy(model), scheme, group_size))
    return results


# ---------------------------------------------------------------------------------------------
# Which weights are fastest.

def fastest_kernel(scheme: str, group_size: int, device) -> str:
    """"cpu" where the model runs on a CPU and torch has a fused kernel for the scheme (int8;
    int4 in groups of 32 to 256), else "reference"."""
    fused = scheme == "int8" or (scheme == "int4" and group_size in CPU_INT4_GROUP_SIZES)
    return "cpu" if torch.device(device).type == "cpu" and fused else "reference"


# torch.backends.cpu.get_cpu_capability() -> (dtype, scheme, why). AVX512: `bench --config
# quantized` (greedy decode at batch 1 on the measure.py token clock, PaliGemma 2 3B-224 at full
# depth, one thread, the quantized layers on the fused kernels; README.md, "Quantization").
# AVX2: one decoder MLP matrix times one token on a real AVX2 CPU, two threads.
FASTEST_ON_CPU = {
    "AVX512": (torch.bfloat16, "int4", "measured on two AVX-512 CPUs with bfloat16 instructions, PaliGemma 2 "
                                       "3B decode tokens/s: int4 4.6, int8 2.7, bfloat16 1.5, float32 1.3 (AMD "
                                       "EPYC); 2.9, 1.9, 1.2, 0.9 (Intel Xeon)"),
    "AVX2": (torch.float32, None, "measured on an AVX2 CPU, one 9216 x 2304 matrix times a token: float32 "
                                  "5.2 ms, int8 7.8, int4 7.9, bfloat16 8.7 (compute-bound there)"),
}


def fastest_weights(device) -> tuple[torch.dtype, str | None, str]:
    """(dtype, quantization scheme or None, why) that decode fastest on `device`: on a CPU the
    measured choice for its kind (FASTEST_ON_CPU, by the vector instructions torch's kernels
    use there); float32, unquantized, for anything not measured. Quantized weights come in
    groups of 64 (int4)."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.float32, None, f"no measurement on {device.type} devices; float32 is the reference"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in FASTEST_ON_CPU:
        return torch.float32, None, f"no measurement on a {capability} CPU; float32 is the reference"
    dtype, scheme, why = FASTEST_ON_CPU[capability]
    return dtype, scheme, why
