"""Worked solutions to the exercises of notebook 07 (inference and evaluation), each ending in a check.

Run `python solutions/07_inference.py [DATA_DIR]`: one line per exercise, an AssertionError with a
message where a check fails. `tests/test_course_solutions.py` runs this file on the demo set. The model
is the course's tiny one (written to a temporary folder), so the checks hold for any weights.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import cogagent_nb as cnb
from cogagent_nb.cli import main as cli

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "CogAgentData"


def eval_file(data_dir: Path) -> Path:
    return next(data_dir / f"{s}.jsonl" for s in ("test", "dev", "train") if (data_dir / f"{s}.jsonl").exists())


def exercise_1(model_dir: Path, data_dir: Path, work: Path) -> dict:
    """`cogagent-nb infer` on a screenshot: the printed pixel box is `to_pixels` of the thousandths box."""
    sample = cnb.read_eval_samples(eval_file(data_dir), limit=1)[0]
    parts = cnb.parse_prompt(sample.prompt)
    out, record = work / "drawn.png", work / "result.json"
    code = cli([
        "infer", str(model_dir), "--image", str(sample.image_path), "--task", parts.task,
        "--platform", parts.platform, "--format", parts.answer_format, "--max-new-tokens", "24",
        "--out", str(out), "--json", str(record),
    ])  # fmt: skip
    assert code == 0, "cogagent-nb infer failed"
    result = json.loads(record.read_text())
    width, height = result["image_size"]
    assert cnb.load_image(out).size == (width, height), "the drawn PNG has the screenshot's size"
    if result["box"] is not None:  # an untrained model rarely writes a box; a trained one does
        assert result["box_pixels"] == list(cnb.to_pixels(result["box"], width, height)), "pixels = to_pixels(box)"
    # the same conversion on the reference answer, which always parses
    reference = cnb.parse_answer(sample.reference).operation
    if reference.box is not None:
        x1, y1, x2, y2 = cnb.to_pixels(reference.box, width, height)
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height, "a box in thousandths lands on the screen"
    return result


def exercise_2(data_dir: Path) -> dict[str, float]:
    """The screenshot-free guesses: a label-aware guess beats one fixed box on the demo set."""
    train = data_dir / "train.jsonl"
    rates = {
        kind: cnb.baseline_report(train, eval_file(data_dir), kind).summary["click_in_box"]
        for kind in ("most_common_box", "text_only")
    }
    assert rates["text_only"] > rates["most_common_box"], f"the element label should help: {rates}"
    return rates


def exercise_3(episode_index: int = 1) -> str:
    """The official client's history: built from the answers of steps 0 and 1, the step-2 prompt equals the
    dataset's (the format the model was trained on)."""
    episode = cnb.make_episode(episode_index)
    answers = [
        cnb.format_answer(
            cnb.Answer(action=s.action, operation=s.operation, sensitivity="<<一般操作>>"), "Action-Operation"
        )
        for s in episode.steps[:2]
    ]
    history = [cnb.history_step(text) for text in answers]
    prompt = cnb.build_prompt(episode.task, episode.platform, episode.answer_format, history)
    names = [f"s{i}.png" for i in range(len(episode.steps))]
    expected = cnb.episode_samples(episode, names)[2]["messages"][0]["content"]
    assert prompt == expected, "the carried history must reproduce the training prompt"
    return prompt


def exercise_4(model_dir: Path, data_dir: Path) -> list[int]:
    """Left padding: the same prompts in batches of 1, 2 and 4 give the same greedy answers, and each row's
    padding is the difference to the longest prompt."""
    tokenizer, model = cnb.load_for_inference(model_dir)
    samples = cnb.read_eval_samples(eval_file(data_dir), limit=4)
    images, prompts = [s.image_path for s in samples], [s.prompt for s in samples]
    answers = {
        size: [
            g.text for g in cnb.generate_answers(model, tokenizer, images, prompts, batch_size=size, max_new_tokens=8)
        ]
        for size in (1, 2, 4)
    }
    assert answers[1] == answers[2] == answers[4], "batching must not change greedy answers"
    conversations = [[{"role": "user", "content": p, "image": i}] for i, p in zip(images, prompts)]
    batch = tokenizer.apply_chat_template(
        conversations, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    lengths = [len(tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"][0]) for c in conversations]  # fmt: skip
    pads = (batch["attention_mask"] == 0).sum(dim=1).tolist()
    assert pads == [max(lengths) - n for n in lengths], "each row is padded on the left up to the longest"
    assert bool((batch["attention_mask"][:, -1] == 1).all()), "every row's last column is a real token"
    return pads


def main(data_dir: Path = DEMO_DIR) -> None:
    data_dir = Path(data_dir)
    with tempfile.TemporaryDirectory(prefix="solutions07_") as tmp:
        tmp = Path(tmp)
        model_dir = Path(cnb.make_tiny_model(tmp / "tiny", seed=0))
        result = exercise_1(model_dir, data_dir, tmp)
        print("exercise 1:", result["action"] or "(not parsed)", "drawn on", result["image_size"])
        print("exercise 2: click-in-box without a screenshot:", exercise_2(data_dir))
        print("exercise 3: the step-2 prompt\n" + exercise_3())
        print("exercise 4: left padding per row:", exercise_4(model_dir, data_dir))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO_DIR)
