"""The quantization exercise checks (minipaligemma/exercises_quantize.py): each accepts a right
answer and rejects the wrong ones a learner is likely to write, naming the mistake.

The answers below are written here the way a learner would write them (not taken from the
package or from the mistake models inside the checks). The last test runs the solutions
committed in notebook 08 through their checks.
"""

from pathlib import Path

import nbformat
import torch
from test_exercises import exercises_of, passes, rejects  # the exercise format and verdict assertions of notebooks 01-03

from minipaligemma import exercises_quantize as ex
from minipaligemma.quantize import NF4_LEVELS

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------- int8

def int8_codes(w, divisor=127.0, axis=1, absolute=True, rounding=torch.round):
    size = w.abs() if absolute else w
    if axis is None:
        scale = size.max() / divisor
    else:
        scale = size.max(dim=axis, keepdim=True).values / divisor
    return rounding(w / scale).clamp(-127, 127).to(torch.int8)


def test_int8_codes():
    assert passes(ex.check_int8_codes(int8_codes))
    assert rejects(ex.check_int8_codes(lambda w: int8_codes(w, divisor=1.0)), "not max|W|")
    assert rejects(ex.check_int8_codes(lambda w: int8_codes(w, axis=None)), "per tensor")
    assert rejects(ex.check_int8_codes(lambda w: int8_codes(w, axis=0)), "per input column")
    assert rejects(ex.check_int8_codes(lambda w: int8_codes(w, rounding=lambda x: x)), "truncates")
    assert rejects(ex.check_int8_codes(lambda w: int8_codes(w, absolute=False)), "absolute values")
    assert rejects(ex.check_int8_codes(lambda w: int8_codes(w).float()), "dtype torch.float32 where torch.int8")
    assert rejects(ex.check_int8_codes(lambda w: int8_codes(w)[:, :-1]), "shape")


# ------------------------------------------------------------------------------- int4 affine

def int4_round_trip(w, g, zero_sign=1.0, transpose=False, rounding=torch.round):
    if transpose:
        return int4_round_trip(w.t().contiguous(), g).t()
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], g):
        group = w[:, start:start + g]
        low = torch.minimum(group.min(dim=1, keepdim=True).values, torch.zeros(1))
        high = torch.maximum(group.max(dim=1, keepdim=True).values, torch.zeros(1))
        s = (high - low) / 15
        z = torch.round(-zero_sign * low / s).clamp(0, 15)
        q = torch.clamp(rounding(group / s + z), 0, 15)
        out[:, start:start + g] = (q - z) * s
    return out


def test_int4_round_trip():
    assert passes(ex.check_int4_round_trip(int4_round_trip))
    assert rejects(ex.check_int4_round_trip(lambda w, g: int4_round_trip(w, g, zero_sign=-1.0)), "zero point")
    assert rejects(ex.check_int4_round_trip(lambda w, g: int4_round_trip(w, g, transpose=True)), "down the columns")
    assert rejects(ex.check_int4_round_trip(lambda w, g: int4_round_trip(w, w.shape[1])), "one scale per row")
    assert rejects(ex.check_int4_round_trip(lambda w, g: int4_round_trip(w, g, rounding=torch.floor)), "truncates")
    assert rejects(ex.check_int4_round_trip(lambda w, g: w.clone()), "wrong value")  # no quantization at all


# ------------------------------------------------------------------------------- NF4

def nf4_codes(w, g, levels=NF4_LEVELS, transpose=False, nearest=True):
    if transpose:
        return nf4_codes(w.t().contiguous(), g, levels).t()
    n, k = w.shape
    groups = w.reshape(n, k // g, g)
    normed = groups / groups.abs().max(dim=2, keepdim=True).values
    if nearest:
        codes = (normed.unsqueeze(-1) - levels).abs().argmin(dim=-1)
    else:  # the first level at or above
        codes = (normed.unsqueeze(-1) > levels).sum(dim=-1)
    return codes.reshape(n, k)


def test_nf4_codes():
    assert passes(ex.check_nf4_codes(nf4_codes))
    assert rejects(ex.check_nf4_codes(lambda w, g: nf4_codes(w, g, levels=torch.linspace(-1, 1, 16))), "evenly spaced")
    assert rejects(ex.check_nf4_codes(lambda w, g: nf4_codes(w, g, transpose=True)), "down the columns")
    assert rejects(ex.check_nf4_codes(lambda w, g: nf4_codes(w, w.shape[1])), "one absmax per row")
    assert rejects(ex.check_nf4_codes(lambda w, g: nf4_codes(w, g, nearest=False)), "not the nearest")
    assert rejects(ex.check_nf4_codes(lambda w, g: nf4_codes(w, g).to(torch.uint8)), "dtype torch.uint8 where torch.int64")


def test_a_raising_answer_is_reported_on_one_line():
    assert rejects(ex.check_nf4_codes(lambda w, g: w.view(-1, 7)), "your function raised RuntimeError")


def test_checks_leave_the_random_state_alone_and_repeat_their_verdict():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    wrong = lambda w: int8_codes(w, axis=None)  # noqa: E731
    first = ex.check_int8_codes(wrong)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert ex.check_int8_codes(wrong) == first


# ------------------------------------------------------------------------------- notebook 08

def test_notebook_solutions_pass_their_checks():
    """Each exercise of notebook 08: its committed solution, run after the first cell, passes its check."""
    name = "08_quantization.ipynb"
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    found = exercises_of(notebook)
    assert len(found) >= 3, f"{name} has {len(found)} exercises"
    namespace = {}
    imports = next(c.source for c in notebook.cells if c.cell_type == "code")
    exec(compile(imports, f"{name} (first cell)", "exec"), namespace)  # noqa: S102
    for title, solution, check in found:
        assert "check_" in check, f"{title}: the cell after the solution calls no check"
        exec(compile(solution, f"{name} {title}", "exec"), namespace)  # noqa: S102
        verdict = eval(compile(check.strip().rstrip(";"), f"{name} {title} (check)", "eval"), namespace)  # noqa: S307
        assert verdict.passed, f"{title}: {verdict}"
