"""Pictures for the course notebooks: screenshots with their boxes, and a sample browser.

Numbers about GUI data mean little until they are drawn: a box in thousandths is only checked by
looking at it on the screenshot. Every lesson adds its plots here, so that notebook cells stay one line
long and the same picture looks the same in every lesson.

Conventions: functions take an optional matplotlib `ax` and return the `Axes` (or a `Figure`) they
drew on, and never call `plt.show()`, so that they work in notebooks, scripts and tests alike.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle
from PIL import Image

from cogagent_nb.data.actions import Action, Answer, parse_answer
from cogagent_nb.data.boxes import to_pixels
from cogagent_nb.data.prompts import PromptParts, parse_prompt
from cogagent_nb.viz.widget_pictures import detached_subplots, png_picture

TARGET_COLOUR = "#e11d48"
HISTORY_COLOUR = "#2563eb"


@dataclass(frozen=True)
class SampleView:
    """One conversation taken apart for display: screenshot, prompt parts and parsed answer."""

    image: Image.Image
    image_path: Path
    prompt: PromptParts
    answer: Answer

    @property
    def operation(self) -> Action | None:
        return self.answer.operation


def read_sample(conversation: dict[str, Any], data_dir: str | Path) -> SampleView:
    """Open the screenshot and parse the user prompt and the (last) assistant answer of a conversation."""
    messages = conversation["messages"]
    user = next(m for m in messages if m["role"] == "user" and m.get("image"))
    assistant = [m for m in messages if m["role"] == "assistant"][-1]
    path = Path(data_dir) / user["image"]
    with Image.open(path) as image:
        image = image.convert("RGB")
    return SampleView(image, path, parse_prompt(user["content"]), parse_answer(assistant["content"]))


def draw_box(
    ax: Axes, box: Sequence[int], width: int, height: int, *, colour: str, label: str = "", dashed: bool = False
) -> None:
    """Draw one box given in thousandths on an image of `width` × `height` pixels."""
    x1, y1, x2, y2 = to_pixels(box, width, height)
    ax.add_patch(
        Rectangle(
            (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2.5, linestyle="--" if dashed else "-"
        )
    )
    if label:
        ax.text(
            x1,
            max(y1 - 3, 0),
            label,
            color="white",
            fontsize=8,
            va="bottom",
            bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.5},
        )


def show_sample(
    conversation: dict[str, Any],
    data_dir: str | Path,
    *,
    ax: Axes | None = None,
    history: bool = False,
    detached: bool = False,
) -> Axes:
    """A screenshot in a frame with its target box (solid red); `history=True` adds the history steps'
    boxes (dashed blue, labelled "earlier screen").

    History boxes were chosen on *earlier* screens, so on this one they usually sit on unrelated
    elements; they are drawn only when asked, to show where the agent clicked before, which the model
    reads from the prompt as text (it never sees the old screenshots). A portrait screenshot (a phone)
    gets a thick dark bezel so that its white edges do not melt into the page.
    detached: without `ax`, draw on a figure that pyplot does not track, for widget callbacks
    (`cogagent_nb.viz.widget_pictures`).
    """
    view = read_sample(conversation, data_dir)
    width, height = view.image.size
    if ax is None:
        make = detached_subplots if detached else plt.subplots
        _, ax = make(figsize=(7, 7 * height / width) if width >= height else (4.5, 4.5 * height / width))
    ax.imshow(view.image)
    if history:
        for i, step in enumerate(view.prompt.history):
            box = step.operation.box
            if box is not None:
                label = f"earlier screen, step {i}: {step.operation.name}"
                draw_box(ax, box, width, height, colour=HISTORY_COLOUR, label=label, dashed=True)
    operation = view.operation
    if operation is not None and operation.box is not None:
        draw_box(ax, operation.box, width, height, colour=TARGET_COLOUR, label=f"target: {operation.name}")
    ax.set_title(_title(view), fontsize=9, loc="left")
    _frame(ax, phone=height > width)
    return ax


def _frame(ax: Axes, *, phone: bool) -> None:
    """A thin grey frame around a desktop screenshot, a thick dark bezel around a phone's."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor("#222222" if phone else "#888888")
        spine.set_linewidth(7 if phone else 1)


def _title(view: SampleView) -> str:
    operation = view.operation
    what = str(operation) if operation is not None else "(no operation)"
    if len(what) > 70:
        what = what[:67] + "..."
    end = "  <<END>>" if view.answer.end else ""
    task = textwrap.shorten(view.prompt.task, width=70, placeholder="...")
    return (
        f"{view.prompt.platform} · {view.prompt.answer_format} · step {len(view.prompt.history)}\n{task}\n{what}{end}"
    )


def show_samples(
    conversations: Sequence[dict[str, Any]], data_dir: str | Path, *, columns: int = 3, history: bool = False
) -> plt.Figure:
    """Several samples side by side (e.g. the steps of one episode)."""
    rows = max(1, -(-len(conversations) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(conversations) :]:
        ax.set_axis_off()
    for ax, conversation in zip(axes.flat, conversations):
        show_sample(conversation, data_dir, ax=ax, history=history)
    fig.tight_layout()
    return fig


def sample_browser(conversations: Sequence[dict[str, Any]], data_dir: str | Path, *, start: int = 0):
    """An ipywidgets browser: a slider and ◀ ▶ buttons page through samples, showing picture and text.

    Returns the widget (display it as a cell's last expression). Its first page is drawn at once, so
    the widget shows something even where no kernel answers its events (an executed notebook).
    """
    import ipywidgets as widgets
    from IPython.display import display

    if not conversations:
        raise ValueError("sample_browser needs at least one conversation")
    slider = widgets.IntSlider(
        value=start, min=0, max=len(conversations) - 1, description="sample", continuous_update=False
    )
    previous, following = widgets.Button(description="◀"), widgets.Button(description="▶")
    history = widgets.Checkbox(value=False, description="history boxes (from earlier screens)", indent=False)
    picture, text = widgets.Output(), widgets.Output(layout={"max_width": "46em"})

    def render(index: int) -> None:
        conversation = conversations[index]
        ax = show_sample(conversation, data_dir, history=history.value, detached=True)  # not through pyplot
        with picture:
            picture.clear_output(wait=True)
            display(png_picture(ax.figure))
        with text:
            text.clear_output(wait=True)
            for message in conversation["messages"]:
                print(f"--- {message['role']}" + (f" [{message['image']}]" if message.get("image") else ""))
                print(message["content"])

    slider.observe(lambda change: render(change["new"]), names="value")
    history.observe(lambda _: render(slider.value), names="value")
    previous.on_click(lambda _: setattr(slider, "value", max(slider.min, slider.value - 1)))
    following.on_click(lambda _: setattr(slider, "value", min(slider.max, slider.value + 1)))
    render(start)
    return widgets.VBox([widgets.HBox([previous, slider, following, history]), widgets.HBox([picture, text])])


def show_dataset_overview(splits: dict[str, Sequence[dict[str, Any]]]) -> plt.Figure:
    """Bar charts of what a dataset holds, per split: actions, answer formats, platforms, history length.

    The first look at any new dataset: a split without some action or format cannot teach or test it.
    """
    from collections import Counter

    counters: dict[str, dict[str, Counter]] = {"action": {}, "answer format": {}, "platform": {}, "history steps": {}}
    for split, conversations in splits.items():
        for name in counters:
            counters[name][split] = Counter()
        for conversation in conversations:
            user = next(m for m in conversation["messages"] if m["role"] == "user")
            answer = parse_answer([m for m in conversation["messages"] if m["role"] == "assistant"][-1]["content"])
            prompt = parse_prompt(user["content"])
            counters["action"][split][answer.operation.name if answer.operation else "(none)"] += 1
            counters["answer format"][split][prompt.answer_format] += 1
            counters["platform"][split][prompt.platform] += 1
            counters["history steps"][split][str(len(prompt.history))] += 1
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for ax, (name, by_split) in zip(axes, counters.items()):
        keys = sorted(set().union(*by_split.values()), key=lambda k: (len(k), k) if name == "history steps" else k)
        bar = 0.8 / max(1, len(by_split))
        for i, (split, counts) in enumerate(by_split.items()):
            ax.barh([y + i * bar for y in range(len(keys))], [counts[k] for k in keys], height=bar, label=split)
        ax.set_yticks([y + bar * (len(by_split) - 1) / 2 for y in range(len(keys))], keys, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(name)
        ax.set_xlabel("samples")
    axes[0].legend()
    fig.tight_layout()
    return fig
