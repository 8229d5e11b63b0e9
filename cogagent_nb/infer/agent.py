"""The agent loop: screenshot -> answer -> act -> next screenshot, with the history the official client keeps.

CogAgent is stateless: every step is a fresh one-turn conversation, and what the agent has done so far
reaches the model only through the prompt's "History steps". The official client (THUDM/CogAgent
`app/client.py`, `workflow` and `extract_grounded_operation`) builds that history from the model's *own*
answers: after each step it takes the text after ``Grounded Operation:`` and after ``Action:`` (an empty
string when a line is missing) and appends ``"{i}. {operation}\\t{action}"``; it stops when the operation
cannot be read, when the executor reports END, or after 15 rounds. `run_episode` does the same.

Here the "computer" is a synthetic episode (`data.synthetic`): it knows the screen of every step and
which move leads to the next one (`synthetic.advances`). A wrong move either ends the run
(`on_miss="stop"`, the default: a strict success measure) or leaves the screen as it was and lets the
agent try again with the wrong step in its history (`on_miss="stay"`, as on a real screen where a
click on empty space changes nothing).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cogagent_nb.data.actions import Action
from cogagent_nb.data.prompts import HistoryStep
from cogagent_nb.data.synthetic import DemoEpisode, advances, make_episode
from cogagent_nb.infer.generate import Prediction, predict

if TYPE_CHECKING:
    import torch

    from cogagent_nb.data.tokenizer import ChatGLM4Tokenizer

MAX_ROUNDS = 15
"""The official client's limit on rounds per task."""

_OPERATION_LINE = re.compile(r"Grounded Operation:\s*(.*)")
_ACTION_LINE = re.compile(r"Action:\s*(.*)")


def history_step(answer_text: str) -> HistoryStep:
    """The history line the official client makes of an answer: the operation and Action texts as written."""
    operation = _OPERATION_LINE.search(answer_text)
    action = _ACTION_LINE.search(answer_text)
    return HistoryStep(
        operation.group(1).strip() if operation else "",
        action.group(1).strip() if action else "",
    )


@dataclass(frozen=True)
class AgentStep:
    """One round: which screen (episode step) the agent saw, what it answered, and what happened."""

    index: int  # the episode step whose screen was shown
    prediction: Prediction
    expected: Action
    advanced: bool


@dataclass
class EpisodeRun:
    """A whole run of the agent on one synthetic episode."""

    task: str
    platform: str
    answer_format: str
    n_steps: int  # steps of the episode, END included
    steps: list[AgentStep] = field(default_factory=list)
    success: bool = False
    reason: str = ""

    @property
    def completed(self) -> int:
        """Episode steps done right (the END step counts when the agent says END)."""
        return sum(step.advanced for step in self.steps)

    def __str__(self) -> str:
        lines = [f"{self.task} [{self.platform}, {self.answer_format}]"]
        for number, step in enumerate(self.steps):
            said = (
                str(step.prediction.operation)
                if step.prediction.operation
                else f"(not parsed) {step.prediction.text!r}"
            )
            mark = "ok  " if step.advanced else "miss"
            lines.append(
                f"  round {number}: screen {step.index}  {mark} wanted {step.expected}\n             said {said}"
            )
        outcome = "task completed" if self.success else f"stopped: {self.reason}"
        lines.append(f"  {outcome} ({self.completed}/{self.n_steps} steps)")
        return "\n".join(lines)


def run_episode(
    model: torch.nn.Module,
    tokenizer: ChatGLM4Tokenizer,
    episode: DemoEpisode | int,
    *,
    seed: int = 0,
    on_miss: str = "stop",
    max_rounds: int = MAX_ROUNDS,
    **settings: Any,
) -> EpisodeRun:
    """Let the model play `episode` (a `DemoEpisode`, or its index in the synthetic set of `seed`).

    settings: `generate.generation_kwargs` options (max_new_tokens, do_sample, ...).
    """
    if on_miss not in ("stop", "stay"):
        raise ValueError(f"on_miss must be 'stop' or 'stay', got {on_miss!r}")
    if isinstance(episode, int):
        episode = make_episode(episode, seed=seed)
    run = EpisodeRun(episode.task, episode.platform, episode.answer_format, len(episode.steps))
    history: list[HistoryStep] = []
    current = 0
    for _ in range(max_rounds):
        screen = episode.steps[current]
        prediction = predict(
            model,
            tokenizer,
            screen.image,
            episode.task,
            platform=episode.platform,
            answer_format=episode.answer_format,
            history=history,
            **settings,
        )
        moved = advances(screen, prediction.operation)
        run.steps.append(AgentStep(current, prediction, screen.operation, moved))
        if prediction.operation is None:  # the official client stops on an unreadable operation
            run.reason = f"round {len(run.steps) - 1}: no readable Grounded Operation"
            return run
        history.append(history_step(prediction.text))
        if moved and screen.end:
            run.success, run.reason = True, "the agent said END on the final screen"
            return run
        if moved:
            current += 1
        elif on_miss == "stop":
            run.reason = f"round {len(run.steps) - 1}: {prediction.operation.name} does not do '{screen.action}'"
            return run
    run.reason = f"{max_rounds} rounds without finishing"
    return run


def run_episodes(
    model: torch.nn.Module,
    tokenizer: ChatGLM4Tokenizer,
    indices: Sequence[int],
    *,
    seed: int = 0,
    **options: Any,
) -> tuple[list[EpisodeRun], dict[str, float]]:
    """`run_episode` over several episodes; returns the runs and the task success rate and mean progress."""
    runs = [run_episode(model, tokenizer, index, seed=seed, **options) for index in indices]
    summary = {
        "episodes": len(runs),
        "task_success": sum(r.success for r in runs) / max(1, len(runs)),
        "mean_progress": sum(r.completed / r.n_steps for r in runs) / max(1, len(runs)),
    }
    return runs, summary
