"""Pictures of a training run, readable at a glance (matplotlib, no display needed).

- `stage_figure`: one stage. The loss per step, raw and faint, with a moving average over it;
  the smoothed loss of each task of the mixture; the learning rate of each parameter group;
  and the stage's held-out metrics.
- `stages_figure`: the whole run. Each task's held-out metric after each stage, side by side,
  so that what each stage changes (stage 2's resolution, stage 3's transfer) is visible.

Both take the records that `loop.fit` writes to its JSONL log and the metrics of
`evaluate.evaluate`, and return a matplotlib Figure; `save_figure` writes it atomically.
The figures are built with matplotlib's object API (Figure + the Agg canvas), which needs no
global backend setting.
"""

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .evaluate import METRIC_NAMES
from .files import atomic_write


def smooth(values: list[float], window: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps, moving average over `window` steps), each point at the last step it averages."""
    values = np.asarray(values, dtype=float)
    window = max(1, min(window, len(values)))
    averaged = np.convolve(values, np.ones(window) / window, mode="valid")  # [len(values) - window + 1]
    return np.arange(window - 1, len(values)), averaged


def stage_figure(records: list[dict], title: str, metrics: dict[str, float] | None = None) -> Figure:
    """Loss (raw and smoothed), loss per task, learning rates and held-out metrics of one stage."""
    steps = np.array([r["step"] for r in records])
    losses = [r["loss"] for r in records]
    window = max(5, len(records) // 40)
    panels = 3 if metrics else 2
    fig = Figure(figsize=(4.2 * panels, 3.4), dpi=110, layout="constrained")
    axes = fig.subplots(1, panels)
    fig.suptitle(f"{title}: loss {losses[0]:.3f} -> {np.mean(losses[-window:]):.3f} over {len(losses)} steps")

    ax = axes[0]
    ax.plot(steps, losses, color="0.6", alpha=0.35, linewidth=0.8, label="loss per step")
    at, averaged = smooth(losses, window)
    ax.plot(steps[at], averaged, color="black", linewidth=1.6, label=f"mean of {window} steps")
    tasks = sorted({task for r in records for task in r["task_losses"]})
    for i, task in enumerate(tasks):
        seen = [(r["step"], r["task_losses"][task]) for r in records if task in r["task_losses"]]
        at, averaged = smooth([v for _, v in seen], window)
        ax.plot(np.array([s for s, _ in seen])[at], averaged, color=f"C{i}", linewidth=1.0, label=task)
    ax.set(xlabel="step", ylabel="training loss (cross-entropy per token)", title="loss")
    ax.legend(fontsize=7, ncols=2)

    ax = axes[1]
    for name in records[0]["lr"]:
        ax.plot(steps, [r["lr"][name] for r in records], label=name)
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate per parameter group")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.legend(fontsize=7)

    if metrics:
        ax = axes[2]
        names = [n for n in metrics if n in METRIC_NAMES]  # the tasks' metrics, not the finer views
        bars = ax.bar(names, [metrics[n] for n in names], color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(names)), [f"{n}\n{METRIC_NAMES[n]}" for n in names], fontsize=7)
        ax.set(ylabel="held-out metric", title="held-out metrics at the end of the stage")
    return fig


def stages_figure(metrics: dict[str, dict[str, float]]) -> Figure:
    """Each task's held-out metric after each stage: one group of bars per task."""
    stages = list(metrics)
    tasks = [t for t in METRIC_NAMES if any(t in m for m in metrics.values())]
    fig = Figure(figsize=(2 + 1.4 * len(tasks), 3.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(stages)
    for i, stage in enumerate(stages):
        x = np.arange(len(tasks)) + (i - (len(stages) - 1) / 2) * width
        ax.bar(x, [metrics[stage].get(t, np.nan) for t in tasks], width=width, label=stage, color=f"C{i}")
    ax.set_xticks(range(len(tasks)), [f"{t}\n{METRIC_NAMES[t]}" for t in tasks])
    ax.set(ylabel="held-out metric", title="held-out metrics after each stage")
    ax.legend(fontsize=8)
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    """Render `fig` to a PNG at `path`, atomically."""
    FigureCanvasAgg(fig)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
