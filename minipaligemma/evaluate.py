"""Held-out evaluation: greedy answers on each task's fixed held-out set, scored by its metric.

Each stage of a run ends with this evaluation of every task, printed as a table (stages as
rows) and written to the stage's metrics.json. Beside each task's metric come two finer views
that a single number hides: the share of captions that are exactly right ("caption exact"), and
the answer accuracy per kind of question ("answer colour", ...), since a model can score well
on average while never answering one kind. The held-out scenes come from the world's "eval"
split, which training never reads.
"""

from .data import QUESTION_KINDS, TASKS, Example, World, question_kind
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


def details(task: str, answers: list[str], examples: list[Example]) -> dict[str, float]:
    """The finer views: exact captions, and answer accuracy per question kind present."""
    right = [exact_match(a, e.suffix) for a, e in zip(answers, examples)]
    if task == "caption":
        return {"caption exact": sum(right) / len(right)}
    if task != "answer":
        return {}
    kinds = [question_kind(e.prefix) for e in examples]
    return {f"answer {kind}": sum(r for r, k in zip(right, kinds) if k == kind) / kinds.count(kind)
            for kind in QUESTION_KINDS if kind in kinds}


METRIC_NAMES = {"caption": "CIDEr", "describe": "CIDEr", "answer": "accuracy", "ocr": "accuracy",
                "detect": "F1@0.5", "segment": "mIoU"}
DETAIL_NAMES = ("caption exact", *(f"answer {kind}" for kind in QUESTION_KINDS))


def evaluate(model: PaliGemma, tokenizer: Tokenizer, world: World, size: int, n: int, vqvae,
             tasks=TASKS) -> dict[str, float]:
    """Each task's metric on its first n held-out scenes, greedy decoding at `size` px, and
    the finer views of caption and answer (DETAIL_NAMES)."""
    model.eval()
    results = {}
    for task in tasks:
        examples = world.eval_set(task, size, n)
        longest = max(len(tokenizer.encode(e.suffix)) for e in examples) + 2
        answers = generate(model, tokenizer, [e.image for e in examples], [e.prefix for e in examples],
                           max_new_tokens=longest)
        results[task] = _score(task, answers, examples, vqvae)
        results.update(details(task, answers, examples))
    model.train()
    return results


def _table(rows: dict[str, dict[str, float]], keys: list[str], headings: list[str]) -> str:
    head = f"{'stage':<10}" + "".join(f"{h:>20}" for h in headings)
    lines = [head] + [f"{stage:<10}" + "".join(f"{r[k]:>20.3f}" if k in r else f"{'-':>20}" for k in keys)
                      for stage, r in rows.items()]
    return "\n".join(lines)


def metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """Stages as rows, tasks as columns; then, where present, the finer views in a second table."""
    tasks = [t for t in TASKS if any(t in r for r in rows.values())]
    table = _table(rows, tasks, [f"{t} {METRIC_NAMES[t]}" for t in tasks])
    details = [d for d in DETAIL_NAMES if any(d in r for r in rows.values())]
    return table + ("\n" + _table(rows, details, details) if details else "")
