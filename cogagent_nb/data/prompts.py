"""The user prompt: build it from parts, and read it back.

CogAgent is not a chat model: every step is a fresh one-turn conversation whose user message carries
the task, the steps done so far, the platform and the wanted answer format. The official README
(and `app/client.py`, `inference/cli_demo.py`) concatenate it as::

    f"Task: {task}{history}\\n(Platform: {platform})\\n(Answer in {format} format.)\\n"
    history = "\\nHistory steps: " + "".join(f"\\n{i}. {grounded_op}\\t{action}")   # i from 0

so a second step reads (``→`` is a tab)::

    Task: Open Settings and go to Network
    History steps:
    0. CLICK(box=[[12,20,40,60]], element_info='Settings')→Click the Settings icon.
    (Platform: WIN)
    (Answer in Action-Operation-Sensitive format.)

"History steps: " is written even when there is no history (the README insists). The `[Continue]`
variant appends ``[Continue]\\n`` right after the task (``f'{task}[Continue]\\n{history}...'``).

The fine-tuning README's data examples use another order: platform and format come *before* the
history, and the history ends with a newline. Both orders occur in the wild, and a model trained on
one sees the other as a distribution shift, so the order is an explicit choice here
(``order="official"`` or ``"readme"``) and the validator warns when one dataset mixes them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from cogagent_nb.data.actions import ANSWER_FORMATS, PLATFORMS, Action, format_operation, parse_operation

ORDERS: tuple[str, ...] = ("official", "readme")
"""``official``: task, history, platform, format (README, client, cli_demo).
``readme``: task, platform, format, history (the fine-tuning README's data examples)."""

CONTINUE_MARK = "[Continue]\n"


class PromptParseError(ValueError):
    """A user prompt that does not follow either concatenation order."""


@dataclass(frozen=True)
class HistoryStep:
    """One earlier step as the prompt shows it: the Grounded Operation text and the Action sentence."""

    grounded_operation: str
    action: str

    @property
    def operation(self) -> Action:
        """The parsed operation (for drawing history boxes); raises `ActionParseError` if malformed."""
        return parse_operation(self.grounded_operation)


@dataclass(frozen=True)
class PromptParts:
    """A user prompt taken apart by `parse_prompt`."""

    task: str
    platform: str
    answer_format: str
    history: tuple[HistoryStep, ...]
    order: str
    continue_: bool


HistoryLike = HistoryStep | tuple[str | Action, str]


def build_prompt(
    task: str,
    platform: str,
    answer_format: str,
    history: Iterable[HistoryLike] = (),
    *,
    order: str = "official",
    continue_: bool = False,
) -> str:
    """Concatenate a CogAgent user prompt.

    `history` holds `HistoryStep`s or ``(operation, action)`` pairs, where the operation is an
    `Action` or its text. Platform and format are not checked here (the validator warns), so that
    a prompt for a new platform can still be written.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    head = f"Task: {task}" + (CONTINUE_MARK if continue_ else "")
    lines = "".join(f"\n{i}. {step.grounded_operation}\t{step.action}" for i, step in enumerate(_as_steps(history)))
    tail = f"(Platform: {platform})\n(Answer in {answer_format} format.)\n"
    if order == "official":
        return f"{head}\nHistory steps: {lines}\n{tail}"
    return f"{head}\n{tail}History steps: {lines}\n"


def _as_steps(history: Iterable[HistoryLike]) -> list[HistoryStep]:
    steps = []
    for item in history:
        if isinstance(item, HistoryStep):
            steps.append(item)
            continue
        operation, action = item
        text = format_operation(operation) if isinstance(operation, Action) else str(operation)
        if "\n" in text or "\n" in action or "\t" in text:
            raise ValueError(f"a history step must be one line with no tab in the operation: {item!r}")
        steps.append(HistoryStep(text, action))
    return steps


# --- parsing --------------------------------------------------------------------------------------------

_TAIL = r"\(Platform: (?P<platform>[^)\n]*)\)\n\(Answer in (?P<format>[^\n]*?) format\.\)"
_OFFICIAL = re.compile(
    r"Task: (?P<task>.*?)(?P<cont>\[Continue\]\n)?\nHistory steps: ?(?P<history>.*?)\n" + _TAIL + r"\n?", re.DOTALL
)
_README = re.compile(
    r"Task: (?P<task>.*?)(?P<cont>\[Continue\]\n)?\n" + _TAIL + r"\nHistory steps: ?(?P<history>.*?)\n?", re.DOTALL
)
_STEP = re.compile(r"(?P<index>\d+)\. (?P<op>[^\t]*)\t(?P<action>.*)")


def parse_prompt(text: str) -> PromptParts:
    """Take a user prompt apart and say which order it follows.

    Lenient about the last newline (`cli_demo.py` leaves it out) and the space after
    ``History steps:``; strict about the history lines (``i. operation<TAB>action`` with i from 0),
    because a wrong number or a missing tab means the history was built wrongly.
    """
    for order, pattern in (("official", _OFFICIAL), ("readme", _README)):
        match = pattern.fullmatch(text)
        if match:
            history = _parse_history(match.group("history"))
            return PromptParts(
                match.group("task"),
                match.group("platform"),
                match.group("format"),
                history,
                order,
                match.group("cont") is not None,
            )
    raise PromptParseError(_diagnose(text))


def _parse_history(block: str) -> tuple[HistoryStep, ...]:
    lines = [line for line in block.split("\n") if line.strip()]
    steps = []
    for expected, line in enumerate(lines):
        match = _STEP.fullmatch(line)
        if not match:
            raise PromptParseError(f"history line {line!r} is not 'i. operation<TAB>action'")
        if int(match.group("index")) != expected:
            raise PromptParseError(
                f"history step numbered {match.group('index')}, expected {expected} (steps count from 0)"
            )
        steps.append(HistoryStep(match.group("op"), match.group("action")))
    return tuple(steps)


def _diagnose(text: str) -> str:
    """Name the first missing piece, which is more useful than 'does not match'."""
    if not text.startswith("Task: "):
        return "prompt does not start with 'Task: '"
    for piece in ("History steps:", "(Platform: ", "(Answer in ", " format.)"):
        if piece not in text:
            return f"prompt lacks {piece!r}"
    return (
        "prompt does not follow either order: 'Task, History steps, (Platform), (Answer in)' "
        "or 'Task, (Platform), (Answer in), History steps'"
    )


def prompt_problems(parts: PromptParts) -> list[str]:
    """Platform or answer format outside the official lists (warnings: the model was trained on them)."""
    problems = []
    if parts.platform not in PLATFORMS:
        problems.append(f"unknown platform {parts.platform!r}; CogAgent knows {', '.join(PLATFORMS)}")
    if parts.answer_format not in ANSWER_FORMATS:
        problems.append(f"unknown answer format {parts.answer_format!r}; expected one of {', '.join(ANSWER_FORMATS)}")
    return problems
