"""Lesson 02's experiment (`train/mask_demo.py`): the stop measurement reads the right position, the two
runs differ only in the mask, and the fixed mask raises the stop probability where the official one
does not. A short run (a few seconds); the lesson runs the full one."""

from __future__ import annotations

import pytest
import torch

import cogagent_nb as cnb
from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer
from cogagent_nb.train import mask_demo
from cogagent_nb.train.grounding import EVAL_SEED


@pytest.fixture(scope="module")
def comparison() -> mask_demo.MaskComparison:
    torch.set_num_threads(1)
    return cnb.compare_masks(
        steps=10, train_samples=8, held_out_samples=3, batch_size=4, eval_every=5, max_new_tokens=6
    )


def test_stop_probability_is_the_probability_the_loss_reads_at_the_stop_target() -> None:
    """P(<|user|>) after the answer = exp(-loss) of a label on the final <|user|> alone (image expanded)."""
    model = cnb.init_model("tiny", seed=3)
    tokenizer = ChatGLM4Tokenizer(TINY_TOKENIZER_FILE, image_size=model.config.image_size)
    conversation = mask_demo.demo_conversations(EVAL_SEED, 1)[0]
    sample = cnb.encode_conversation(
        conversation["messages"], tokenizer, num_image_tokens=model.config.num_image_tokens
    )
    measured = cnb.stop_probabilities(model, tokenizer, [sample])
    labels = torch.full_like(sample.input_ids, cnb.IGNORE_INDEX)
    labels[-1] = tokenizer.user_id  # the end-of-turn target only
    with torch.no_grad():
        loss = model(
            input_ids=sample.input_ids[None],
            images=sample.image[None],
            attention_mask=sample.attention_mask[None],
            position_ids=sample.position_ids[None],
            labels=labels[None],
        ).loss
    assert measured["p_user"][0] == pytest.approx(torch.exp(-loss).item(), rel=1e-4)
    assert measured["p_user"][0] <= measured["p_stop"][0] <= 1.0
    cut = cnb.encode_conversation(
        conversation["messages"], tokenizer, num_image_tokens=model.config.num_image_tokens, max_output_length=5
    )
    with pytest.raises(ValueError, match="does not end with a stop id"):
        cnb.stop_probabilities(model, tokenizer, [cut])


def test_only_the_fixed_mask_supervises_the_stop_token(comparison) -> None:
    official, fixed = comparison.runs["official"], comparison.runs["fixed"]
    assert official.stop_targets == 0
    assert fixed.stop_targets == comparison.train_samples  # one end-of-turn target per sample
    assert official.curve[0] == fixed.curve[0]  # the same initial weights, measured the same way


def test_measurements_are_probabilities_on_the_planned_steps(comparison) -> None:
    for run in comparison.runs.values():
        assert [p.step for p in run.curve] == [0, 5, 10]
        assert len(run.losses) == comparison.steps
        for point in run.curve:
            assert 0.0 <= point.p_user <= point.p_stop <= 1.0
            assert 0.0 <= point.stop_is_top <= 1.0
        assert len(run.answers) == len(run.stopped) == len(run.new_tokens) == comparison.held_out_samples
        assert all(n <= comparison.max_new_tokens for n in run.new_tokens)
        assert all(n == comparison.max_new_tokens for n, stopped in zip(run.new_tokens, run.stopped) if not stopped)
    rows = comparison.table()
    assert set(rows) == {"official mask", "fixed mask"}


def test_the_fixed_mask_raises_the_stop_probability_and_the_official_one_lowers_it(comparison) -> None:
    official, fixed = comparison.runs["official"], comparison.runs["fixed"]
    start = official.curve[0].p_stop
    assert fixed.final.p_stop > start > official.final.p_stop, (start, official.final, fixed.final)


def test_plot_stop_probability_draws_both_masks(comparison) -> None:
    import matplotlib.pyplot as plt

    fig = cnb.plot_stop_probability(comparison)
    curve_ax, bar_ax = fig.axes
    assert [line.get_label() for line in curve_ax.get_lines()] == ["official mask", "fixed mask"]
    assert len(bar_ax.patches) == 2
    plt.close(fig)


def test_compare_masks_refuses_the_held_out_seed_and_empty_runs() -> None:
    with pytest.raises(ValueError, match="held-out seed"):
        cnb.compare_masks(steps=1, train_seed=EVAL_SEED)
    with pytest.raises(ValueError, match="must be >= 1"):
        cnb.compare_masks(steps=0)
