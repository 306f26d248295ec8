"""The numbered notebooks: committed with their outputs, linked from the README in order, each one
runs top to bottom without an error, and what it prints is what a fresh run prints.

Each notebook is executed once, in a fresh kernel from the notebooks/ folder, in memory (the
committed file is not rewritten); `pytest -s` prints each one's execution time. That single run
serves two tests: `test_notebook_runs` (no cell raises) and `test_notebook_outputs_match_a_fresh_run`,
which compares every code cell's text outputs with the committed ones.

What is compared: a cell's stdout and stderr streams and the text/plain of its results and
displays (a figure's `<Figure size 900x300 with 1 Axes>` included), in order; images are not
compared. A cell tagged `nbval-ignore-output` is executed but not compared (its markdown says why).
Both sides first go through `sanitise`, which removes or normalises what legitimately varies from
run to run and machine to machine, line by line:

- carriage returns: only the text after a line's last `\\r` is kept (what a terminal shows);
- progress bars: a line with a tqdm bar (`45%|####  | 9/20 [...]`) or a rate (`3.2it/s`) is dropped;
- timings: a number with a unit of time (`12.3 s`, `45 ms`, `8 µs`, `2 min`) becomes `<time>`,
  a rate (`120 tokens/s`) `<rate>`, and a speed-up (`16x faster`) `<N>x faster`;
- memory: a number with a unit of memory (`27 MiB`, `1.5 GB`, `640 KB`) becomes `<memory>`;
- versions: a dotted version (`2.13.0+cpu`, `3.11.7`) becomes `<version>`;
- addresses: `0x7f3a...` becomes `0x<address>`;
- paths: a path under the temporary folder becomes `<tmp>`, the repository's root `<repo>`;
- blank lines are dropped and runs of spaces become one (a replaced figure changes column widths).

Everything else must match exactly: a changed number, caption or token id fails the test. Digits
that depend on the CPU (AVX2 against AVX-512 rounding) are not removed: a notebook prints rounded
findings instead, so the comparison holds under `ATEN_CPU_CAPABILITY=avx2` as well.
"""

import re
import tempfile
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 900  # a guard against a hung kernel, not a speed target: run times are printed, not asserted
MAX_KB = 400  # committed with outputs, yet small enough to read online
IGNORE_TAG = "nbval-ignore-output"  # the tag nbval uses for the same purpose
HOW_TO_FIX = ("fix: if the new output is right, re-execute the notebook from notebooks/ and commit it with its "
              "outputs; if it changes from machine to machine, print a stable value instead (a rounded figure, "
              "a finding such as 'agree to 1e-6: True')")

_NUMBER = r"(?<![\w.])\d+(?:[.,]\d+)*(?:e[+-]?\d+)?"
_RULES = [  # (pattern, replacement), applied in this order to each line
    (re.compile(r"(?<![\w.§])\d+\.\d+\.\d+(?:[.+-]?[A-Za-z0-9]+)*"), "<version>"),  # not §3.2.2
    (re.compile(rf"{_NUMBER}\s?(?:[A-Za-z]+)/s\b"), "<rate>"),
    (re.compile(rf"{_NUMBER}\s?(?:x|×)(?= (?:faster|slower))"), "<N>x"),
    (re.compile(rf"{_NUMBER}\s?(?:ns|µs|us|ms|s|sec|seconds|min|minutes)\b"), "<time>"),
    (re.compile(rf"{_NUMBER}\s?(?:[KMGT]i?B|bytes)\b"), "<memory>"),
    (re.compile(r"\b0x[0-9a-fA-F]+"), "0x<address>"),  # not 260x260
]
_PROGRESS = re.compile(r"\d+%\|.*\||\d(?:it|s)/(?:s|it)\b")


_TMP = "|".join(re.escape(folder) for folder in sorted(
    {tempfile.gettempdir(), str(Path(tempfile.gettempdir()).resolve())}, key=len, reverse=True))
_PATHS = [  # the machine's own folders: anything under the temporary folder, and this repository's root
    (re.compile(rf"(?:{_TMP})(?![\w.-])[^\s'\",)\]]*"), "<tmp>"),
    (re.compile(re.escape(str(ROOT))), "<repo>"),
]


def sanitise(text: str) -> list[str]:
    """The lines of an output with what legitimately varies removed (the rules in this module's docstring)."""
    lines = []
    for line in text.split("\n"):
        line = line.rstrip("\r").rsplit("\r", 1)[-1]  # what a terminal shows
        if _PROGRESS.search(line):
            continue
        for pattern, name in _PATHS:
            line = pattern.sub(name, line)
        for pattern, replacement in _RULES:
            line = pattern.sub(replacement, line)
        line = " ".join(line.split())
        if line:
            lines.append(line)
    return lines


def cell_text(cell) -> str:
    """A code cell's text outputs joined in order: its streams and the text/plain of its results and
    displays (an error as its message). A stream the kernel sent in several pieces is joined back."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", "") + "\n")
        elif out.output_type == "error":
            parts.append(f"{out.ename}: {out.evalue}\n")
    return "".join(parts)


def output_differences(committed, fresh) -> list[str]:
    """One message per compared code cell whose sanitised text differs: its number and first differing line.

    `committed` and `fresh` are the same notebook as committed and as executed afresh."""
    old = [cell for cell in committed.cells if cell.cell_type == "code"]
    new = [cell for cell in fresh.cells if cell.cell_type == "code"]
    if len(old) != len(new):
        return [f"{len(old)} code cells committed, {len(new)} executed"]
    messages = []
    for number, (a, b) in enumerate(zip(old, new), start=1):
        if IGNORE_TAG in a.get("metadata", {}).get("tags", []):
            continue
        was, now = sanitise(cell_text(a)), sanitise(cell_text(b))
        if was == now:
            continue
        line = next((i for i, (x, y) in enumerate(zip(was, now)) if x != y), min(len(was), len(now)))
        shown = [lines[line] if line < len(lines) else "(no such line)" for lines in (was, now)]
        messages.append(f"code cell {number}, output line {line + 1}:\n"
                        f"  - committed: {shown[0]}\n  + fresh run: {shown[1]}")
    return messages


_runs = {}  # notebook path -> (executed notebook, seconds) or the exception its execution raised


def execute(path: Path):
    """The notebook executed in a fresh kernel from its folder, and the seconds it took; run once per session."""
    if path not in _runs:
        notebook = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                         resources={"metadata": {"path": str(path.parent)}})
        started = time.time()
        try:
            client.execute()
            _runs[path] = (notebook, time.time() - started)
        except Exception as error:  # kept, so that the comparison does not run a broken notebook again
            _runs[path] = error
    if isinstance(_runs[path], Exception):
        raise _runs[path]
    return _runs[path]


def test_the_notebooks_are_numbered_in_order():
    assert NOTEBOOKS, "no notebook found"
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]


def test_the_readme_links_the_notebooks_in_order():
    readme = (ROOT / "README.md").read_text()
    linked = re.findall(r"\(notebooks/([0-9][0-9]_[^)]+\.ipynb)\)", readme)
    assert linked == [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_with_outputs(path):
    assert path.stat().st_size <= MAX_KB * 1024, f"{path.name} is {path.stat().st_size // 1024} KB"
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count is not None for cell in code), "run it and commit it with its outputs"
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"committed with an error: {errors[0].ename}: {errors[0].evalue}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    _, elapsed = execute(path)  # a cell that raises fails the test with that cell and its traceback
    print(f"{path.name}: {elapsed:.0f} s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_match_a_fresh_run(path):
    try:
        fresh, _ = execute(path)
    except Exception as error:
        pytest.fail(f"{path.name} does not run ({type(error).__name__}): see test_notebook_runs")
    differences = output_differences(nbformat.read(path, as_version=4), fresh)
    assert not differences, f"{path.name}: the committed outputs are not what a fresh run prints\n" + \
        "\n".join(differences) + "\n" + HOW_TO_FIX


# The comparison itself, on small notebooks made here: it must reject stale outputs and accept
# what only varies legitimately.

def _notebook(*outputs, tags=()):
    """A notebook of one code cell with these outputs: strings are stdout, dicts text/plain results."""
    cell = nbformat.v4.new_code_cell("...", execution_count=1, metadata={"tags": list(tags)})
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=out) if isinstance(out, str) else
                    nbformat.v4.new_output("execute_result", data=out, execution_count=1) for out in outputs]
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("# a lesson"), cell]
    return notebook


@pytest.mark.parametrize("committed, fresh", [
    ("prefix_lm_loss = 7.45, log V = 7.42\n", "prefix_lm_loss = 7.46, log V = 7.42\n"),  # a changed number
    ("caption: 'a red circle'\n", "caption: 'a blue square'\n"),  # a changed caption
    ("ids [612, 712]\n", "ids [612, 713]\n"),  # a changed token id
    ("agree to 1e-6: True\n", "agree to 1e-6: False\n"),  # a changed finding
    ("line one\n", "line one\nline two\n"),  # a line more
    ({"text/plain": "<Figure size 260x260 with 1 Axes>"}, {"text/plain": "<Figure size 260x300 with 2 Axes>"}),
    ({"text/plain": "'passes'"}, {"text/plain": "'fails: wrong shape'"}),  # a changed result
])
def test_the_comparison_rejects_a_stale_output(committed, fresh):
    differences = output_differences(_notebook(committed), _notebook(fresh))
    assert len(differences) == 1 and differences[0].startswith("code cell 1, output line ")


def test_the_failure_names_the_cell_and_shows_the_first_differing_line():
    old = _notebook("same\nloss 7.45\nalso different\n")
    assert output_differences(old, _notebook("same\nloss 7.50\nalso changed\n")) == [
        "code cell 1, output line 2:\n  - committed: loss 7.45\n  + fresh run: loss 7.50"]


@pytest.mark.parametrize("committed, fresh", [
    ("notebook ran in 57 s\n", "notebook ran in 3 s\n"),
    ("without cache 2.15 s, with cache 0.14 s (16x faster); prefill 36 ms, then 2.1 ms per token\n",
     "without cache 12.5 s, with cache 1.03 s (12x faster); prefill 310 ms, then 15 ms per token\n"),
    ("decoding: 812 tokens/s\n", "decoding: 95.3 tokens/s\n"),
    ("peak memory 27 MiB, model 1.5 GB\n", "peak memory 9 MiB, model 12.25 GB\n"),
    ("python 3.11.7, torch 2.13.0+cpu\n", "python 3.12.1, torch 2.14.0.dev20270101+cu128\n"),
    ({"text/plain": "<Net object at 0x7f3a9c2d1e50>"}, {"text/plain": "<Net object at 0x10b2c3d40>"}),
    (f"wrote {tempfile.gettempdir()}/tmpab12cd/model\n", f"wrote {tempfile.gettempdir()}/tmp98zz01/model\n"),
    ("step 3/10\rstep 10/10\ndone\n", "step 10/10\ndone\n"),
    ("train:  40%|####      | 4/10 [00:01<00:02, 3.1it/s]\ndone\n", "done\n"),
])
def test_the_comparison_accepts_what_varies_legitimately(committed, fresh):
    assert output_differences(_notebook(committed), _notebook(fresh)) == []


def test_a_tagged_cell_is_not_compared():
    assert output_differences(_notebook("captions right: 3 of 8\n", tags=[IGNORE_TAG]),
                              _notebook("captions right: 5 of 8\n", tags=[IGNORE_TAG])) == []
    assert output_differences(_notebook("captions right: 3 of 8\n"), _notebook("captions right: 5 of 8\n"))


def test_a_stream_sent_in_pieces_is_joined():
    assert output_differences(_notebook("first line\nsecond line\n"), _notebook("first line\nsec", "ond line\n")) == []
