"""Exercise checks for notebook 08 (quantization).

Each check runs the learner's function and the package's own quantizer (quantize.py) on the same
seeded weights and returns one line, an exercises.Verdict, built by exercises.run_check (the
same comparison as notebooks 01-03: type, shape, dtype, then values; integer codes must be
equal, floats equal to float32 rounding). An answer equal to a known mistake gets its hint:

    W [16, 64], rows of different sizes: wrong value at row 0, col 0: yours 0, expected -54
    (1010 of 1024 values differ) — the scale is max|W| / 127, not max|W|: ...

The weights of every case have rows of very different sizes and one large weight (an outlier),
so that a scale shared by the wrong weights shows.

    08_quantization  check_int8_codes, check_int4_round_trip, check_nf4_codes
"""

from collections.abc import Callable

import torch

from .exercises import Case, Verdict, _describe, run_check, same_as
from .quantize import NF4_LEVELS, QuantizedLinear, quantize_int8, quantize_nf4


def _weights(n: int, k: int) -> torch.Tensor:
    """A weight [n, k]: normal rows scaled from 0.01 to 1, and one outlier 20 times its row's size."""
    w = torch.randn(n, k) * torch.logspace(-2, 0, n)[:, None]  # [n, k]
    w[n // 3, k // 2] = 20 * w[n // 3].abs().max()
    return w


def _cases(group_sizes: tuple[int, ...] = ()) -> Callable[[], list[Case]]:
    """The check's inputs: two weights, each with every group size asked for (none for int8)."""
    def cases():
        shapes = [(16, 64), (32, 128)]
        if not group_sizes:
            return [Case(_describe("W", torch.empty(s)) + ", rows of different sizes", (_weights(*s),)) for s in shapes]
        return [Case(_describe("W", torch.empty(s)) + f", groups of {g}", (_weights(*s), g))
                for s in shapes for g in group_sizes]
    return cases


# ---------------------------------------------------------------------------------------------
# int8, absmax per output channel

def _int8_codes(w: torch.Tensor) -> torch.Tensor:
    return quantize_int8(w, torch.float32)[0]  # [N, K]


def _int8_with(w: torch.Tensor, scale: torch.Tensor, rounding=torch.round) -> torch.Tensor:
    return rounding(w / scale).clamp(-127, 127).to(torch.int8)  # [N, K]


def check_int8_codes(fn: Callable) -> Verdict:
    """fn(weight [N, K] float32) -> codes int8 [N, K]: absmax per output channel, the scale of
    row n being max|W[n]| / 127 and its codes round(W[n] / scale). Reference:
    quantize.quantize_int8 with float32 scales."""
    mistakes = [
        same_as(lambda w: _int8_with(w, w.abs().amax(1, keepdim=True)),
                "the scale is max|W| / 127, not max|W|: the largest weight must get code 127, not 1"),
        same_as(lambda w: _int8_with(w, w.abs().max() / 127),
                "one scale for the whole matrix (per tensor): each output row gets its own, max|W[n]| / 127"),
        same_as(lambda w: _int8_with(w, w.abs().amax(0, keepdim=True) / 127),
                "your scales are per input column (dim 0); per output channel means one per row (dim 1)"),
        same_as(lambda w: _int8_with(w, w.abs().amax(1, keepdim=True) / 127, torch.trunc),
                "round to the nearest code; .to(torch.int8) alone truncates towards zero"),
        same_as(lambda w: _int8_with(w, w.amax(1, keepdim=True) / 127),
                "the scale comes from the largest |W|, max of the absolute values, not the largest W"),
    ]
    return run_check(fn, _int8_codes, _cases(), mistakes=mistakes, axes=("row", "col"),
                     passes="equal to minipaligemma.quantize.quantize_int8 on 2 weights with outliers")


# ---------------------------------------------------------------------------------------------
# int4 affine in groups, quantized then dequantized

def _int4_round_trip(w: torch.Tensor, group_size: int) -> torch.Tensor:
    layer = QuantizedLinear(w.shape[1], w.shape[0], "int4", group_size)
    layer.quantize_(w)
    return layer.dequantize()  # [N, K]


def _affine_by_groups(w: torch.Tensor, g: int, zero_sign: int = 1, rounding=torch.round) -> torch.Tensor:
    """Affine int4 round trip over groups of g along the rows, with a knob for each mistake."""
    groups = w.view(w.shape[0], -1, g)  # [N, K / g, g]
    low = groups.amin(-1, keepdim=True).clamp(max=0)  # [N, K / g, 1]
    high = groups.amax(-1, keepdim=True).clamp(min=0)  # [N, K / g, 1]
    scale = (high - low) / 15
    zero = (-zero_sign * low / scale).round().clamp(0, 15)
    codes = rounding(groups / scale + zero).clamp(0, 15)
    return ((codes - zero) * scale).flatten(1)  # [N, K]


def check_int4_round_trip(fn: Callable) -> Verdict:
    """fn(weight [N, K] float32, group_size G) -> the weight [N, K] after affine int4
    quantization in groups of G consecutive inputs of a row (K a multiple of G) and back:
    per group, low = min(min W, 0), high = max(max W, 0), scale s = (high - low) / 15, zero
    point z = round(-low / s), codes q = clamp(round(W / s + z), 0, 15), W ~ (q - z) * s.
    Reference: quantize.QuantizedLinear("int4").quantize_ then dequantize, float32 scales."""
    def columns(w, g):  # groups of g consecutive outputs (down a column) instead of inputs
        return _affine_by_groups(w.T.contiguous(), g).T

    mistakes = [
        same_as(lambda w, g: _affine_by_groups(w, g, zero_sign=-1),
                "the zero point is the code of the value 0: z = round(-low / s), not round(low / s)"),
        same_as(columns, "your groups run down the columns (outputs); a group is G consecutive inputs of one row"),
        same_as(lambda w, g: _affine_by_groups(w, w.shape[1]),
                "one scale per row: the groups are G wide, so that an outlier spoils only its own group"),
        same_as(lambda w, g: _affine_by_groups(w, g, rounding=torch.floor),
                "round to the nearest code; floor (or .to(torch.uint8)) truncates"),
    ]
    return run_check(fn, _int4_round_trip, _cases((16, 32)), mistakes=mistakes, axes=("row", "col"),
                     passes="equal to minipaligemma.quantize's affine int4 on 2 weights, groups of 16 and 32")


# ---------------------------------------------------------------------------------------------
# NF4 codes

def _nf4_codes(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return quantize_nf4(w, group_size, torch.float32)[0].flatten(1).long()  # [N, K]


def _nearest(normed: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return (normed[..., None] - levels).abs().argmin(-1)  # [...], index of the nearest level


def _nf4_by_groups(w: torch.Tensor, g: int, levels: torch.Tensor = NF4_LEVELS, columns: bool = False,
                   assign: Callable = _nearest) -> torch.Tensor:
    """NF4 codes with groups of g along the rows (or, wrongly, down the columns), each value
    given a level by `assign(normed, levels)`."""
    if columns:
        return _nf4_by_groups(w.T.contiguous(), g, levels).T
    groups = w.view(w.shape[0], -1, g)  # [N, K / g, g]
    return assign(groups / groups.abs().amax(-1, keepdim=True), levels).flatten(1)  # [N, K]


def check_nf4_codes(fn: Callable) -> Verdict:
    """fn(weight [N, K] float32, group_size G) -> NF4 codes int64 [N, K] (0..15): each group of
    G consecutive inputs of a row divided by its absmax, then the index of the nearest of the 16
    levels quantize.NF4_LEVELS. Reference: quantize.quantize_nf4."""
    uniform = torch.linspace(-1, 1, 16)
    mistakes = [
        same_as(lambda w, g: _nf4_by_groups(w, g, uniform),
                "those are 16 evenly spaced levels; NF4's levels are NF4_LEVELS, dense near 0"),
        same_as(lambda w, g: _nf4_by_groups(w, g, columns=True),
                "your groups run down the columns (outputs); a group is G consecutive inputs of one row"),
        same_as(lambda w, g: _nf4_by_groups(w, w.shape[1]),
                "one absmax per row: each group of G is divided by its own absmax"),
        same_as(lambda w, g: _nf4_by_groups(w, g, assign=torch.bucketize),
                "that is the first level at or above the value, not the nearest one (compare with the midpoints)"),
    ]
    return run_check(fn, _nf4_codes, _cases((16, 32)), mistakes=mistakes, axes=("row", "col"),
                     passes="equal to minipaligemma.quantize.quantize_nf4 on 2 weights, groups of 16 and 32")
