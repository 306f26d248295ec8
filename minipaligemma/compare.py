"""Layer-by-layer comparison of two implementations on the same input.

When two models disagree at the output, the question is where the disagreement starts. This
module records the output of chosen layers in both models (with forward hooks, so neither
model is changed), lines them up in pairs, and reports each pair's largest absolute difference
and relative error ‖ours − ref‖ / ‖ref‖. The first pair over the tolerance is where to look:
everything before it agrees, so the bug lies in that layer.

    report = compare_layers(ours, ref, paligemma_hf_layer_pairs(ours.config),
                            run_ours=lambda m: m(pixels, ids, mask_ar),
                            run_ref=lambda m: m(pixel_values=pixels, input_ids=hf_ids, ...))
    print(report)                 # a table, the first divergence marked
    report.first_divergence       # None when every layer agrees

The reference can be anything with named submodules: transformers, or a learner's own model.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerDiff:
    """How one layer of ours differs from its counterpart in the reference."""

    ours: str
    ref: str
    max_abs: float  # largest |ours - ref|, inf when shapes differ
    rel: float  # ||ours - ref|| / ||ref||, inf when shapes differ
    shape: tuple  # our output's shape


@dataclass
class Report:
    """The per-layer differences, in forward order, and the tolerance that judges them."""

    rows: list[LayerDiff]
    tol: float

    @property
    def first_divergence(self) -> LayerDiff | None:
        """The first layer whose relative error exceeds the tolerance (None if all agree)."""
        return next((row for row in self.rows if not row.rel <= self.tol), None)

    def __str__(self) -> str:
        first = self.first_divergence
        width = max([len(r.ours) for r in self.rows] + [5])
        lines = [f"{'layer':<{width}}  {'max |diff|':>10}  {'rel err':>9}  reference layer"]
        for row in self.rows:
            flag = "  <-- first divergence" if row is first else ""
            lines.append(f"{row.ours:<{width}}  {row.max_abs:10.3e}  {row.rel:9.2e}  {row.ref}{flag}")
        verdict = "all layers agree" if first is None else f"first divergence at {first.ours}"
        lines.append(f"{verdict} (tolerance {self.tol:g} relative)")
        return "\n".join(lines)


def capture_outputs(model: nn.Module, names: list[str], run) -> dict[str, torch.Tensor]:
    """Call `run(model)` and return the output of each named submodule (the first element of
    a tuple output), detached and in float64 for a fair comparison."""
    outputs, handles = {}, []

    def hook_for(name):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            outputs[name] = tensor.detach().to(torch.float64)
        return hook

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(hook_for(name)))
        with torch.no_grad():
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in outputs]
    if missing:
        raise ValueError(f"these layers never ran: {missing}")
    return outputs


def compare_layers(ours: nn.Module, ref: nn.Module, pairs: list[tuple[str, str]], run_ours, run_ref,
                   tol: float = 1e-5) -> Report:
    """Run both models and compare the outputs of each (our layer, reference layer) pair."""
    ours_out = capture_outputs(ours, [a for a, _ in pairs], run_ours)
    ref_out = capture_outputs(ref, [b for _, b in pairs], run_ref)
    rows = []
    for a, b in pairs:
        x, y = ours_out[a], ref_out[b]
        if x.shape != y.shape:
            rows.append(LayerDiff(a, b, float("inf"), float("inf"), tuple(x.shape)))
            continue
        diff = x - y
        rel = (diff.norm() / y.norm().clamp(min=1e-30)).item()
        rows.append(LayerDiff(a, b, diff.abs().max().item(), rel, tuple(x.shape)))
    return Report(rows, tol)


def paligemma_hf_layer_pairs(config) -> list[tuple[str, str]]:
    """The layers of our PaliGemma and of transformers' PaliGemmaForConditionalGeneration (v5)
    that compute the same tensor, in forward order: every vision block, the final LayerNorm,
    the projector, every decoder block and the final RMSNorm."""
    pairs = [(f"vision.blocks.{i}", f"model.vision_tower.encoder.layers.{i}") for i in range(config.vision.depth)]
    pairs += [("vision.norm", "model.vision_tower.post_layernorm"), ("projector", "model.multi_modal_projector")]
    pairs += [(f"llm.layers.{i}", f"model.language_model.layers.{i}") for i in range(config.text.depth)]
    pairs.append(("llm.final_norm", "model.language_model.norm"))
    return pairs
