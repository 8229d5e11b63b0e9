"""GUI-agent metrics: how often a predicted answer does the right thing on the screen.

Text overlap (ROUGE, BLEU) says little about a GUI agent: "Click the OK button" and "Click the Cancel
button" differ by one word and do opposite things. GUI-agent papers score the *action* instead, and so
does this module. For each (prediction, reference) pair of answer texts:

- **parsed**: the prediction's `Grounded Operation` line reads as an action (`actions.parse_answer`);
- **type**: its action name equals the reference's (CLICK vs TYPE vs ...);
- **click-in-box**: for references with a box, the centre of the predicted box lies inside the target
  box (ScreenSpot's rule, SeeClick paper, Cheng et al. 2024); a prediction without a box misses;
- **text**: for references that carry text (TYPE's `text`, KEY_PRESS's `key`, LAUNCH's `app`, a `url`),
  exact match after stripping surrounding whitespace;
- **step success**: type right, and the box (if the reference has one) and the text (if it has one) too.

Rates are over the pairs where each metric applies (click-in-box over references with a box, text over
references with text), so a dataset without typing does not dilute the click rate. `score_answers`
returns one `GuiScore` per pair; `summarize` turns a list of them (optionally grouped, e.g. by platform
or answer format) into rates; `action_confusion` counts reference type x predicted type.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cogagent_nb.data.actions import Action, ActionParseError, Answer, parse_answer
from cogagent_nb.data.boxes import box_center

TEXT_ARGUMENTS: tuple[str, ...] = ("text", "key", "app", "url")
"""Arguments whose exact value decides whether an action did the right thing (first present wins)."""

UNPARSED = "(unparsed)"
"""The predicted type recorded for an answer whose operation could not be read."""

METRICS: tuple[str, ...] = ("parse_rate", "type_accuracy", "click_in_box", "text_exact", "step_success")
"""The rates `summarize` reports, in the order tables print them."""


@dataclass(frozen=True)
class GuiScore:
    """The verdicts for one prediction. `None` means "does not apply to this reference"."""

    parsed: bool
    reference_type: str
    predicted_type: str
    type_correct: bool
    click_in_box: bool | None
    text_exact: bool | None
    step_success: bool


def answer_operation(text: str) -> Action | None:
    """The answer's grounded operation, or None when the answer or its operation cannot be read."""
    try:
        answer: Answer = parse_answer(text)
    except ActionParseError:
        return None
    return answer.operation


def _text_argument(action: Action) -> str | None:
    for key in TEXT_ARGUMENTS:
        value = action.args.get(key)
        if isinstance(value, str):
            return value.strip()
    return None


def centre_in_box(predicted: Sequence[float], target: Sequence[float]) -> bool:
    """True when the centre of `predicted` lies inside `target` (edges included); both in thousandths."""
    x, y = box_center(predicted)
    x1, y1, x2, y2 = target
    return x1 <= x <= x2 and y1 <= y <= y2


def score_answer(prediction: str, reference: str) -> GuiScore:
    """Score one generated answer against the reference answer text of the same sample.

    Raises `ValueError` when the *reference* has no readable operation: that is a data error (run
    `cogagent-nb validate`), not a model error, and counting it as a miss would hide it.
    """
    target = answer_operation(reference)
    if target is None:
        raise ValueError(f"reference answer has no readable Grounded Operation: {reference!r}")
    predicted = answer_operation(prediction)
    parsed = predicted is not None
    type_correct = parsed and predicted.name == target.name
    click = None
    if target.box is not None:
        click = bool(parsed and predicted.box is not None and centre_in_box(predicted.box, target.box))
    text = None
    target_text = _text_argument(target)
    if target_text is not None:
        text = bool(parsed and _text_argument(predicted) == target_text)
    success = type_correct and click is not False and text is not False
    return GuiScore(
        parsed=parsed,
        reference_type=target.name,
        predicted_type=predicted.name if parsed else UNPARSED,
        type_correct=type_correct,
        click_in_box=click,
        text_exact=text,
        step_success=success,
    )


def score_answers(predictions: Sequence[str], references: Sequence[str]) -> list[GuiScore]:
    """`score_answer` over aligned lists; the lengths must match."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return [score_answer(p, r) for p, r in zip(predictions, references)]


def _rate(values: Iterable[bool | None]) -> float | None:
    applicable = [v for v in values if v is not None]
    return sum(applicable) / len(applicable) if applicable else None


def summarize(scores: Sequence[GuiScore]) -> dict[str, float | int | None]:
    """Rates in [0, 1] for `METRICS` plus `n` (pairs) and the counts each rate is taken over.

    A rate is None when no reference in `scores` has that property (e.g. no TYPE steps).
    """
    return {
        "n": len(scores),
        "parse_rate": _rate(s.parsed for s in scores),
        "type_accuracy": _rate(s.type_correct for s in scores),
        "click_in_box": _rate(s.click_in_box for s in scores),
        "text_exact": _rate(s.text_exact for s in scores),
        "step_success": _rate(s.step_success for s in scores),
        "n_with_box": sum(s.click_in_box is not None for s in scores),
        "n_with_text": sum(s.text_exact is not None for s in scores),
    }


def summarize_by(scores: Sequence[GuiScore], groups: Sequence[str]) -> dict[str, dict[str, float | int | None]]:
    """`summarize` per group label (platform, answer format, ...), groups in sorted order."""
    if len(scores) != len(groups):
        raise ValueError(f"{len(scores)} scores for {len(groups)} group labels")
    buckets: dict[str, list[GuiScore]] = defaultdict(list)
    for score, group in zip(scores, groups):
        buckets[group].append(score)
    return {group: summarize(buckets[group]) for group in sorted(buckets)}


def action_confusion(scores: Sequence[GuiScore]) -> dict[str, dict[str, int]]:
    """Counts of reference type (outer key) x predicted type (inner key, `UNPARSED` for failures)."""
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for score in scores:
        table[score.reference_type][score.predicted_type] += 1
    return {ref: dict(sorted(row.items())) for ref, row in sorted(table.items())}


def gui_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int | None]:
    """The one-call form used by training's evaluation loop: `summarize(score_answers(...))`."""
    return summarize(score_answers(predictions, references))
