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
  differently), so this path repacks them into it when they are quantized or loaded, holds
  them only so, and reads them back from it for everything else (see "The layout of torch's
  int4 CPU kernel" below); checkpoints always hold the portable layout. The kernels are
  vectorised for bfloat16 inputs; with float32 inputs they run several times slower than a
  float32 matrix product.
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

from functools import cache

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
# The layout of torch's int4 CPU kernel.
#
# _weight_int4pack_mm_for_cpu reads its codes in a layout of its own, built by
# _convert_weight_to_int4pack_for_cpu from one int32 code per weight [N, K]. The rows are cut
# into blocks of R (a few times the CPU's vector width: 64 with AVX-512 kernels, 32 with AVX2
# ones), stored one after the other, each as [K, R / 2] bytes: for every input k, the two nibbles
# of a byte are two rows of the block. In a full block of a vectorised kernel they are rows j
# and j + R / 2 ("halves", so that one vector shift separates two runs of rows); in a last block
# of fewer rows, and without vector kernels, rows 2j and 2j + 1 ("pairs"). The int4 "cpu" path
# keeps its codes only in this layout, so a layer holds them once; the state dict and a
# prefill's dense product read them back through `kernel_layout_rows`, an embedding lookup
# through `kernel_layout_row`.

@cache
def int4_kernel_layout() -> tuple[int, bool]:
    """(R, halves) of the int4 kernel on this CPU (see above), read off two probes of the
    packing op rather than guessed from the CPU's name."""
    probe = torch.zeros(64, 2, dtype=torch.int32)  # 64 rows: one whole block of the widest layout
    probe[1, 0] = 1  # row 1: byte 1's low nibble ("halves") or byte 0's high one ("pairs")
    halves = int(torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).view(-1)[1]) == 1
    probe[1, 0], probe[0, 1] = 0, 1  # input 1 of row 0: the first byte after the block's input 0
    second_input = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).view(-1).nonzero()
    return 2 * int(second_input[0]), halves


def to_kernel_layout(packed: torch.Tensor) -> torch.Tensor:
    """Codes of pack_nibbles [N, K / 2] -> the same codes in the int4 kernel's layout [N, K / 2],
    QUANTIZE_ROWS rows at a time (a multiple of R: the same bytes as packing the whole matrix,
    without a 4-byte copy of every code)."""
    out = torch.empty_like(packed)
    for start in range(0, packed.shape[0], QUANTIZE_ROWS):
        rows = slice(start, start + QUANTIZE_ROWS)
        codes = unpack_nibbles(packed[rows]).to(torch.int32)  # [n, K], 0..15
        out[rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # [n, K / 2]
    return out


def _unpack_blocks(data: torch.Tensor, in_features: int, halves: bool) -> torch.Tensor:
    """Bytes of whole blocks [n, K, R / 2] -> their codes [n R, K] in row order."""
    columns = data.transpose(1, 2).contiguous()  # [n, R/2, K]: byte column j holds two rows
    low, high = columns & 15, columns >> 4  # [n, R/2, K] each
    rows = torch.cat([low, high], dim=1) if halves else torch.stack([low, high], dim=2)  # rows j, j + R/2 or 2j, 2j + 1
    return rows.reshape(-1, in_features)  # [n R, K]


def kernel_layout_rows(packed: torch.Tensor, rows: slice) -> torch.Tensor:
    """Codes 0..15 [len(rows), K] of a weight in the int4 kernel's layout [N, K / 2], for a
    slice of its rows: the blocks that hold them are unpacked, then the rows cut out."""
    block, halves = int4_kernel_layout()
    n, in_features = packed.shape[0], 2 * packed.shape[1]
    start, stop, _ = rows.indices(n)
    first, last, whole = start // block, -(-stop // block), n // block  # blocks [first, last); whole are full
    parts = []  # a block of R rows takes R rows of `packed`, whatever order its bytes are in
    if first < min(last, whole):
        data = packed[first * block:min(last, whole) * block].view(-1, in_features, block // 2)  # [n, K, R/2]
        parts.append(_unpack_blocks(data, in_features, halves))
    if last > whole:  # the last block, of fewer than R rows: pairs
        data = packed[whole * block:].view(1, in_features, -1)  # [1, K, rows/2]
        parts.append(_unpack_blocks(data, in_features, halves=False))
    return torch.cat(parts)[start - first * block:stop - first * block]  # [len(rows), K]


def kernel_layout_row(packed: torch.Tensor, row: int) -> torch.Tensor:
    """Codes 0..15 [K] of one row of a weight in the int4 kernel's layout [N, K / 2]: one
    nibble of one byte column of its block, read without unpacking the block."""
    block, halves = int4_kernel_layout()
    n, in_features = packed.shape[0], 2 * packed.shape[1]
    whole = n // block
    b, r = divmod(row, block)
    size = block if b < whole else n - whole * block  # rows in this block
    column, high = (r % (size // 2), r // (size // 2)) if halves and b < whole else (r // 2, r % 2)
    data = packed[b * block:b * block + size].view(in_features, size // 2)  # the block's bytes [K, rows/2]
    return (data[:, column] >> 4 * high) & 15  # [K]


# ---------------------------------------------------------------------------------------------
# The modules.

class QuantizedLinear(nn.Module):
    """y = x W^T + b with W [out, in] stored quantized (see the module docstring).

    Buffers: `codes` (int8 [out, in] for int8; for int4 and nf4 two 4-bit codes a byte, uint8
    [out, padded_in / 2], in pack_nibbles' layout, or in the int4 kernel's on the "cpu" path),
    `scale` ([out] for int8, [out, groups] otherwise, in the model's float dtype) and, for
    affine int4, `zero` (uint8 [out, groups]). `bias` stays a float parameter. The state dict
    always holds the codes in pack_nibbles' layout. Built empty here (a skeleton to load a
    quantized state dict into); `from_linear` quantizes a float layer.
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
        self.kernel_layout = kernel == "cpu" and scheme == "int4"  # codes in the int4 kernel's layout
        if self.kernel_layout:
            # The kernel's table of scales and offsets (see pack_for_cpu_kernel). A state dict
            # loads codes in pack_nibbles' layout, which are then repacked; one is written in it.
            self.register_buffer("kernel_scale_offset", torch.zeros(groups, out_features, 2, dtype=dtype, device=device),
                                 persistent=False)
            self.register_load_state_dict_post_hook(lambda module, incompatible_keys: module.pack_for_cpu_kernel())
            self.register_state_dict_post_hook(_codes_in_pack_nibbles_layout)

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
        if self.kernel_layout:
            self.pack_for_cpu_kernel()

    def dequantize(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """The float weight [out, in] that the codes stand for, in the scales' dtype; with `rows`
        (integer ids of any shape [...], or a slice), only those rows: [..., in]."""
        scale = self.scale if rows is None else self.scale[rows]
        if self.scheme == "int8":
            codes = self.codes if rows is None else self.codes[rows]
            return codes.to(scale.dtype) * scale[..., None]  # [..., in]
        groups = self.nibbles(rows).unflatten(-1, (-1, self.group_size))  # [..., g, G], codes 0..15
        if self.scheme == "int4":
            zero = self.zero if rows is None else self.zero[rows]  # [..., g]
            weight = (groups.to(scale.dtype) - zero.to(scale.dtype)[..., None]) * scale[..., None]  # [..., g, G]
        else:
            weight = NF4_LEVELS.to(scale.device, scale.dtype)[groups.int()] * scale[..., None]  # [..., g, G]
        return weight.flatten(-2)[..., :self.in_features]  # [..., in]: the padding cut off

    def nibbles(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """The 4-bit codes 0..15 [..., padded_in] of every row, or of `rows`, in either layout."""
        if not self.kernel_layout:
            return unpack_nibbles(self.codes if rows is None else self.codes[rows])  # [..., padded_in]
        if rows is None or isinstance(rows, slice):
            return kernel_layout_rows(self.codes, rows or slice(None))  # [n, padded_in]
        picked = [kernel_layout_row(self.codes, i) for i in rows.flatten().tolist()]
        return torch.stack(picked).view(*rows.shape, self.padded_in)  # [..., padded_in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        if self.kernel == "reference":
            return F.linear(x, self.dequantize(), self.bias)  # [..., out]
        return self.cpu_kernel_forward(x)

    # The fast path: torch's fused CPU kernels.

    @torch.no_grad()
    def pack_for_cpu_kernel(self):
        """Repack the stored codes, just quantized or loaded in pack_nibbles' layout, into the
        int4 kernel's layout (in place of them: the layer holds its codes once), and fill the
        kernel's table of scales and offsets. The kernel computes W = (q - 8) * scale + offset
        per group, so a group's offset is (8 - zero) * scale: the W of (q - zero) * scale, up
        to rounding.
        """
        self.codes = to_kernel_layout(self.codes)  # a new buffer, on the device of the codes
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
            step = max(64, BLOCK_WEIGHTS // self.in_features // 64 * 64)  # output rows per block: whole blocks of R
            blocks = [slice(start, start + step) for start in range(0, self.out_features, step)]
            y = torch.cat([F.linear(inputs, self.dequantize(block).to(dtype)) for block in blocks],
                          dim=-1).to(rows.dtype)  # [M, out]
        elif self.scheme == "int8":
            y = torch.ops.aten._weight_int8pack_mm(rows, self.codes, self.scale)  # [M, out]
        else:
            if self.padded_in != self.in_features:
                rows = F.pad(rows, (0, self.padded_in - self.in_features))  # [M, padded_in]; padding weighs 0
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.codes, self.group_size,
                                                            self.kernel_scale_offset)  # [M, out]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)  # [..., out]

    def extra_repr(self) -> str:
        group = "" if self.scheme == "int8" else f", group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"
                f"{group}, kernel={self.kernel}, bias={self.bias is not None}")


def _codes_in_pack_nibbles_layout(module: QuantizedLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    """A state-dict hook of the int4 "cpu" path: its codes are written in pack_nibbles' layout,
    the same bytes whatever CPU wrote them."""
    state_dict[prefix + "codes"] = pack_nibbles(kernel_layout_rows(module.codes, slice(None)))


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
    """Bytes of the model's state dict: what a checkpoint of it holds (the int4 kernel's table
    of scales and offsets excluded). Counted on the model's own tensors, without building the
    state dict, which on the int4 "cpu" path repacks every code (the same bytes either way)."""
    tensors = list(model.parameters()) + [buffer for module in model.modules()
                                          for name, buffer in module.named_buffers(recurse=False)
                                          if name not in module._non_persistent_buffers_set]
    return sum(t.numel() * t.element_size() for t in tensors)


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
    use there, and bfloat16 ones for the AVX-512 choice); float32, unquantized, for anything
    not measured. Quantized weights come in groups of 64 (int4)."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.float32, None, f"no measurement on {device.type} devices; float32 is the reference"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in FASTEST_ON_CPU:
        return torch.float32, None, f"no measurement on a {capability} CPU; float32 is the reference"
    dtype, scheme, why = FASTEST_ON_CPU[capability]
    if dense_dtype(dtype) != dtype:  # an AVX-512 CPU without bfloat16 instructions: never measured
        return torch.float32, None, f"no measurement on a {capability} CPU without bfloat16 instructions; " \
                                    "float32 is the reference"
    return dtype, scheme, why
