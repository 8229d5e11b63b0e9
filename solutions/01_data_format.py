"""Worked solutions to the exercises of notebook 01 (the CogAgent data format), each ending in a check.

Run `python solutions/01_data_format.py [DATA_DIR]`: one line per exercise, an AssertionError with a
message where a check fails. `tests/test_course_solutions.py` runs this file on the demo set.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import cogagent_nb as cnb

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "CogAgentData"


def exercise_1(data_dir: Path, sample_index: int = 0) -> cnb.Answer:
    """The last step of the episode around a sample: its answer closes with <<END>> and has no box."""
    samples = cnb.load_split(data_dir, "train")
    last = cnb.episode_around(samples, sample_index)[-1]
    answer = cnb.parse_answer(last["messages"][1]["content"])
    assert answer.end, f"the last step of an episode closes with <<END>>, got {last['messages'][1]['content']!r}"
    assert answer.operation is not None and answer.operation.box is None, "END() has no box: only the title is drawn"
    return answer


def exercise_2(work: Path) -> list[dict]:
    """A second step for the Notes window: click Close, with step 0 (Save) as history."""
    size = (800, 500)
    save = cnb.parse_operation(
        f"CLICK(box=[{list(cnb.from_pixels((560, 430, 660, 470), *size))}], element_info='Save')"
    )
    close = cnb.parse_operation(f"CLICK(box=[{list(cnb.from_pixels((760, 4, 792, 32), *size))}], element_info='Close')")
    task, fmt = "Save the note and close the window", "Action-Operation-Sensitive"
    steps = [
        ([], cnb.Answer(action="Click 'Save'.", operation=save, sensitivity="<<一般操作>>")),
        ([(save, "Click 'Save'.")], cnb.Answer(action="Click 'Close'.", operation=close, sensitivity="<<一般操作>>")),
    ]
    (work / "images").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    conversations = []
    for k, (history, answer) in enumerate(steps):
        Image.new("RGB", size, "#f3f3f3").save(work / "images" / f"notes_{k}.png")
        user = {
            "role": "user",
            "content": cnb.build_prompt(task, "WIN", fmt, history),
            "image": f"images/notes_{k}.png",
        }
        conversations.append({"messages": [user, {"role": "assistant", "content": cnb.format_answer(answer, fmt)}]})
    (work / "train.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations))
    problems = cnb.validate_paths([work / "train.jsonl"])
    assert problems == [], [str(p) for p in problems]
    history = cnb.parse_prompt(conversations[1]["messages"][0]["content"]).history
    assert len(history) == 1 and history[0].operation == save, "step 1 lists step 0 as its history"
    return conversations


def exercise_3(data_dir: Path, work: Path) -> list[cnb.Problem]:
    """Swap x1 and x2 of the first box in a copy of train.jsonl; the validator names line and field."""
    shutil.copytree(data_dir, work, dirs_exist_ok=True)
    lines = (work / "train.jsonl").read_text(encoding="utf-8").splitlines()
    number = next(i for i, line in enumerate(lines) if "box=[[" in line)
    conversation = json.loads(lines[number])
    answer = conversation["messages"][1]["content"]
    start = answer.index("box=[[") + len("box=[[")
    x1, y1, x2, rest = answer[start:].split(",", 3)
    conversation["messages"][1]["content"] = answer[:start] + ",".join([x2, y1, x1, rest])
    lines[number] = json.dumps(conversation, ensure_ascii=False)
    (work / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    errors = [p for p in cnb.validate_paths([work / "train.jsonl"]) if p.severity == "error"]
    assert [p.line for p in errors] == [number + 1], [str(p) for p in errors]
    assert "box" in str(errors[0]), f"the message names the box: {errors[0]}"
    return errors


def exercise_4(data_dir: Path, work: Path, episodes: int = 40, seed: int = 7) -> dict[str, set[str]]:
    """40 episodes with another seed hold every platform and answer format that the committed set holds."""
    cnb.make_demo_data(work, seed=seed, episodes=episodes)

    def kinds(folder: Path) -> dict[str, set[str]]:
        prompts = [cnb.parse_prompt(c["messages"][0]["content"]) for c in cnb.load_split(folder, "train")]
        return {"platform": {p.platform for p in prompts}, "format": {p.answer_format for p in prompts}}

    mine, committed = kinds(work), kinds(data_dir)
    assert mine == committed, f"{episodes} episodes miss some kinds: {mine} vs {committed}"
    return mine


def main(data_dir: Path = DEMO_DIR) -> None:
    with tempfile.TemporaryDirectory(prefix="solutions01_") as tmp:
        tmp = Path(tmp)
        print("exercise 1: the last step says", exercise_1(data_dir).operation)
        print("exercise 2:", len(exercise_2(tmp / "my_screens")), "steps written, no problems")
        print("exercise 3:", exercise_3(data_dir, tmp / "broken")[0])
        print("exercise 4: same kinds as the committed set:", exercise_4(data_dir, tmp / "seed7"))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO_DIR)
