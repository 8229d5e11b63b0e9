"""The course runner: lessons found by name, parameters routed to the lessons that declare them, a stop
at the first failing cell that names it, recorded key numbers, the summary files and the site.

Runs on three throw-away notebooks (a kernel start each, a few seconds), not on the real lessons: those
run in `test_notebooks_own_data.py`.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import nbformat
import pytest

from cogagent_nb import course
from cogagent_nb.cli import main as cli_main


def _png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _lesson(path: Path, title: str, parameters: str, *cells: str, figure: bool = False) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}\n\nA test lesson.")]
    nb.cells.append(nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    if figure:  # a cell that displays a PNG, tagged for the index page
        show = f"from IPython.display import Image, display\ndisplay(Image(data=__import__('base64').b64decode('{_png()}')))"
        nb.cells.append(nbformat.v4.new_code_cell(show, metadata={"tags": [course.FIGURE_TAG]}))
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def lessons(tmp_path: Path) -> Path:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _lesson(
        folder / "01_first.ipynb",
        "01 · First lesson",
        'data_dir = "default"  # where the data is\nsteps = 1  # how many',
        "import cogagent_nb as cnb\nassert steps == 3, f'steps={steps}'\ncnb.record('data_dir', data_dir)\ncnb.record('double', 2 * steps)",
        figure=True,
    )
    _lesson(
        folder / "02_second.ipynb",
        "02 · Second lesson",
        "threshold = 1  # declared, so -p threshold reaches it; data_dir is not declared here",
        "x = 1",
        "assert 'data_dir' not in globals(), 'an undeclared parameter must not be injected'\nassert x > threshold, f'x={x} is not above threshold={threshold}'",
    )
    _lesson(folder / "03_third.ipynb", "03 · Third lesson", "n = 0  # unused", "print('never runs')")
    (folder / "notes.ipynb").write_text((folder / "03_third.ipynb").read_text())  # not a lesson: no NN_ prefix
    return folder


def test_find_lessons_globs_numbered_notebooks_in_order(lessons: Path) -> None:
    assert [p.name for p in course.find_lessons(lessons)] == ["01_first.ipynb", "02_second.ipynb", "03_third.ipynb"]
    assert [p.name for p in course.find_lessons(lessons, ["3", "01"])] == ["01_first.ipynb", "03_third.ipynb"]
    with pytest.raises(FileNotFoundError, match="--only 09"):
        course.find_lessons(lessons, ["09"])


def test_parameters_reach_only_the_lessons_that_declare_them(lessons: Path, tmp_path: Path) -> None:
    params = {"data_dir": "/x", "steps": 3, "threshold": 0}
    assert course.parameters_for(lessons / "01_first.ipynb", params) == {"data_dir": "/x", "steps": 3}
    assert course.parameters_for(lessons / "02_second.ipynb", params) == {"threshold": 0}
    (tmp_path / "mine").mkdir()
    assert course.absolutize_paths({"data_dir": "mine", "name": "nope"}, tmp_path) == {
        "data_dir": str((tmp_path / "mine").resolve()),
        "name": "nope",
    }
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("steps: 2\nthreshold: 5\n")
    assert course.read_parameters([["steps", "3"], ["data_dir", "d"]], [yaml_file]) == {
        "steps": 3,
        "threshold": 5,
        "data_dir": "d",
    }


def test_a_parameter_no_lesson_declares_is_named_with_the_names_it_resembles(lessons: Path) -> None:
    found = course.find_lessons(lessons)
    assert course.undeclared_parameters(found, {"steps": 3, "step": 3, "data_dir": "d", "colour": 1}) == {
        "step": ["steps"],
        "colour": [],
    }
    # declared by lesson 01 only: a run of lesson 02 alone is told that it changes nothing there
    assert course.undeclared_parameters(course.find_lessons(lessons, ["2"]), {"steps": 3}) == {"steps": []}


def test_course_command_input_errors_are_one_line_with_exit_status_2(lessons: Path, tmp_path: Path, capsys) -> None:
    assert cli_main(["course", "--notebooks", str(lessons), "--only", "09", "--out", str(tmp_path / "a")]) == 2
    assert "cogagent-nb course: error: --only 09: no such lesson in" in capsys.readouterr().err
    assert cli_main(["course", "--notebooks", str(lessons), "--only", "xx", "--out", str(tmp_path / "a")]) == 2
    assert "cogagent-nb course: error: --only xx: give lesson numbers, e.g. --only 03 07" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert cli_main(["course", "--notebooks", str(missing), "--out", str(tmp_path / "b")]) == 2
    assert (
        f"{missing}: no such folder (run from the repository root, or pass --notebooks DIR)" in capsys.readouterr().err
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_word_for_a_number_is_refused_before_any_lesson_runs(lessons: Path, tmp_path: Path, capsys) -> None:
    found = course.find_lessons(lessons)
    assert course.mistyped_parameters(found, {"steps": 3, "threshold": 2.5, "data_dir": 7}) == [
        "-p threshold 2.5: 02_second.ipynb expects a whole number (its default is 1)"
    ]
    assert course.mistyped_parameters(found, {"steps": "abc", "n": True}) == [
        "-p steps 'abc': 01_first.ipynb expects a whole number (its default is 1)",
        "-p n True: 03_third.ipynb expects a number (its default is 0)",
    ]
    out = tmp_path / "c"
    assert cli_main(["course", "--notebooks", str(lessons), "-p", "steps", "abc", "--out", str(out)]) == 2
    assert "cogagent-nb course: error: -p steps 'abc': 01_first.ipynb expects a whole number" in capsys.readouterr().err
    assert not out.exists(), "nothing runs"


def test_the_real_lessons_take_numbers_flags_and_paths_of_their_kinds(repo_root: Path) -> None:
    lessons = course.find_lessons(repo_root / "notebooks")
    fine = {"rectangle_minutes": 3, "learning_minutes": 0.5, "train_steps": 4, "run_real_model": False, "data_dir": "x"}
    assert course.mistyped_parameters(lessons, fine) == []
    assert course.mistyped_parameters(lessons, {"rectangle_minutes": "abc", "run_real_model": "yes please"}) == [
        "-p rectangle_minutes 'abc': 07_inference.ipynb expects a number (its default is 3.0)",
        "-p run_real_model 'yes please': 07_inference.ipynb expects true or false (its default is False)",
    ]


def test_record_is_a_no_op_outside_a_course_run(monkeypatch) -> None:
    monkeypatch.delenv(course.RECORD_ENV, raising=False)
    assert course.record("x", 1.5) == 1.5


def test_course_stops_at_the_first_failing_cell_and_names_it(lessons: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = cli_main(
        ["course", "--notebooks", str(lessons), "--out", str(out), "-p", "steps", "3", "-p", "data_dir", "/d"]
    )
    assert code == 1
    captured = capsys.readouterr()
    assert "02_second.ipynb failed at cell [3]: AssertionError: x=1 is not above threshold=1" in captured.err
    assert "warning" not in captured.err, "every parameter given is declared by a lesson"
    assert "never runs" not in captured.out

    summary = json.loads((out / "summary.json").read_text())["lessons"]
    assert [(Path(r["notebook"]).name, r["ok"]) for r in summary] == [
        ("01_first.ipynb", True),
        ("02_second.ipynb", False),
    ]
    assert summary[0]["records"] == {"data_dir": "/d", "double": 6}
    assert summary[0]["parameters"] == {"data_dir": "/d", "steps": 3}
    assert summary[1]["failed_cell"] == 3 and "threshold" in summary[1]["failed_source"]
    assert (out / "01_first.ipynb").is_file() and not (out / "03_third.ipynb").exists()

    table = (out / "summary.md").read_text()
    assert "| `01_first.ipynb` | First lesson |" in table and "failed at cell [3]" in table

    index = (out / "site" / "index.html").read_text()
    assert "<a href='01_first.html'>01_first.ipynb</a>" in index and "FAILED at cell [3]" in index
    assert "data_dir = /d, double = 6" in index
    assert "figures/01_first_0.png" in index and (out / "site" / "figures" / "01_first_0.png").stat().st_size > 0
    assert "is not above threshold=1" in (out / "site" / "02_second.html").read_text()  # the failed lesson, rendered


def test_the_site_shows_a_progress_bars_last_state_only(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("train()")
    redraws = [f"training {i}/3\r" for i in range(3)] + ["training 3/3\n", "done\n"]
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=t) for t in redraws]
    nb.cells.append(cell)
    executed = tmp_path / "01_bar.ipynb"
    nbformat.write(nb, str(executed))
    run = course.LessonRun(notebook=str(executed), output=str(executed), title="Bar", seconds=1.0, ok=True)
    course.render_site([run], tmp_path / "site")
    page = (tmp_path / "site" / "01_bar.html").read_text()
    assert "training 3/3" in page and "done" in page
    assert "training 1/3" not in page


def test_makefile_course_target_calls_the_command(repo_root: Path) -> None:
    makefile = (repo_root / "Makefile").read_text()
    recipe = makefile.split("\ncourse:", 1)[1].split("\n\n", 1)[0]
    assert "cogagent-nb course" in recipe


def test_update_table_replaces_only_the_text_between_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "START.md"
    doc.write_text(f"intro\n{course.TABLE_START}\nold table\n{course.TABLE_END}\noutro\n")
    course.update_table(doc, "| new | table |\n")
    assert doc.read_text() == f"intro\n{course.TABLE_START}\n| new | table |\n{course.TABLE_END}\noutro\n"
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="course-table"):
        course.update_table(doc, "x")


def test_readme_start_here_has_the_table_markers(repo_root: Path) -> None:
    text = (repo_root / "README.md").read_text()
    assert course.TABLE_START in text and course.TABLE_END in text


def test_a_lesson_stopped_outside_a_cell_is_not_said_to_fail_in_one() -> None:
    """A kernel that dies mid-run raises no cell error: the message must not claim "before any cell ran"."""
    died = course.LessonRun("07_x.ipynb", "runs/07_x.ipynb", "X", 12.0, False, error="DeadKernelError: Kernel died")
    assert course.failure_message(died).startswith(
        "07_x.ipynb failed outside any cell (the kernel or the notebook file): Dead"
    )
    failed = course.LessonRun("07_x.ipynb", "runs/07_x.ipynb", "X", 12.0, False, failed_cell=4, error="ValueError: v")
    assert course.failure_message(failed).startswith("07_x.ipynb failed at cell [4]: ValueError: v")
