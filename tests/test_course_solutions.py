"""The exercises' worked solutions (`solutions/NN_*.py`) run and their checks pass on the demo set.

Each solutions file has a `main(data_dir)` that runs every exercise and asserts its answer; a lesson
that lands later with a solutions file is picked up by the glob.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((REPO_ROOT / "solutions").glob("[0-9][0-9]_*.py"))


def test_every_lesson_has_a_solutions_file() -> None:
    lessons = {p.stem for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert {"01_data_format", "02_loss_mask"} <= {p.stem for p in SOLUTIONS} <= lessons


@pytest.mark.slow
@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_solutions_run_and_their_checks_pass(path: Path, demo_data_dir: Path, capsys) -> None:
    namespace = runpy.run_path(str(path))
    namespace["main"](demo_data_dir)
    printed = capsys.readouterr().out
    assert printed.count("exercise ") >= 4, printed
