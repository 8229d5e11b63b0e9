"""Run the course: every notebook through papermill, then a summary and a small static site.

`make course` and `cogagent-nb course` call `run_course`. What it does, in order:

1. finds the lessons: every `NN_*.ipynb` in the notebooks folder, sorted by number (`--only 01 03`
   picks some), so a lesson that lands later is part of the course without any change here;
2. runs each one with papermill (https://papermill.readthedocs.io), with the notebook's own folder as
   working directory (as under nbval and JupyterLab), passing only the parameters that the notebook
   declares in its `parameters` cell: a global `-p data_dir /my/data` reaches every lesson that reads
   data and no other (a name that no lesson run declares gets a warning, with the declared names it
   resembles: `undeclared_parameters`);
3. stops at the first failure and names the notebook, the cell and the error;
4. collects the key numbers each lesson records with `record(name, value)` (a notebook calls
   `cnb.record("click_in_box", 0.83)`; outside a course run the call only returns the value);
5. writes, beside the executed notebooks: `summary.json`, `summary.md` (the table of lessons and their
   measured times that README's "Start here" shows) and `site/` (each executed notebook as HTML through
   nbconvert, and `site/index.html` with the summary table and the lessons' figures inline).

Example (full size, on a GPU machine):

    cogagent-nb course --out runs/gpu --only 03 07 -p model_dir /models/cogagent-9b -f params.yaml
"""

from __future__ import annotations

import ast
import base64
import html
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECORD_ENV = "COGAGENT_NB_RECORD"
"""Environment variable naming the JSON file that `record` appends to; set by `run_course` per lesson."""

LESSON_PATTERN = re.compile(r"^(\d\d)_.+\.ipynb$")
FIGURE_TAG = "course-figure"
"""A code cell tagged with this puts its image outputs on the site's index page (else: the last image)."""


# --- key numbers recorded by a notebook ----------------------------------------------------------------
def record(name: str, value: Any) -> Any:
    """Note a key number of a lesson for the course summary, and return it unchanged.

    A notebook writes `cnb.record("supervised_tokens", n)` after the assert that checks `n`. Under
    `cogagent-nb course` the pair is appended to the JSON file named by `$COGAGENT_NB_RECORD` (the
    kernel inherits the runner's environment), and the summary shows it; in JupyterLab the call is a
    no-op that returns `value`, so the cell reads the same in both worlds. Values must be JSON-able
    (numbers, strings, short lists).
    """
    path = os.environ.get(RECORD_ENV)
    if path:
        target = Path(path)
        records = json.loads(target.read_text()) if target.is_file() else {}
        records[name] = value
        target.write_text(json.dumps(records, indent=2, default=str))
    return value


# --- finding lessons and their parameters --------------------------------------------------------------
def find_lessons(notebooks_dir: Path, only: Sequence[str] = ()) -> list[Path]:
    """The `NN_*.ipynb` files of a folder in lesson order; `only` keeps the given numbers (`"1"` = `"01"`)."""
    if not Path(notebooks_dir).is_dir():
        raise FileNotFoundError(
            f"{notebooks_dir}: no such folder (run from the repository root, or pass --notebooks DIR)"
        )
    lessons = sorted(p for p in Path(notebooks_dir).glob("*.ipynb") if LESSON_PATTERN.match(p.name))
    if only:
        not_numbers = [n for n in only if not str(n).isdigit()]
        if not_numbers:
            raise ValueError(f"--only {' '.join(not_numbers)}: give lesson numbers, e.g. --only 03 07")
        wanted = {f"{int(n):02d}" for n in only}
        lessons = [p for p in lessons if p.name[:2] in wanted]
        missing = wanted - {p.name[:2] for p in lessons}
        if missing:
            raise FileNotFoundError(f"--only {' '.join(sorted(missing))}: no such lesson in {notebooks_dir}")
    if not lessons:
        raise FileNotFoundError(f"no lesson notebooks (NN_*.ipynb) in {notebooks_dir}")
    return lessons


def declared_parameters(notebook: Path) -> set[str]:
    """The names a notebook's `parameters` cell assigns (papermill's own reading of that cell)."""
    import papermill as pm

    return set(pm.inspect_notebook(str(notebook)))


def parameters_for(notebook: Path, parameters: dict[str, Any]) -> dict[str, Any]:
    """The subset of the global parameters that this notebook declares; the others would be inert noise."""
    declared = declared_parameters(notebook)
    return {name: value for name, value in parameters.items() if name in declared}


def undeclared_parameters(lessons: Sequence[Path], parameters: dict[str, Any]) -> dict[str, list[str]]:
    """Parameters that none of `lessons` declares, each with the declared names it resembles.

    A parameter reaches only the lessons that declare it, so a misspelt one (`-p learning_minute 10`)
    would otherwise change nothing without a word; the course command warns with these suggestions.
    """
    import difflib

    declared = set().union(*(declared_parameters(lesson) for lesson in lessons))
    return {
        name: difflib.get_close_matches(name, sorted(declared), n=3, cutoff=0.6)
        for name in parameters
        if name not in declared
    }


def mistyped_parameters(lessons: Sequence[Path], parameters: dict[str, Any]) -> list[str]:
    """One message for each number or flag given a value of another kind (`-p rectangle_minutes abc`).

    Checked against the default that the lesson's `parameters` cell assigns, before anything runs: without
    it the lesson would run for minutes and then stop at the first cell that compares the word with a
    number. A float default takes any number, an int default a whole number, a bool default true/false;
    text defaults (paths, names) take anything.
    """
    import papermill as pm

    problems: dict[str, str] = {}
    for lesson in lessons:
        for name, info in pm.inspect_notebook(str(lesson)).items():
            if name not in parameters or name in problems:
                continue
            try:
                default = ast.literal_eval(info["default"])
            except (ValueError, SyntaxError):  # an expression, not a literal: nothing to compare with
                continue
            expected = _expected_kind(default, parameters[name])
            if expected:
                problems[name] = (
                    f"-p {name} {parameters[name]!r}: {Path(lesson).name} expects {expected} "
                    f"(its default is {info['default']})"
                )
    return list(problems.values())


def _expected_kind(default: Any, value: Any) -> str:
    """What `value` should have been, or "" when it fits `default`'s kind."""
    if isinstance(default, bool):
        return "" if isinstance(value, bool) else "true or false"
    if isinstance(value, bool):  # a flag where a number is wanted (bool is an int in Python)
        return "a number" if isinstance(default, (int, float)) else ""
    if isinstance(default, int):
        return "" if isinstance(value, int) else "a whole number"
    if isinstance(default, float):
        return "" if isinstance(value, (int, float)) else "a number"
    return ""


def absolutize_paths(parameters: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make string values that name an existing path relative to `base` absolute.

    A lesson runs with its own folder as working directory, so `-p data_dir my_screens` typed in the
    repository root would otherwise point at `notebooks/my_screens`.
    """
    out = {}
    for name, value in parameters.items():
        if isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).exists():
            value = str((base / value).resolve())
        out[name] = value
    return out


def read_parameters(pairs: Sequence[Sequence[str]], files: Sequence[Path]) -> dict[str, Any]:
    """Merge `-f params.yaml` files, then `-p name value` pairs (values read as YAML, as papermill does)."""
    params: dict[str, Any] = {}
    for file in files:
        loaded = yaml.safe_load(Path(file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{file}: a parameters file holds `name: value` lines, got {type(loaded).__name__}")
        params.update(loaded)
    for name, value in pairs:
        params[name] = yaml.safe_load(value)
    return params


# --- running ---------------------------------------------------------------------------------------------
@dataclass
class LessonRun:
    """What happened to one lesson: time, status, where it failed, the numbers it recorded."""

    notebook: str
    output: str
    title: str
    seconds: float
    ok: bool
    parameters: dict[str, Any] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)
    failed_cell: int | None = None
    failed_source: str = ""
    error: str = ""


def lesson_title(notebook: Path) -> str:
    """The text of the first `# ` heading, e.g. "01 · The CogAgent data format"."""
    nb = json.loads(Path(notebook).read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return Path(notebook).stem


def run_lesson(
    notebook: Path, out_dir: Path, parameters: dict[str, Any], *, progress: bool = True, cell_timeout: int = 1800
) -> LessonRun:
    """Execute one lesson with papermill; a failure (or a cell running past `cell_timeout` seconds) is
    returned with its cell, not raised."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    output = out_dir / notebook.name
    record_file = out_dir / "records" / f"{notebook.stem}.json"
    record_file.parent.mkdir(parents=True, exist_ok=True)
    record_file.unlink(missing_ok=True)
    passed = parameters_for(notebook, parameters)
    run = LessonRun(str(notebook), str(output), lesson_title(notebook), 0.0, False, passed)
    previous = {name: os.environ.get(name) for name in (RECORD_ENV, "PYTHONPATH")}
    os.environ[RECORD_ENV] = str(record_file.resolve())
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(), previous["PYTHONPATH"]]))
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(notebook),
            str(output),
            parameters=passed,
            cwd=str(notebook.parent),
            kernel_name="python3",
            progress_bar=progress,
            execution_timeout=cell_timeout,
        )
        run.ok = True
    except PapermillExecutionError as exc:
        # papermill counts the injected-parameters cell; exec_count is what the learner sees as [n]
        run.failed_cell, run.failed_source = exc.exec_count, exc.source
        run.error = f"{exc.ename}: {exc.evalue}".strip()
    except Exception as exc:  # a kernel that died, a notebook that is not JSON, ...
        run.error = f"{type(exc).__name__}: {exc}".strip()
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    run.seconds = round(time.perf_counter() - start, 1)
    if record_file.is_file():
        run.records = json.loads(record_file.read_text())
    return run


def _package_root() -> str:
    """The folder holding the `cogagent_nb` that runs this code: the kernel imports the same package
    (a lesson runs in `notebooks/`, where an installed copy elsewhere would otherwise win)."""
    return str(Path(__file__).resolve().parents[1])


def run_course(
    notebooks: Sequence[Path],
    out_dir: Path,
    parameters: dict[str, Any] | None = None,
    *,
    site: bool = True,
    progress: bool = True,
) -> list[LessonRun]:
    """Run lessons in order until the first failure; write the summary files and the site.

    Returns one `LessonRun` per lesson attempted (the failed one is last).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parameters = absolutize_paths(parameters or {}, Path.cwd())
    runs: list[LessonRun] = []
    for number, notebook in enumerate(notebooks, start=1):
        print(f"[{number}/{len(notebooks)}] {notebook.name}", flush=True)
        run = run_lesson(Path(notebook), out_dir, parameters, progress=progress)
        runs.append(run)
        print(f"    {'ok' if run.ok else 'FAILED'} in {run.seconds:.1f} s", flush=True)
        if not run.ok:
            print(failure_message(run), file=sys.stderr, flush=True)
            break
    write_summary(runs, out_dir)
    if site:
        render_site(runs, out_dir / "site")
    return runs


def failed_where(run: LessonRun) -> str:
    """The cell a lesson failed in, or what else stopped it (no cell raised: the kernel died, the notebook
    could not be read or started)."""
    return (
        f"at cell [{run.failed_cell}]"
        if run.failed_cell is not None
        else "outside any cell (the kernel or the notebook file)"
    )


def failure_message(run: LessonRun) -> str:
    """Where a lesson failed, in words a learner can act on."""
    where = failed_where(run)
    source = "\n".join("    | " + line for line in run.failed_source.strip().splitlines()[:8])
    return f"{Path(run.notebook).name} failed {where}: {run.error}\n{source}\nexecuted copy: {run.output}"


# --- the summary -----------------------------------------------------------------------------------------
def format_records(records: dict[str, Any]) -> str:
    """`name = value` pairs on one line, floats to 4 significant digits."""
    return ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in records.items())


def format_summary(runs: Sequence[LessonRun]) -> str:
    """A plain-text table for the terminal: lesson, seconds, status, key numbers."""
    width = max((len(Path(r.notebook).name) for r in runs), default=8)
    lines = [f"{'notebook':<{width}}  {'seconds':>7}  status  key numbers"]
    for r in runs:
        status = "ok    " if r.ok else "FAILED"
        lines.append(f"{Path(r.notebook).name:<{width}}  {r.seconds:>7.1f}  {status}  {format_records(r.records)}")
    lines.append(f"{'total':<{width}}  {sum(r.seconds for r in runs):>7.1f}")
    return "\n".join(lines)


def markdown_table(runs: Sequence[LessonRun]) -> str:
    """The table of lessons for README's "Start here": notebook, what it teaches, measured minutes."""
    lines = ["| notebook | what it teaches | run time | status |", "|---|---|---|---|"]
    for r in runs:
        title = r.title.split("·", 1)[-1].strip()
        status = "ok" if r.ok else f"failed {failed_where(r)}"
        lines.append(f"| `{Path(r.notebook).name}` | {title} | {_duration(r.seconds)} | {status} |")
    lines.append(f"| **all** | | **{_duration(sum(r.seconds for r in runs))}** | |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


TABLE_START, TABLE_END = "<!-- course-table:start -->", "<!-- course-table:end -->"


def update_table(markdown_file: Path, summary_md: str) -> None:
    """Replace the text between the course-table markers of a markdown file with a fresh summary table.

    README's "Start here" keeps its lesson table this way, so that the times it
    shows are always measured: `cogagent-nb course --table README.md`.
    """
    text = Path(markdown_file).read_text(encoding="utf-8")
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{markdown_file}: no {TABLE_START} ... {TABLE_END} markers to put the table between")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    Path(markdown_file).write_text(f"{head}{TABLE_START}\n{summary_md.strip()}\n{TABLE_END}{tail}", encoding="utf-8")


def write_summary(runs: Sequence[LessonRun], out_dir: Path) -> None:
    """Print the summary and write `summary.json` and `summary.md` into `out_dir`."""
    import platform

    print(format_summary(runs))
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    (out_dir / "summary.json").write_text(
        json.dumps({"machine": machine, "lessons": [asdict(r) for r in runs]}, indent=2, default=str)
    )
    (out_dir / "summary.md").write_text(
        f"Measured by `cogagent-nb course` on {machine}, notebook defaults.\n\n{markdown_table(runs)}\n"
    )


# --- the static site -------------------------------------------------------------------------------------
def notebook_figures(notebook: dict[str, Any]) -> list[bytes]:
    """The PNG outputs of the cells tagged `course-figure`, or the notebook's last PNG if none is tagged."""
    tagged, last = [], []
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        pngs = [
            base64.b64decode(o["data"]["image/png"])
            for o in cell.get("outputs", [])
            if "image/png" in o.get("data", {})
        ]
        if pngs:
            last = pngs[-1:]
            if FIGURE_TAG in cell.get("metadata", {}).get("tags", []):
                tagged.extend(pngs)
    return tagged or last


def render_site(runs: Sequence[LessonRun], site_dir: Path) -> Path:
    """Each executed lesson as HTML (nbconvert's lab template) and an index page; returns the index.

    A progress bar's redraws are stored as separate outputs ending in "\\r"; they are merged and only the
    last state is shown, as JupyterLab shows them, instead of one line per redraw.
    """
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / "figures").mkdir(exist_ok=True)
    settings = Config()
    settings.CoalesceStreamsPreprocessor.enabled = True
    exporter = HTMLExporter(config=settings, template_name="lab")
    rows, figures = [], []
    for r in runs:
        output = Path(r.output)
        page = ""
        if output.is_file():
            nb = nbformat.read(str(output), as_version=4)
            body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": r.title}})
            page = f"{output.stem}.html"
            (site_dir / page).write_text(body, encoding="utf-8")
            for i, png in enumerate(notebook_figures(nb)):
                name = f"figures/{output.stem}_{i}.png"
                (site_dir / name).write_bytes(png)
                figures.append((r.title, page, name))
        link = f"<a href='{page}'>{html.escape(Path(r.notebook).name)}</a>" if page else html.escape(r.notebook)
        status = "ok" if r.ok else f"FAILED {html.escape(failed_where(r))}: {html.escape(r.error)}"
        rows.append(
            f"<tr class='{'ok' if r.ok else 'failed'}'><td>{link}</td><td>{html.escape(r.title)}</td>"
            f"<td>{r.seconds:.1f}</td><td>{status}</td><td>{html.escape(format_records(r.records))}</td></tr>"
        )
    pictures = "".join(
        f"<figure><a href='{page}'><img src='{name}' alt='{html.escape(title)}'></a>"
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, page, name in figures
    )
    index = site_dir / "index.html"
    index.write_text(
        _INDEX_PAGE.format(rows="\n".join(rows), total=f"{sum(r.seconds for r in runs):.1f}", pictures=pictures),
        encoding="utf-8",
    )
    return index


_INDEX_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cogagent-notebooks: the executed course</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border-bottom: 1px solid #ddd; padding: .4rem .6rem; text-align: left; vertical-align: top; }}
tr.failed td {{ background: #fde8e8; }}
figure {{ display: inline-block; width: 32%; margin: .5rem .5%; vertical-align: top; }}
figure img {{ width: 100%; border: 1px solid #ddd; }}
figcaption {{ font-size: .9rem; color: #555; }}
</style></head><body>
<h1>cogagent-notebooks: the executed course</h1>
<p>Every lesson as it ran, with its outputs. Made by <code>cogagent-nb course</code>; the numbers are
the ones each lesson checks and records.</p>
<table id="summary"><tr><th>notebook</th><th>lesson</th><th>seconds</th><th>status</th><th>key numbers</th></tr>
{rows}
<tr><td><b>total</b></td><td></td><td><b>{total}</b></td><td></td><td></td></tr></table>
<h2>Figures</h2>
<div id="figures">{pictures}</div>
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    """`python -m cogagent_nb.course ...` is the same as `cogagent-nb course ...`."""
    from cogagent_nb.cli import main as cli_main

    return cli_main(["course", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
