"""The agent loop on synthetic episodes: which move advances a screen, the history carried the way the
official client carries it, and the step-by-step picture."""

from __future__ import annotations

import pytest
from infer_helpers import ScriptedModel

from cogagent_nb.data.actions import GENERAL_TAG, Action, Answer, format_answer, parse_operation
from cogagent_nb.data.synthetic import advances, episode_samples, make_episode
from cogagent_nb.infer.agent import history_step, run_episode, run_episodes
from cogagent_nb.infer.generate import load_for_inference
from cogagent_nb.viz.predictions import show_episode_run


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_for_inference(tiny_model_dir)[0]


def _answer(episode, step) -> str:
    answer = Answer(action=step.action, operation=step.operation, sensitivity=GENERAL_TAG, end=step.end)
    return format_answer(answer, "Action-Operation-Sensitive" if not step.end else "Action-Operation")


def _oracle(tokenizer, episode, wrong_at: int | None = None) -> ScriptedModel:
    """Answers each screen correctly (it knows the step from the history length), except at `wrong_at`."""

    def answer(prompt: str) -> str:
        k = prompt.count("\n", prompt.index("History steps:"), prompt.index("(Platform:")) - 1
        step = episode.steps[k]
        if k == wrong_at:
            return "Action: Click the corner.\nGrounded Operation: CLICK(box=[[0,0,4,4]], element_info='corner')"
        return _answer(episode, step)

    return ScriptedModel(tokenizer, answer)


def test_advances_needs_the_right_action_target_and_text() -> None:
    episode = make_episode(0)
    for step in episode.steps:
        assert advances(step, step.operation)
        assert not advances(step, None)
    first = episode.steps[0]
    other = "DOUBLE_CLICK" if first.operation.name == "CLICK" else "CLICK"
    assert not advances(first, Action(other, dict(first.operation.args)))
    x1, y1, x2, y2 = first.operation.box
    inside = (x1, y1, x1 + 2 * ((x2 - x1) // 2), y1 + 2 * ((y2 - y1) // 2))  # same centre region, smaller
    assert advances(first, Action(first.operation.name, {"box": inside}))
    assert not advances(first, Action(first.operation.name, {"box": (x2 + 1, y2 + 1, x2 + 3, y2 + 3)}))
    typing = next(s for e in range(8) for s in make_episode(e).steps if s.operation.name == "TYPE")
    wrong_text = dict(typing.operation.args, text="something else")
    assert not advances(typing, Action("TYPE", wrong_text))
    key = next(s for e in range(12) for s in make_episode(e).steps if s.operation.name == "KEY_PRESS")
    assert advances(key, parse_operation("KEY_PRESS(key='ENTER')")) and not advances(
        key, parse_operation("KEY_PRESS(key='Tab')")
    )


def test_history_line_is_taken_from_the_answer_text() -> None:
    text = "Status: x\nAction: Click OK.\nGrounded Operation: CLICK(box=[[1,2,3,4]], element_info='OK')\n<<一般操作>>"
    step = history_step(text)
    assert (step.grounded_operation, step.action) == ("CLICK(box=[[1,2,3,4]], element_info='OK')", "Click OK.")
    assert (history_step("no labels").grounded_operation, history_step("no labels").action) == ("", "")


def test_an_oracle_completes_the_episode_with_the_training_prompts(tokenizer) -> None:
    """Carried history = what the dataset's prompts hold, step by step (the format the model was trained on)."""
    episode = make_episode(3)
    model = _oracle(tokenizer, episode)
    run = run_episode(model, tokenizer, episode)
    assert run.success and run.completed == len(episode.steps) == len(run.steps), str(run)
    names = [f"s{i}.png" for i in range(len(episode.steps))]
    expected = [s["messages"][0]["content"] for s in episode_samples(episode, names)]
    assert [step.prediction.prompt for step in run.steps] == expected
    assert "task completed" in str(run)
    show_episode_run(run).savefig("/dev/null", format="png")


def test_a_wrong_click_stops_or_stays(tokenizer) -> None:
    episode = make_episode(3)
    stopped = run_episode(_oracle(tokenizer, episode, wrong_at=1), tokenizer, episode)
    assert not stopped.success and stopped.completed == 1 and len(stopped.steps) == 2
    assert "does not do" in stopped.reason
    # staying: the agent sees the same screen again, with its wrong step in the history; the scripted model
    # reads the step from the history length, so it now answers for step 2 on screen 1 and misses again.
    stayed = run_episode(_oracle(tokenizer, episode, wrong_at=1), tokenizer, episode, on_miss="stay", max_rounds=4)
    assert [s.index for s in stayed.steps] == [0, 1, 1, 1] and not stayed.success
    assert stayed.steps[1].prediction.history == stayed.steps[0].prediction.history + (
        history_step(_answer(episode, episode.steps[0])),
    )
    assert len(stayed.steps[2].prediction.history) == 2 and "rounds without finishing" in stayed.reason


def test_an_untrained_model_stops_at_once(tiny_model_dir) -> None:
    tokenizer, model = load_for_inference(tiny_model_dir)
    runs, summary = run_episodes(model, tokenizer, [0], max_new_tokens=6)
    assert summary["task_success"] == 0.0 and runs[0].steps[0].prediction.answer is None
    assert "no readable Grounded Operation" in runs[0].reason
