"""Held-out evaluation: greedy answers on each task's fixed held-out set, scored by its metric.

Each stage of a run ends with this evaluation of every task, printed as a table (stages as
rows) and written to the stage's metrics.json. The held-out scenes come from the world's
"eval" split, which training never reads.
"""

from .data import TASKS, Example, World
from .generate import generate
from .paligemma import PaliGemma
from .tasks import TaskObject, cider_d, count_detections, exact_match, mean_iou, parse_detections, parse_segmentations
from .tokenizer import Tokenizer


def _score(task: str, answers: list[str], examples: list[Example], vqvae) -> float:
    """The task's metric: CIDEr (caption, describe), accuracy (answer, ocr), F1 at IoU 0.5
    (detect), mean IoU (segment)."""
    if task in ("caption", "describe"):
        return cider_d(answers, [[e.suffix] for e in examples])
    if task in ("answer", "ocr"):
        return sum(exact_match(a, e.suffix) for a, e in zip(answers, examples)) / len(examples)
    size = examples[0].image.size[::-1]
    if task == "detect":
        total = None
        for answer, e in zip(answers, examples):
            truth = [TaskObject(label=label, box=box) for label, box in zip(e.labels, e.boxes)]
            counts = count_detections(parse_detections(answer, size), truth)
            total = counts if total is None else total + counts
        precision, recall = total.precision, total.recall
        return 2 * precision * recall / max(precision + recall, 1e-9)
    predictions = []
    for answer, e in zip(answers, examples):
        valid = [o for o in parse_segmentations(answer, size, vqvae) if o.valid]
        predictions.append(valid[0].mask if valid else None)
    return mean_iou(predictions, [e.masks[0] for e in examples])


METRIC_NAMES = {"caption": "CIDEr", "describe": "CIDEr", "answer": "accuracy", "ocr": "accuracy",
                "detect": "F1@0.5", "segment": "mIoU"}


def evaluate(model: PaliGemma, tokenizer: Tokenizer, world: World, size: int, n: int, vqvae,
             tasks=TASKS) -> dict[str, float]:
    """Each task's metric on its first n held-out scenes, greedy decoding at `size` px."""
    model.eval()
    results = {}
    for task in tasks:
        examples = world.eval_set(task, size, n)
        longest = max(len(tokenizer.encode(e.suffix)) for e in examples) + 2
        answers = generate(model, tokenizer, [e.image for e in examples], [e.prefix for e in examples],
                           max_new_tokens=longest)
        results[task] = _score(task, answers, examples, vqvae)
    model.train()
    return results


def metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """Stages as rows, tasks as columns."""
    tasks = [t for t in TASKS if any(t in r for r in rows.values())]
    head = f"{'stage':<10}" + "".join(f"{t + ' ' + METRIC_NAMES[t]:>20}" for t in tasks)
    lines = [head] + [f"{stage:<10}" + "".join(f"{r[t]:>20.3f}" if t in r else f"{'-':>20}" for t in tasks)
                      for stage, r in rows.items()]
    return "\n".join(lines)
