"""The LoRA exercise checks (minipaligemma/exercises_lora.py): each accepts a right answer and
rejects the wrong ones a learner is likely to write, naming the mistake.

The answers are written here as a learner would write them (a class with options for the
mistakes), not taken from lora.py nor from the checks' own mistake models, so a check that
accepted a wrong answer, rejected a right one or gave the wrong hint fails its test. The last
test runs the solutions committed in notebook 07 through their checks.
"""

from pathlib import Path

import nbformat
import torch
from torch import nn

from test_exercises import passes, rejects  # the verdict assertions of notebooks 01-03's checks

from minipaligemma import exercises_lora as ex

ROOT = Path(__file__).resolve().parent.parent


class Learner(nn.Module):
    """A learner's LoRA layer; each keyword turns on one mistake."""

    def __init__(self, base, rank, alpha, dropout=0.0, random_b=False, zero_a=False, trainable_base=False,
                 scale="alpha/r", dropout_on="input", dropout_always=False):
        super().__init__()
        self.base = base
        if not trainable_base:
            for p in self.base.parameters():
                p.requires_grad = False
        self.lora_a = nn.Parameter(torch.zeros(rank, base.in_features) if zero_a
                                   else torch.rand(rank, base.in_features) * 0.2 - 0.1)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank) if random_b else torch.zeros(base.out_features, rank))
        self.scale = {"alpha/r": alpha / rank, "alpha": alpha, "none": 1.0}[scale]
        self.p, self.dropout_on, self.dropout_always = dropout, dropout_on, dropout_always

    def drop(self, t):
        return nn.functional.dropout(t, self.p, self.training or self.dropout_always)

    def forward(self, x):
        if self.dropout_on == "input":
            return self.base(x) + self.scale * (self.drop(x) @ self.lora_a.T) @ self.lora_b.T
        update = self.scale * (x @ self.lora_a.T) @ self.lora_b.T
        if self.dropout_on == "update":
            return self.base(x) + self.drop(update)
        return self.drop(self.base(x) + update)  # "everything"


def learner(**mistakes):
    return lambda base, rank, alpha, dropout=0.0: Learner(base, rank, alpha, dropout, **mistakes)


def test_lora_init():
    assert passes(ex.check_lora_init(learner()))
    assert rejects(ex.check_lora_init(learner(random_b=True)), "moved at init", "B must start at zero")
    assert rejects(ex.check_lora_init(learner(trainable_base=True)), "base.weight", "freeze the base")
    assert rejects(ex.check_lora_init(learner(zero_a=True)), "lora_a is all zeros", "neither ever gets a gradient")

    class Misnamed(Learner):  # the adapters under other names: the check cannot find lora_a
        def __init__(self, base, rank, alpha, dropout=0.0):
            super().__init__(base, rank, alpha, dropout)
            self.a = self.lora_a
            del self.lora_a
    assert rejects(ex.check_lora_init(Misnamed), "raised AttributeError", "lora_a")


def test_lora_forward():
    assert passes(ex.check_lora_forward(learner()))
    assert rejects(ex.check_lora_forward(learner(scale="alpha")), "alpha / rank, not alpha")
    assert rejects(ex.check_lora_forward(learner(scale="none")), "forget the scale")
    assert rejects(ex.check_lora_forward(learner(dropout_always=True)), "eval mode", "off in eval mode")
    assert rejects(ex.check_lora_forward(learner(dropout_on="update")), "training mode", "not on the correction")
    assert rejects(ex.check_lora_forward(learner(dropout_on="everything")), "training mode", "clean input")


def merge(weight, a, b, alpha, rank, transposed=False, scale=True, alpha_only=False):
    update = (a.T @ b.T) if transposed else torch.einsum("or,ri->oi", b, a)
    factor = alpha if alpha_only else alpha / rank if scale else 1.0
    return weight + factor * update


def test_lora_merge():
    assert passes(ex.check_lora_merge(merge))
    assert rejects(ex.check_lora_merge(lambda *c: merge(*c, transposed=True)), "W [12, 12]", "A.T @ B.T is its transpose")
    rectangular_only = lambda w, a, b, alpha, r: merge(w, a, b, alpha, r, scale=w.shape[0] == w.shape[1])  # noqa: E731
    assert rejects(ex.check_lora_merge(rectangular_only), "W [16, 24]", "forget the scale")
    assert rejects(ex.check_lora_merge(lambda *c: merge(*c, scale=False)), "forget the scale")
    assert rejects(ex.check_lora_merge(lambda *c: merge(*c, alpha_only=True)), "alpha / rank, not alpha")


def test_checks_keep_the_callers_random_state_and_give_the_same_verdict():
    before = torch.random.get_rng_state()
    first = ex.check_lora_forward(learner(dropout_on="update"))
    assert ex.check_lora_init(learner(random_b=True)) and ex.check_lora_merge(merge)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert ex.check_lora_forward(learner(dropout_on="update")) == first


def test_notebook_solutions_pass_their_checks():
    notebook = nbformat.read(ROOT / "notebooks" / "07_finetuning_lora.ipynb", as_version=4)
    cells = notebook.cells
    found = [(c.source.splitlines()[0], cells[i + 1].source, cells[i + 2].source) for i, c in enumerate(cells)
             if c.cell_type == "markdown" and c.source.lstrip("# ").startswith("Exercise")]
    assert len(found) >= 3
    namespace = {}
    exec(compile(next(c.source for c in cells if c.cell_type == "code"), "first cell", "exec"), namespace)  # noqa: S102
    for title, solution, check in found:
        assert "check_" in check, title
        exec(compile(solution, title, "exec"), namespace)  # noqa: S102
        verdict = eval(compile(check.strip().removeprefix("print(").removesuffix(")"), title, "eval"), namespace)  # noqa: S307
        assert verdict.passed, f"{title}: {verdict}"
