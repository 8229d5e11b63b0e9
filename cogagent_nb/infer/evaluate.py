"""Evaluate a model on a CogAgent JSONL file the way GUI-agent papers do (`cogagent-nb evaluate`).

For every sample the model answers the sample's own user prompt on the sample's screenshot (greedy,
batched, `generate.generate_answers`), and `metrics.score_answer` compares the answer's *action* with
the reference answer: parse rate, action-type accuracy, click-in-box (ScreenSpot's rule: the centre of
the predicted box inside the target box), typed-text exact match and step success. The report groups
them per platform and per answer format and counts reference type x predicted type.

`images="blank"` replaces every screenshot by one flat colour (its mean colour) and `"shuffled"` by the
screenshot of another sample: the same model, the same prompts, no usable picture. A model that
grounds its answers in the screenshot loses click accuracy there; one that guesses from the task text
does not. That comparison is what "grounding" means, and notebook 07 shows it.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageStat

from cogagent_nb.data.actions import Action, ActionParseError, format_operation, parse_answer
from cogagent_nb.data.prompts import PromptParseError, parse_prompt
from cogagent_nb.data.validation import load_numbered_conversations
from cogagent_nb.infer.metrics import METRICS, GuiScore, action_confusion, score_answer, summarize, summarize_by

if TYPE_CHECKING:
    import torch

    from cogagent_nb.data.tokenizer import ChatGLM4Tokenizer

IMAGE_MODES: tuple[str, ...] = ("screenshots", "blank", "shuffled")
"""What the model sees: the true screenshots, each one flattened to its mean colour, or another sample's."""


@dataclass(frozen=True)
class EvaluatedSample:
    """One sample of the data file with the model's answer and its verdicts."""

    line: int  # 1-based line in the data file
    index: int  # position among the evaluated samples
    image_path: Path
    platform: str
    answer_format: str
    prompt: str
    reference: str
    prediction: str
    score: GuiScore
    target_box: tuple[int, int, int, int] | None
    predicted_box: tuple[int, int, int, int] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "image": str(self.image_path),
            "platform": self.platform,
            "answer_format": self.answer_format,
            "reference": self.reference,
            "prediction": self.prediction,
            "target_box": list(self.target_box) if self.target_box else None,
            "predicted_box": list(self.predicted_box) if self.predicted_box else None,
            **{key: getattr(self.score, key) for key in GuiScore.__dataclass_fields__},
        }


@dataclass
class EvaluationReport:
    """All verdicts of one evaluation run and their summaries (rates in [0, 1])."""

    data_file: str
    images: str
    rows: list[EvaluatedSample] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def scores(self) -> list[GuiScore]:
        return [row.score for row in self.rows]

    @property
    def summary(self) -> dict[str, float | int | None]:
        return summarize(self.scores)

    @property
    def by_platform(self) -> dict[str, dict[str, float | int | None]]:
        return summarize_by(self.scores, [row.platform for row in self.rows])

    @property
    def by_format(self) -> dict[str, dict[str, float | int | None]]:
        return summarize_by(self.scores, [row.answer_format for row in self.rows])

    @property
    def confusion(self) -> dict[str, dict[str, int]]:
        return action_confusion(self.scores)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_file": self.data_file,
            "images": self.images,
            "seconds": round(self.seconds, 2),
            "summary": self.summary,
            "by_platform": self.by_platform,
            "by_format": self.by_format,
            "confusion": self.confusion,
            "samples": [row.to_dict() for row in self.rows],
        }

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def table(self) -> str:
        """Rates as a text table: overall, then per platform and per answer format."""
        header = f"{'group':<36}{'n':>5}" + "".join(f"{m:>15}" for m in METRICS)
        lines = [header]
        groups = [("all", self.summary)]
        groups += [(f"platform {k}", v) for k, v in self.by_platform.items()]
        groups += [(f"format {k}", v) for k, v in self.by_format.items()]
        for name, summary in groups:
            cells = "".join(f"{_percent(summary[m]):>15}" for m in METRICS)
            lines.append(f"{name:<36}{summary['n']:>5}{cells}")
        return "\n".join(lines)

    def confusion_table(self) -> str:
        confusion = self.confusion
        columns = sorted({c for row in confusion.values() for c in row} | set(confusion))
        corner = "reference \\ predicted"
        lines = [f"{corner:<22}" + "".join(f"{c[:12]:>13}" for c in columns)]
        for ref, row in confusion.items():
            lines.append(f"{ref:<22}" + "".join(f"{row.get(c, 0):>13}" for c in columns))
        return "\n".join(lines)

    def __str__(self) -> str:
        head = f"{self.data_file}: {len(self.rows)} samples, images = {self.images}, {self.seconds:.1f} s"
        return f"{head}\n{self.table()}\n\n{self.confusion_table()}"

    def _repr_html_(self) -> str:
        return f"<pre>{self}</pre>"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def compare_reports(reports: dict[str, EvaluationReport], metrics: tuple[str, ...] = METRICS) -> str:
    """One line per report (e.g. before / after fine-tuning, true / blank screenshots), the rates side by side."""
    width = max(len(name) for name in reports) + 2
    lines = [f"{'':<{width}}{'n':>5}" + "".join(f"{m:>15}" for m in metrics)]
    for name, report in reports.items():
        summary = report.summary
        lines.append(f"{name:<{width}}{summary['n']:>5}" + "".join(f"{_percent(summary[m]):>15}" for m in metrics))
    return "\n".join(lines)


# --- reading the data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSample:
    """What evaluation needs from one conversation: the screenshot, the user prompt, the reference answer."""

    line: int
    image_path: Path
    prompt: str
    reference: str
    platform: str
    answer_format: str
    data_file: Path | None = None  # the JSONL file it came from, for messages that point back into it
    image_message: int = 0  # the index of the user turn that holds the screenshot

    def image_field(self) -> str:
        """`FILE:LINE: messages[i].image`, as the validator names the field."""
        return f"{self.data_file}:{self.line}: messages[{self.image_message}].image"


def read_eval_samples(data_file: str | os.PathLike, *, limit: int | None = None) -> list[EvalSample]:
    """The first `limit` samples of a JSONL file: its first user turn with an image and the answer after it.

    Errors name the file and line: a missing file, invalid JSONL (via the validator's `DataFormatError`),
    a conversation without a screenshot or an answer, or a reference answer without a readable operation.
    """
    path = Path(data_file)
    if not path.is_file():
        what = "is a folder; give one of its .jsonl files (e.g. test.jsonl)" if path.is_dir() else "no such data file"
        raise FileNotFoundError(f"{path}: {what}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit {limit}: expected a number of samples of at least 1 (or None for all)")
    numbered = load_numbered_conversations(path)
    return [_eval_sample(path, line, conversation) for line, conversation in numbered[:limit]]


def _eval_sample(path: Path, number: int, conversation: dict[str, Any]) -> EvalSample:
    messages = conversation["messages"]
    user_at = next((i for i, m in enumerate(messages) if m["role"] == "user" and m.get("image")), None)
    if user_at is None:
        raise ValueError(f"{path}:{number}: messages: no user turn with an image to evaluate on")
    answer_at = next((i for i in range(user_at + 1, len(messages)) if messages[i]["role"] == "assistant"), None)
    if answer_at is None:
        raise ValueError(f"{path}:{number}: messages: no assistant answer after the user turn")
    reference = messages[answer_at]["content"]
    try:
        operation = parse_answer(reference).operation
    except ActionParseError as err:
        raise ValueError(f"{path}:{number}: messages[{answer_at}].content: {err}") from None
    if operation is None:
        raise ValueError(f"{path}:{number}: messages[{answer_at}].content: no 'Grounded Operation:' line")
    prompt = messages[user_at]["content"]
    try:
        parts = parse_prompt(prompt)
    except PromptParseError as err:  # the validator only warns: a prompt of its own making trains fine
        raise ValueError(
            f"{path}:{number}: messages[{user_at}].content: {err}; evaluation reads the platform and answer "
            "format from the official prompt (cnb.build_prompt writes one)"
        ) from None
    return EvalSample(
        number,
        path.parent / messages[user_at]["image"],
        prompt,
        reference,
        parts.platform,
        parts.answer_format,
        data_file=path,
        image_message=user_at,
    )


def blank_like(image: Image.Image) -> Image.Image:
    """A screenshot with every pixel set to its mean colour: same size and brightness, no layout."""
    mean = tuple(int(round(v)) for v in ImageStat.Stat(image.convert("RGB")).mean)
    return Image.new("RGB", image.size, mean)


def _screenshot(sample: EvalSample) -> Image.Image:
    """The sample's screenshot, or an error naming the data file's line and field (the loader checks only
    that the file exists; a file that is not an image shows here)."""
    from cogagent_nb.data.images import load_image

    try:
        return load_image(sample.image_path)
    except OSError as err:  # FileNotFoundError, PIL's UnidentifiedImageError, a truncated file
        raise _unreadable(sample, err) from None


def check_screenshots(samples: list[EvalSample]) -> None:
    """Open every screenshot's header (no pixels decoded), so that a file that is not an image stops the run
    before the model loads; `cogagent-nb evaluate` calls it."""
    from PIL import Image

    for sample in samples:
        try:
            with Image.open(sample.image_path):
                pass
        except OSError as err:
            raise _unreadable(sample, err) from None


def _unreadable(sample: EvalSample, err: OSError) -> ValueError:
    return ValueError(f"{sample.image_field()}: {sample.image_path} is not a readable image ({err})")


def model_images(samples: list[EvalSample], mode: str) -> list[Image.Image]:
    """The pictures the model is shown in `mode` (see `IMAGE_MODES`)."""
    if mode not in IMAGE_MODES:
        raise ValueError(f"images must be one of {IMAGE_MODES}, got {mode!r}")
    images = [_screenshot(sample) for sample in samples]
    if mode == "blank":
        return [blank_like(image) for image in images]
    if mode == "shuffled":  # each sample gets the screenshot of the sample half the set away
        shift = max(1, len(images) // 2)
        return [images[(i + shift) % len(images)] for i in range(len(images))]
    return images


# --- the run -------------------------------------------------------------------------------------------------
def evaluate(
    model: torch.nn.Module,
    tokenizer: ChatGLM4Tokenizer,
    data_file: str | os.PathLike,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    images: str = "screenshots",
    progress: bool = True,
    max_new_tokens: int = 128,
    **settings: Any,
) -> EvaluationReport:
    """Generate an answer for each sample of `data_file` and score it (module docstring).

    settings: further `generation.generation_kwargs` options (do_sample, temperature, ...).
    """
    from cogagent_nb.infer.generate import generate_answers

    samples = read_eval_samples(data_file, limit=limit)
    pictures = model_images(samples, images)
    start = time.perf_counter()
    generated = generate_answers(
        model,
        tokenizer,
        pictures,
        [s.prompt for s in samples],
        batch_size=batch_size,
        progress=progress,
        max_new_tokens=max_new_tokens,
        **settings,
    )
    report = EvaluationReport(str(data_file), images, seconds=time.perf_counter() - start)
    for index, (sample, answer) in enumerate(zip(samples, generated)):
        report.rows.append(_evaluated(index, sample, answer.text))
    return report


def _evaluated(index: int, sample: EvalSample, prediction: str) -> EvaluatedSample:
    score = score_answer(prediction, sample.reference)
    target = parse_answer(sample.reference).operation
    predicted_box = None
    if score.parsed:
        predicted_box = parse_answer(prediction).operation.box
    return EvaluatedSample(
        line=sample.line,
        index=index,
        image_path=sample.image_path,
        platform=sample.platform,
        answer_format=sample.answer_format,
        prompt=sample.prompt,
        reference=sample.reference,
        prediction=prediction,
        score=score,
        target_box=target.box,
        predicted_box=predicted_box,
    )


# --- baselines that never look at the screenshot ----------------------------------------------------------------
BASELINES: tuple[str, ...] = ("most_common_box", "text_only")
"""`most_common_box`: the most frequent target box of the training file, everywhere.
`text_only`: the mean training box of the same platform and element label (`element_info`, which the task
text names), falling back to the platform's mean box, then to the overall mean."""


def baseline_report(
    train_file: str | os.PathLike, eval_file: str | os.PathLike, kind: str, *, limit: int | None = None
) -> EvaluationReport:
    """Score a guess that never looks at the screenshot, as a floor for click-in-box.

    Each prediction is the reference operation with only its box replaced by the guess, so the action
    type and text are right by construction: only `click_in_box` (and step success, which then equals it on
    boxed steps) measures the baseline. A model whose clicks do not beat `text_only` has not learnt to look.
    """
    if kind not in BASELINES:
        raise ValueError(f"kind must be one of {BASELINES}, got {kind!r}")
    guess = _box_guesser(read_eval_samples(train_file), kind)
    report = EvaluationReport(str(eval_file), f"baseline: {kind}")
    for index, sample in enumerate(read_eval_samples(eval_file, limit=limit)):
        target = parse_answer(sample.reference).operation
        prediction = sample.reference
        if target.box is not None:
            guessed = Action(target.name, {**target.args, "box": guess(sample.platform, target)})
            prediction = f"Grounded Operation: {format_operation(guessed)}"
        report.rows.append(_evaluated(index, sample, prediction))
    return report


def _box_guesser(train: list[EvalSample], kind: str):
    """A function (platform, target operation) -> guessed box, fitted on the training samples' boxes."""
    boxes: list[tuple[str, str, tuple[int, int, int, int]]] = []
    for sample in train:
        operation = parse_answer(sample.reference).operation
        if operation.box is not None:
            boxes.append((sample.platform, str(operation.args.get("element_info", "")), operation.box))
    if not boxes:

        def no_guess(platform: str, target: Action) -> tuple[int, int, int, int]:
            raise ValueError("the training file has no target box to learn a guess from")

        return no_guess
    if kind == "most_common_box":
        common = Counter(box for _, _, box in boxes).most_common(1)[0][0]
        return lambda platform, target: common
    by_label: dict[tuple[str, str], list] = defaultdict(list)
    by_platform: dict[str, list] = defaultdict(list)
    for platform, label, box in boxes:
        by_label[platform, label].append(box)
        by_platform[platform].append(box)
    overall = _mean_box([box for _, _, box in boxes])

    def guess(platform: str, target: Action) -> tuple[int, int, int, int]:
        group = by_label.get((platform, str(target.args.get("element_info", "")))) or by_platform.get(platform)
        return _mean_box(group) if group else overall

    return guess


def _mean_box(boxes: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    return tuple(int(round(sum(box[i] for box in boxes) / len(boxes))) for i in range(4))  # type: ignore[return-value]
