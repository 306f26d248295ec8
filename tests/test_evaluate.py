"""The held-out evaluation's finer views: exact captions and answer accuracy per question kind."""

from minipaligemma.data import QUESTION_KINDS, World, question_kind
from minipaligemma.evaluate import DETAIL_NAMES, details, metrics_table


def test_answer_accuracy_is_split_by_question_kind():
    examples = World(seed=1).eval_set("answer", 16, 60)
    kinds = [question_kind(e.prefix) for e in examples]
    assert set(kinds) == set(QUESTION_KINDS)  # 60 scenes ask every kind
    answers = [e.suffix if k == "colour" else "purple" for e, k in zip(examples, kinds)]  # only colours right
    views = details("answer", answers, examples)
    assert views["answer colour"] == 1.0
    assert all(views[f"answer {k}"] == 0.0 for k in QUESTION_KINDS if k not in ("colour",))


def test_exact_captions_count_whole_captions_only():
    examples = World(seed=2).eval_set("caption", 16, 4)
    answers = [examples[0].suffix, examples[1].suffix + " and a red circle", examples[2].suffix, ""]
    assert details("caption", answers, examples) == {"caption exact": 0.5}
    assert details("ocr", answers, examples) == {}


def test_the_table_shows_the_finer_views_below_the_tasks():
    table = metrics_table({"stage 1": {"ocr": 0.25, "answer count": 0.5}, "stage 2": {"ocr": 0.75}})
    lines = table.splitlines()
    assert lines[0].split() == ["stage", "ocr", "accuracy"] and lines[1].split() == ["stage", "1", "0.250"]
    assert lines[3].split() == ["stage", "answer", "count"] and lines[4].split() == ["stage", "1", "0.500"]
    assert lines[5].split() == ["stage", "2", "-"]
    assert set(DETAIL_NAMES) == {"caption exact", *(f"answer {k}" for k in QUESTION_KINDS)}
