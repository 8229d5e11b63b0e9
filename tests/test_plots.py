"""Plots: a sample is drawn with one box per history step plus the target; the browsers build headless and
draw outside pyplot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from cogagent_nb.data.validation import load_split  # noqa: E402
from cogagent_nb.viz.plots import read_sample, sample_browser, show_sample, show_samples  # noqa: E402


@pytest.fixture(scope="module")
def dev(demo_data_dir: Path) -> list[dict]:
    return load_split(demo_data_dir, "dev")


def test_show_sample_draws_history_and_target_boxes(dev: list[dict], demo_data_dir: Path) -> None:
    for conversation in dev[:8]:
        view = read_sample(conversation, demo_data_dir)
        ax = show_sample(conversation, demo_data_dir, history=True)
        boxed_history = sum(step.operation.box is not None for step in view.prompt.history)
        has_target = view.operation is not None and view.operation.box is not None
        assert len(ax.patches) == boxed_history + has_target
        assert ax.get_images()[0].get_array().shape[:2] == (view.image.height, view.image.width)
        plt.close(ax.figure)


def test_show_sample_without_history_draws_only_the_target(dev: list[dict], demo_data_dir: Path) -> None:
    conversation = next(
        c for c in dev if "\n1. " in c["messages"][0]["content"] and "box=" in c["messages"][1]["content"]
    )
    ax = show_sample(conversation, demo_data_dir)  # history boxes only when asked
    assert len(ax.patches) == 1
    plt.close(ax.figure)


def test_show_samples_grid_and_browser(dev: list[dict], demo_data_dir: Path) -> None:
    fig = show_samples(dev[:4], demo_data_dir, columns=3)
    assert len(fig.axes) == 6
    plt.close(fig)
    browser = sample_browser(dev, demo_data_dir, start=2)
    controls = browser.children[0]
    slider = controls.children[1]
    assert (slider.value, slider.max) == (2, len(dev) - 1)
    controls.children[2].click()  # the ▶ button
    assert slider.value == 3
    with pytest.raises(ValueError, match="at least one"):
        sample_browser([], demo_data_dir)


def test_the_browser_draws_outside_pyplot(dev: list[dict], demo_data_dir: Path, monkeypatch) -> None:
    """Widget callbacks draw figures that pyplot does not track: the inline backend's `flush_figures`, which
    ipykernel 7 runs on a subshell thread after some widget messages, would otherwise draw and close them
    while a callback draws them (blank pictures in JupyterLab; see cogagent_nb.viz.widget_pictures)."""
    made = []
    pyplot_figure = plt.figure
    monkeypatch.setattr(plt, "figure", lambda *a, **k: made.append(1) or pyplot_figure(*a, **k))
    browser = sample_browser(dev, demo_data_dir, start=0)
    browser.children[0].children[2].click()  # ▶: a redraw, as a click in the browser makes
    browser.children[0].children[3].value = True  # the history box: another
    assert made == [], "the browser drew through pyplot"


def test_compared_predictions_keep_their_operation_in_the_title() -> None:
    from PIL import Image

    from cogagent_nb.data.actions import Answer, parse_operation
    from cogagent_nb.infer.generate import Prediction
    from cogagent_nb.viz.predictions import compare_predictions

    operation = parse_operation("CLICK(box=[[100,100,300,200]], element_info='OK')")
    prediction = Prediction(
        "Press OK", "Mac", "Action-Operation", (), "", "", Answer(action="Click OK.", operation=operation), None,
        (640, 400), 20, True, Image.new("RGB", (640, 400), "white"),
    )  # fmt: skip
    fig = compare_predictions([prediction, prediction], ["before", "after"], detached=True)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles[0].startswith("before\nCLICK(") and titles[1].startswith("after\nCLICK("), titles
    from matplotlib._pylab_helpers import Gcf

    assert all(manager.canvas.figure is not fig for manager in Gcf.get_all_fig_managers()), "detached: not in pyplot"
