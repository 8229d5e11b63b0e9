"""Plots: a sample is drawn with one box per history step plus the target; the browser builds headless."""

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
