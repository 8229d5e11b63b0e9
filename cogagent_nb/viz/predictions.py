"""Pictures of what a model did: predicted against target boxes, metric bars, the confusion table,
and an agent episode as a strip of screens.

A click-in-box rate of 30% says little until one sees *where* the other 70% went: next to the target
(a localisation problem), on another element of the same kind (a reading problem), or in a corner
(the model did not look). The colours are those of `viz.plots`: target in red, history in blue;
predictions are drawn in green when their centre lands inside the target and orange when not.

`draw_prediction` uses Pillow only (the `cogagent-nb infer` command saves its PNG without matplotlib);
the other functions return matplotlib figures and never call `plt.show()`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from cogagent_nb.data.boxes import box_center, to_pixels
from cogagent_nb.viz.widget_pictures import detached_subplots, png_picture

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

    from cogagent_nb.infer.agent import EpisodeRun
    from cogagent_nb.infer.evaluate import EvaluationReport
    from cogagent_nb.infer.generate import Prediction

TARGET_RGB = (225, 29, 72)  # viz.plots.TARGET_COLOUR
HIT_RGB = (22, 163, 74)
MISS_RGB = (234, 88, 12)
TARGET_COLOUR, HIT_COLOUR, MISS_COLOUR = "#e11d48", "#16a34a", "#ea580c"


def _inside(point: tuple[float, float], box: Sequence[int]) -> bool:
    x1, y1, x2, y2 = box
    return x1 <= point[0] <= x2 and y1 <= point[1] <= y2


def draw_prediction(
    image: Image.Image,
    box: Sequence[int] | None,
    *,
    target: Sequence[int] | None = None,
    label: str = "",
) -> Image.Image:
    """A copy of `image` with the predicted box (thousandths), its click point and the target box.

    The prediction is green when its centre lies inside `target`, orange otherwise (or when there is
    no target); the target is red. Lines scale with the screenshot so they stay visible on 1920 px.
    """
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width, height = out.size
    line = max(2, round(min(width, height) / 200))
    if target is not None:
        draw.rectangle(to_pixels(target, width, height), outline=TARGET_RGB, width=line)
    if box is not None:
        hit = target is not None and _inside(box_center(box), target)
        colour = HIT_RGB if hit else MISS_RGB
        x1, y1, x2, y2 = to_pixels(box, width, height)
        draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=colour, width=line)
        cx, cy = box_center((x1, y1, x2, y2))
        arm = 4 * line
        draw.line((cx - arm, cy, cx + arm, cy), fill=colour, width=line)
        draw.line((cx, cy - arm, cx, cy + arm), fill=colour, width=line)
        if label:
            draw.rectangle((x1, max(0, y1 - 12), x1 + 6 * len(label) + 4, max(12, y1)), fill=colour)
            draw.text((x1 + 2, max(0, y1 - 12)), label, fill=(255, 255, 255))
    return out


def prediction_image(prediction: Prediction, *, target: Sequence[int] | None = None) -> Image.Image:
    """`draw_prediction` for a `Prediction` (which keeps its screenshot)."""
    if prediction.image is None:
        raise ValueError("this Prediction holds no image; pass the screenshot to draw_prediction yourself")
    operation = prediction.operation
    return draw_prediction(prediction.image, prediction.box, target=target, label=operation.name if operation else "")


def show_prediction(prediction: Prediction, *, target: Sequence[int] | None = None, ax: Any = None) -> Any:
    """The screenshot with the prediction drawn, titled with the generated operation; returns the Axes."""
    import matplotlib.pyplot as plt

    picture = prediction_image(prediction, target=target)
    if ax is None:
        width, height = picture.size
        _, ax = plt.subplots(figsize=(7, 7 * height / width) if width >= height else (4.5, 4.5 * height / width))
    ax.imshow(picture)
    what = str(prediction.operation) if prediction.operation is not None else f"(not parsed) {prediction.text[:60]!r}"
    ax.set_title("\n".join(textwrap.wrap(what, 60)[:2]), fontsize=8, loc="left")
    ax.set_axis_off()
    return ax


def compare_predictions(
    predictions: Sequence[Prediction],
    titles: Sequence[str],
    *,
    target: Sequence[int] | None = None,
    detached: bool = False,
) -> plt.Figure:
    """Several predictions on the same screenshot side by side (before / after fine-tuning, blank image...).

    detached: a figure that pyplot does not track, for widget callbacks (`cogagent_nb.viz.widget_pictures`).
    """
    import matplotlib.pyplot as plt

    make = detached_subplots if detached else plt.subplots
    fig, axes = make(1, len(predictions), figsize=(5.5 * len(predictions), 4.6), squeeze=False)
    for ax, prediction, title in zip(axes[0], predictions, titles):
        show_prediction(prediction, target=target, ax=ax)
        ax.set_title(f"{title}\n{ax.get_title(loc='left')}", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def _panel_grid(count: int, columns: int, panel_size: tuple[float, float]) -> tuple[plt.Figure, Any]:
    """A figure of `count` screenshot panels, `columns` wide at most, axes off (empty panels stay blank)."""
    import matplotlib.pyplot as plt

    columns = max(1, min(columns, count))
    n_rows = max(1, -(-count // columns))
    width, height = panel_size
    fig, axes = plt.subplots(n_rows, columns, figsize=(width * columns, height * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


# --- evaluation figures ------------------------------------------------------------------------------------
def show_box_predictions(report: EvaluationReport, *, limit: int = 8, columns: int = 4) -> plt.Figure:
    """Predicted (green hit / orange miss) against target (red) boxes on the first `limit` samples with a box."""

    rows = [row for row in report.rows if row.target_box is not None][:limit]
    fig, axes = _panel_grid(len(rows), columns, (4.2, 3.4))
    for ax, row in zip(axes.flat, rows):
        with Image.open(row.image_path) as image:
            picture = draw_prediction(image, row.predicted_box, target=row.target_box)
        ax.imshow(picture)
        verdict = "hit" if row.score.click_in_box else "miss"
        ax.set_title(f"#{row.index} {row.platform} · {row.score.reference_type} · {verdict}", fontsize=8)
    if not rows:
        axes.flat[0].text(0.5, 0.5, "no sample with a target box", ha="center", va="center")
    fig.suptitle("red: target box · green/orange: predicted box and click (hit/miss)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_scores(report: EvaluationReport, *, metrics: Sequence[str] | None = None) -> plt.Figure:
    """Grouped bars of each metric: overall, per platform and per answer format."""
    import matplotlib.pyplot as plt

    from cogagent_nb.infer.metrics import METRICS

    metrics = list(metrics or METRICS)
    panels = {
        "overall": {"all": report.summary},
        "per platform": report.by_platform,
        "per answer format": report.by_format,
    }
    fig, axes = plt.subplots(1, 3, figsize=(17, 3.8), gridspec_kw={"width_ratios": [1, 2, 3]})
    for ax, (title, groups) in zip(axes, panels.items()):
        names = list(groups)
        bar = 0.8 / len(metrics)
        for i, metric in enumerate(metrics):
            values = [groups[g][metric] or 0.0 for g in names]
            ax.bar([x + i * bar for x in range(len(names))], values, width=bar, label=metric)
        ax.set_xticks([x + bar * (len(metrics) - 1) / 2 for x in range(len(names))])
        ax.set_xticklabels([_short(n) for n in names], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{title} (n = {sum(groups[g]['n'] for g in names)})", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


LEARNING_METRICS: dict[str, str] = {
    "parse_rate": "parse",
    "type_accuracy": "action type",
    "click_in_box": "click-in-box",
}
BOX_ONLY_ROWS: tuple[str, ...] = ("most common box", "text-only guess")
"""Rows of a learning report that copy the reference answer and replace only its box: their parse and
action-type rates are 100% by construction, so only their click-in-box bar is drawn."""


def plot_learning_report(results: dict[str, dict], *, ax: Any = None) -> Any:
    """Bars of `train.grounding.grounding_report`: parse, action type and click-in-box for each row.

    A dashed line marks the text-only guess's click-in-box: a model grounds its clicks in the screenshot
    only when its bar rises above that line and its blank-image bar falls back to it. The screenshot-free
    guesses get a click-in-box bar only (`BOX_ONLY_ROWS`). Each row keeps its colour in every group.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 3.8))
    colours = {row: f"C{i}" for i, row in enumerate(results)}
    width = 0.8 / len(results)
    for x, metric in enumerate(LEARNING_METRICS):
        rows = [row for row in results if metric == "click_in_box" or row not in BOX_ONLY_ROWS]
        for i, row in enumerate(rows):
            value = results[row][metric] or 0.0
            position = x + (i - (len(rows) - 1) / 2) * width
            bars = ax.bar(position, value, width=width, color=colours[row], label=row if x == 2 else None)
            ax.bar_label(bars, labels=[f"{value:.0%}"], fontsize=7, padding=1)
    if "text-only guess" in results:
        level = results["text-only guess"]["click_in_box"] or 0.0
        ax.axhline(level, color="black", linestyle="--", linewidth=0.8)
        ax.text(0.005, level, " text-only level", transform=ax.get_yaxis_transform(), fontsize=7, va="bottom")
    ax.set_xticks(range(len(LEARNING_METRICS)), list(LEARNING_METRICS.values()))
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=7, ncol=len(results), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.figure.tight_layout()
    return ax


def show_clicks(model, tokenizer, conversations: Sequence[dict], *, blank: bool = True) -> plt.Figure:
    """The model's greedy clicks on `conversations` ("click X" samples with PIL images), drawn on each
    screenshot over the target (red); with `blank`, a second row shows the same model on white screens.

    The picture behind a click-in-box figure: a model that reads the screenshot follows the target
    around in the first row and, with nothing to read, puts every click in one place in the second (or,
    on a screen unlike its training screens, writes no box at all: "no box written" under the panel).
    """
    import matplotlib.pyplot as plt

    from cogagent_nb.infer.metrics import answer_operation
    from cogagent_nb.train.grounding import generate_answers, white_like

    def clicked_box(answer: str):  # None for an answer that does not parse: only the target is drawn
        operation = answer_operation(answer)
        return operation.box if operation is not None else None

    rows = {"screenshot": False, "blank screen": True} if blank else {"screenshot": False}
    fig, axes = plt.subplots(
        len(rows), len(conversations), figsize=(1.9 * len(conversations), 2.1 * len(rows)), squeeze=False
    )
    for r, (title, blank_images) in enumerate(rows.items()):
        answers = generate_answers(model, tokenizer, conversations, blank_images=blank_images)
        for c, (conversation, answer) in enumerate(zip(conversations, answers)):
            image = conversation["messages"][0]["image"]
            target = answer_operation(conversation["messages"][1]["content"]).box
            shown, box = white_like(image) if blank_images else image, clicked_box(answer)
            ax = axes[r][c]
            ax.imshow(draw_prediction(shown, box, target=target))
            ax.set_xticks([])  # no ticks, but keep the frame: a white screen must still show as a screen
            ax.set_yticks([])
            if box is None:
                ax.set_xlabel("no box written", fontsize=7)
        axes[r][0].set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def _short(name: str) -> str:
    return name.replace("-Operation", "-Op").replace("-Sensitive", "-Sens")


def plot_confusion(confusion: dict[str, dict[str, int]], *, ax: Any = None) -> Any:
    """Reference action type (rows) against predicted type (columns), counts in the cells."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = list(confusion)
    columns = sorted({c for row in confusion.values() for c in row} | set(rows))
    counts = np.array([[confusion[r].get(c, 0) for c in columns] for r in rows])
    if ax is None:
        _, ax = plt.subplots(figsize=(1.1 * len(columns) + 2, 0.5 * len(rows) + 1.5))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    top = counts.max() if counts.size else 0
    for (i, j), value in np.ndenumerate(counts):
        if value:
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    ax.set_title("action types", fontsize=9)
    return ax


# --- agent episodes ----------------------------------------------------------------------------------------
def show_episode_run(run: EpisodeRun, *, columns: int = 4) -> plt.Figure:
    """One panel per agent step: the screen, the target (red), the model's box (green/orange), the verdict."""

    steps = run.steps
    fig, axes = _panel_grid(len(steps), columns, (4.4, 3.9))
    for ax, step in zip(axes.flat, steps):
        prediction = step.prediction
        ax.imshow(draw_prediction(prediction.image, prediction.box, target=step.expected.box))
        said = str(prediction.operation) if prediction.operation is not None else "(not parsed)"
        verdict = "advances" if step.advanced else "stops here"
        ax.set_title(
            f"step {step.index}: {verdict}\nwanted {step.expected.name} · said "
            + textwrap.shorten(said, 46, placeholder="..."),
            fontsize=8,
            loc="left",
            color=HIT_COLOUR if step.advanced else MISS_COLOUR,
        )
    outcome = "task completed" if run.success else f"stopped: {run.reason}"
    fig.suptitle(f"{run.task}  [{run.platform}]  {outcome}", fontsize=10)
    fig.tight_layout()
    return fig


# --- a widget to try screens -------------------------------------------------------------------------------
def prediction_browser(models: dict[str, tuple[Any, Any]], samples: Sequence[Any], **settings: Any) -> Any:
    """An ipywidgets screen picker: choose a sample, see every model's answer drawn on it, side by side.

    models: name -> (tokenizer, model), e.g. {"before": ..., "after fine-tuning": ...}.
    samples: `evaluate.EvalSample`s (screenshot, prompt, reference). settings go to `generate_answers`.
    The first sample is drawn at once, so an executed notebook shows a picture even without a kernel.
    """
    import ipywidgets as widgets
    from IPython.display import display

    from cogagent_nb.data.actions import parse_answer
    from cogagent_nb.data.images import load_image
    from cogagent_nb.data.prompts import parse_prompt
    from cogagent_nb.infer.generate import generate_answers, make_prediction

    if not samples:
        raise ValueError("prediction_browser needs at least one sample")
    options = [(f"{i}: {textwrap.shorten(parse_prompt(s.prompt).task, 60)}", i) for i, s in enumerate(samples)]
    picker = widgets.Dropdown(options=options, value=0, description="screen", layout={"width": "44em"})
    output = widgets.Output()

    def render(index: int) -> None:
        sample = samples[index]
        image, parts = load_image(sample.image_path), parse_prompt(sample.prompt)
        target = parse_answer(sample.reference).operation.box
        predictions = []
        for tokenizer, model in models.values():
            generated = generate_answers(model, tokenizer, [image], [sample.prompt], **settings)[0]
            predictions.append(
                make_prediction(
                    image, sample.prompt, generated, parts.task, parts.platform, parts.answer_format, parts.history
                )
            )
        fig = compare_predictions(predictions, list(models), target=target, detached=True)
        with output:
            output.clear_output(wait=True)
            print(
                f"task: {parts.task}\nreference: {sample.reference.splitlines()[-2 if len(sample.reference.splitlines()) > 1 else 0]}"
            )
            display(png_picture(fig))

    picker.observe(lambda change: render(change["new"]), names="value")
    render(0)
    return widgets.VBox([picker, output])
