"""Tests of cogagent_nb.viz.loss_mask on the parity tokenizer (official tokenizer.model format)."""

from __future__ import annotations

import re

import matplotlib
import numpy as np
import pytest

from cogagent_nb.data.encoding import encode_conversation
from cogagent_nb.viz.loss_mask import (
    counts_table_html,
    image_label,
    mask_browser,
    mask_counts,
    plot_loss_mask,
    plot_token_cells,
    render_html,
    token_views,
)

matplotlib.use("Agg")

CONVERSATION = [
    {"role": "user", "content": "hello world", "image": "img0.png"},
    {"role": "assistant", "content": "Hi!"},
]


@pytest.fixture(scope="module")
def sample(parity_tokenizer, parity_dir):
    # ids: [gMASK] <sop> <|user|> \n boi pad eoi hello ␣world <|assistant|> \n H i ! <|user|>
    return encode_conversation(CONVERSATION, parity_tokenizer, num_image_tokens=1600, image_root=parity_dir)


def test_counts_at_model_length(sample):
    counts = mask_counts(sample)
    # prompt: [gMASK] <sop> <|user|> \n hello ␣world <|assistant|> = 7; targets: \n H i ! <|user|> = 5
    assert counts == {"prompt": 7, "supervised": 5, "image": 1602, "total": 1614, "ids": 15}
    assert counts["total"] == sample.model_length


def test_official_mode_counts_differ_by_the_role_and_end_tokens(parity_tokenizer, parity_dir):
    official = encode_conversation(
        CONVERSATION, parity_tokenizer, num_image_tokens=64, image_root=parity_dir, mode="official"
    )
    # the official mask supervises <|assistant|> \n H i ! and leaves the end token unsupervised: same
    # count, different tokens, and the one that teaches the model to stop is missing
    assert mask_counts(official) == {"prompt": 7, "supervised": 5, "image": 66, "total": 78, "ids": 15}
    assert official.labels.tolist()[-1] == -100


def test_token_views_collapse_the_image_and_name_specials(sample, parity_tokenizer):
    views = token_views(sample, parity_tokenizer)
    assert [v.text for v in views] == [
        "[gMASK]",
        "<sop>",
        "<|user|>",
        "\n",
        image_label(1600),
        "hello",
        " world",
        "<|assistant|>",
        "\n",
        "H",
        "i",
        "!",
        "<|user|>",
    ]
    assert [v.category for v in views].count("image") == 1
    assert [v.category for v in views][-5:] == ["supervised"] * 5
    assert image_label(1600) == "image ×1602 (1 boi + 1600 patches + 1 eoi)"


def test_html_classes_and_text(sample, parity_tokenizer):
    page = render_html(sample, parity_tokenizer, title="demo <1>")
    spans = re.findall(r'<span class="tok ([a-z ]+)" title="ids ([0-9 ]+)">(.*?)</span>', page, flags=re.S)
    assert len(spans) == 13
    assert [c for c, _, _ in spans].count("supervised") == 4  # "\n", "H", "i", "!"
    assert ("supervised", "158", "↵\n") in spans  # the generated newline is a target
    assert ("supervised special", "564", "&lt;|user|&gt;") in spans  # the end-of-turn target
    assert ("prompt special", "565", "&lt;|assistant|&gt;") in spans  # the role token is not
    assert ("image special", "567 557 568", "image ×1602 (1 boi + 1600 patches + 1 eoi)") in spans
    assert "demo &lt;1&gt;" in page and "supervised: 5" in page and "image: 1602" in page


def test_counts_table(sample):
    table = counts_table_html({"a": mask_counts(sample)})
    assert "<th>supervised</th>" in table and "<td style='text-align:right'>1602</td>" in table
    with pytest.raises(ValueError):
        counts_table_html({})


def test_figures(sample, parity_tokenizer):
    fig = plot_loss_mask([sample, sample], titles=["x", "y"])
    ax = fig.axes[0]
    assert ax.get_xlim() == (0, 1614 * 1.02)  # a margin after the longest bar, so it does not look clipped
    assert len(ax.collections) == 6  # 3 categories × 2 rows
    widths = [[round(np.ptp(path.vertices[:, 0])) for path in c.get_paths()] for c in ax.collections[:3]]
    assert widths == [[4, 3], [5], [1602]]  # prompt runs before/after the image, targets, the image
    fig2 = plot_token_cells([sample], parity_tokenizer, last=5)
    texts = [t.get_text() for t in fig2.axes[0].texts]
    assert texts == ["↵", "H", "i", "!", "<|user|>"]
    import matplotlib.pyplot as plt

    plt.close(fig)
    plt.close(fig2)


def test_mask_browser_steps_through_samples(parity_tokenizer, parity_dir):
    samples = [
        encode_conversation(CONVERSATION, parity_tokenizer, num_image_tokens=16, image_root=parity_dir, name="a"),
        encode_conversation(
            [
                {"role": "user", "content": "x", "image": "img1.png"},
                {"role": "assistant", "content": "a longer answer"},
            ],
            parity_tokenizer,
            num_image_tokens=16,
            image_root=parity_dir,
            name="b",
        ),
    ]
    box = mask_browser(lambda i: samples[i], len(samples), parity_tokenizer)
    slider, view = box.children
    assert "0: a" in view.value
    slider.value = 1
    assert "1: b" in view.value and "image ×18" in view.value
