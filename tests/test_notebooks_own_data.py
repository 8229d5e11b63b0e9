"""Every lesson runs on a learner's own data through `-p data_dir ...`, not only on the demo set.

Two datasets that are not the committed demo set: a freshly generated one (another seed, 4 episodes,
all three splits) and a hand-written one-screenshot set with only `train.jsonl` (no history, no dev
split). Every `NN_*.ipynb` runs on each through the course runner, so lessons that land later are
covered without a change here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import cogagent_nb as cnb
from cogagent_nb.course import find_lessons, run_course

pytestmark = pytest.mark.slow


def one_screenshot_dataset(folder: Path) -> Path:
    """One hand-drawn window with a button, one conversation, only train.jsonl: the smallest valid set."""
    (folder / "images").mkdir(parents=True)
    image = Image.new("RGB", (640, 400), "white")
    ImageDraw.Draw(image).rectangle((500, 340, 620, 380), fill="#2b5797")
    image.save(folder / "images" / "shot.png")
    operation = cnb.parse_operation(
        f"CLICK(box=[{list(cnb.from_pixels((500, 340, 620, 380), 640, 400))}], element_info='OK')"
    )
    conversation = {
        "messages": [
            {
                "role": "user",
                "content": cnb.build_prompt("Press OK", "Mac", "Action-Operation"),
                "image": "images/shot.png",
            },
            {
                "role": "assistant",
                "content": cnb.format_answer(cnb.Answer(action="Click OK.", operation=operation), "Action-Operation"),
            },
        ]
    }
    (folder / "train.jsonl").write_text(json.dumps(conversation) + "\n")
    assert cnb.validate_paths([folder / "train.jsonl"]) == []
    return folder


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own-data")
    cnb.make_demo_data(root / "seed11", seed=11, episodes=4)
    return {"seed11": root / "seed11", "one-screenshot": one_screenshot_dataset(root / "one-screenshot")}


# Short runs: what is tested here is that each lesson reads the learner's data, not how well it trains
# (the defaults run in `make test` through nbval, all but lesson 07's `nbval-skip` learning cell, whose only run in the
# suite is this one). Each lesson gets only the names it declares.
QUICK = {
    "max_steps": 10,  # 03, 04, 06
    "stop_at": 4,  # 06: stop, then resume
    "save_steps": 2,  # 06
    "smoke_steps": 4,  # 05 (past the 2 warm-up steps)
    "train_steps": 4,  # 07
    "eval_limit": 4,  # 07
    "agent_episodes": 1,  # 07
    "learning_minutes": 0.05,  # 07: the longer run (synthetic episodes, not the learner's data)
    "rectangle_minutes": 0.05,  # 07: the one-rectangle run (synthetic screens too)
    "learning_episodes": 1,  # 07
    "max_new_tokens": 16,  # 03, 07
    "mask_demo_steps": 10,  # 02: the official-vs-fixed mask experiment (its data is its own)
}


@pytest.mark.parametrize("name", ["seed11", "one-screenshot"])
def test_every_lesson_runs_on_own_data(name: str, datasets: dict[str, Path], repo_root: Path, tmp_path: Path) -> None:
    lessons = find_lessons(repo_root / "notebooks")
    parameters = {"data_dir": str(datasets[name]), **QUICK}
    runs = run_course(lessons, tmp_path / "run", parameters, site=False, progress=False)
    failed = [r for r in runs if not r.ok]
    assert not failed, (
        f"{Path(failed[0].notebook).name} failed on {name} at cell [{failed[0].failed_cell}]: {failed[0].error}"
    )
    assert len(runs) == len(lessons)
    assert all(r.parameters.get("data_dir") == str(datasets[name]) for r in runs if "data_dir" in r.parameters)
