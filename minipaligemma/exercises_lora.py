"""Exercise checks for notebook 07 (fine-tuning with LoRA).

The learner writes a LoRA layer as a class, `MyLoRA(base: nn.Linear, rank, alpha, dropout=0.0)`
with the attributes `base`, `lora_a` [rank, in] and `lora_b` [out, rank] (lora.py's names), and
a merge function; each check builds the learner's layer and the package's `lora.LoRALinear` on
the same base and inputs and compares them with exercises.py's `run_check`, so the verdict is one
line in the same form as the other notebooks':

    passes: equal to minipaligemma.lora.LoRALinear at init: B A is zero, the base is unchanged

or which input, what differs and, for a known mistake, which one. Known mistakes are written
beside each check. A check never changes the caller's random state.

    07_finetuning_lora  check_lora_init, check_lora_forward, check_lora_merge
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .exercises import Case, Mistake, Verdict, _first_line, run_check, same_as
from .lora import LoRALinear

IN, OUT = 24, 16  # not square, so that A and B or in and out swapped show as a wrong shape or value


def _base(seed: int = 1) -> nn.Linear:
    """A linear layer with a bias, its own weights whatever the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(IN, OUT)


def _layer(cls: Callable, base: nn.Linear, rank: int, alpha: float, dropout: float,
           a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> nn.Module:
    """cls(base, rank, alpha, dropout), with A and B set to `a` and `b` when given."""
    layer = cls(base, rank, alpha, dropout)
    if a is not None:
        layer.lora_a.copy_(a)
        layer.lora_b.copy_(b)
    return layer


# ---------------------------------------------------------------------------------------------
# At init: the wrapped layer computes exactly what the base did, and only A and B train.

def _trainable_problem(cls: Callable) -> str | None:
    """What is wrong with what trains in cls's layer (only lora_a [r, in] and lora_b [out, r]),
    or None. Checked outside no_grad, since requires_grad is what it reads."""
    layer = cls(_base(), 4, 8.0, 0.0)
    trainable = {name: list(p.shape) for name, p in layer.named_parameters() if p.requires_grad}
    if any(name.startswith("base.") for name in trainable):
        return (f"the base's {', '.join(n for n in trainable if n.startswith('base.'))} train too — freeze the base "
                "(base.requires_grad_(False)): only A and B train")
    if trainable != {"lora_a": [4, IN], "lora_b": [OUT, 4]}:
        return f"the trainable parameters should be lora_a [4, {IN}] and lora_b [{OUT}, 4], found {trainable}"
    if not layer.lora_a.detach().abs().sum() > 0:
        return ("lora_a is all zeros: with A and B both zero, neither ever gets a gradient — "
                "start A at random (nn.Linear's init) and B at zero")
    return None


def check_lora_init(cls: Callable) -> Verdict:
    """cls(base: nn.Linear, rank, alpha, dropout=0.0) -> a module whose output right after
    construction equals base(x) exactly (B starts at zero), whose only trainable parameters are
    lora_a [rank, in] (random) and lora_b [out, rank]. Reference: base(x) itself, the function
    lora.LoRALinear computes at init."""
    def cases():
        return [Case(f"x [5, {IN}], rank {r}, alpha {alpha}", (torch.randn(5, IN), r, alpha)) for r, alpha in ((4, 8.0), (2, 2.0))]

    def yours(x, rank, alpha):
        return cls(_base(), rank, alpha, 0.0).eval()(x)

    mistakes = [Mistake("the output moved at init: B must start at zero so that B A x is zero and the wrapped layer "
                        "computes exactly what the base did (A random, B zero)",
                        lambda case, got: got.shape == (5, OUT))]
    with torch.random.fork_rng(devices=[]):
        try:
            problem = _trainable_problem(cls)
        except Exception as error:  # the learner's class may raise anything: say what
            problem = f"your class raised {_first_line(error)}"
    verdict = run_check(yours, lambda x, rank, alpha: _base()(x), cases, mistakes=mistakes, axes=("row", "channel"),
                        passes="equal to the base at init (B A = 0); only lora_a and lora_b train")
    if verdict.passed and problem is not None:
        return Verdict(f"rank 4, alpha 8: {problem}")
    return verdict


# ---------------------------------------------------------------------------------------------
# The forward pass: W x + b + (alpha / r) B A dropout(x), dropout in training only.

def check_lora_forward(cls: Callable) -> Verdict:
    """cls(base, rank, alpha, dropout) with given A and B computes W x + b + (alpha / rank) B (A
    dropout(x)): dropout (nn.Dropout or F.dropout, called once on x) on the input of A only, and
    only in training mode. Training mode is compared under the same seed as the reference.
    Reference: minipaligemma.lora.LoRALinear."""
    def cases():
        a, b = torch.randn(4, IN) * 0.3, torch.randn(OUT, 4) * 0.3
        x = torch.randn(6, IN)
        return [Case(f"x [6, {IN}], rank 4, alpha 8, eval mode", (x, a, b, 4, 8.0, 0.0, False)),
                Case(f"x [6, {IN}], rank 4, alpha 8, dropout 0.5, eval mode", (x, a, b, 4, 8.0, 0.5, False)),
                Case(f"x [6, {IN}], rank 4, alpha 8, dropout 0.5, training mode", (x, a, b, 4, 8.0, 0.5, True))]

    def run(make: Callable, x, a, b, rank, alpha, dropout, training):
        layer = _layer(make, _base(), rank, alpha, dropout, a, b).train(training)
        torch.manual_seed(7)  # the same dropout mask for yours and the reference
        return layer(x)

    def written(x, a, b, rank, alpha, dropout, training, scale=None, where="input", p_eval=False):
        """The layer by hand, with the known mistakes as options."""
        base = _base()
        scale = alpha / rank if scale is None else scale
        torch.manual_seed(7)
        drop = lambda t: F.dropout(t, dropout, training or p_eval)  # noqa: E731
        if where == "input":
            return base(x) + scale * drop(x) @ a.T @ b.T
        if where == "correction":
            return base(x) + drop(scale * x @ a.T @ b.T)
        return drop(base(x) + scale * x @ a.T @ b.T)  # the whole output

    mistakes = [
        same_as(lambda *c: written(*c, scale=c[4]), "scale the correction by alpha / rank, not alpha"),
        same_as(lambda *c: written(*c, scale=1.0), "did you forget the scale alpha / rank?"),
        same_as(lambda *c: written(*c, scale=c[3] / c[4]), "the scale is alpha / rank, not rank / alpha"),
        same_as(lambda *c: written(*c, p_eval=True),
                "dropout must be off in eval mode: use nn.Dropout (it follows .train() / .eval()) or F.dropout(x, p, self.training)"),
        same_as(lambda *c: written(*c, where="correction"),
                "dropout goes on the input of A (x), not on the correction B A x"),
        same_as(lambda *c: written(*c, where="output"),
                "dropout goes on the input of A only: the frozen path W x must see the clean input"),
    ]
    return run_check(lambda *c: run(cls, *c), lambda *c: run(LoRALinear, *c), cases, mistakes=mistakes,
                     axes=("row", "channel"),
                     passes="equal to minipaligemma.lora.LoRALinear with and without dropout, in eval and training mode")


# ---------------------------------------------------------------------------------------------
# Merging: one weight that computes what the adapted layer did.

def check_lora_merge(fn: Callable) -> Verdict:
    """fn(weight [out, in], lora_a [r, in], lora_b [out, r], alpha, rank) -> the merged weight
    [out, in], W + (alpha / rank) B A. Reference: LoRALinear(...).merged().weight (lora.py)."""
    def cases():
        out = []
        for (o, i), r, alpha in (((12, 12), 3, 12.0), ((OUT, IN), 4, 8.0)):  # square first: a transpose still adds
            out.append(Case(f"W [{o}, {i}], rank {r}, alpha {alpha}",
                            (torch.randn(o, i), torch.randn(r, i), torch.randn(o, r), alpha, r)))
        return out

    def reference(w, a, b, alpha, rank):
        base = nn.Linear(w.shape[1], w.shape[0], bias=False)
        base.weight.copy_(w)
        return _layer(LoRALinear, base, rank, alpha, 0.0, a, b).merged().weight.detach()

    def square(mistake: Mistake) -> Mistake:  # a transposed update fits a square W only
        return Mistake(mistake.hint, lambda case, got: case.args[0].shape[0] == case.args[0].shape[1]
                       and mistake.matches(case, got))

    mistakes = [
        square(same_as(lambda w, a, b, alpha, r: w + alpha / r * (a.T @ b.T),
                       "the update is B @ A, [out, r] @ [r, in]: A.T @ B.T is its transpose")),
        same_as(lambda w, a, b, alpha, r: w + b @ a, "did you forget the scale alpha / rank?"),
        same_as(lambda w, a, b, alpha, r: w + alpha * (b @ a), "scale B @ A by alpha / rank, not alpha"),
        same_as(lambda w, a, b, alpha, r: alpha / r * (b @ a), "the merged weight is W plus the update, not the update alone"),
    ]
    return run_check(fn, reference, cases, mistakes=mistakes, axes=("row", "col"),
                     passes="equal to minipaligemma.lora.LoRALinear.merged, square and not")
