"""The loss mask made visible: which tokens the model is trained to predict, and how many there are.

A loss mask is easy to get wrong silently (the official CogAgent finetune never supervises its end
token, §6 of the spec), and the error only shows up as a model that never stops. These functions draw
an `EncodedSample` (from `cogagent_nb.data.encoding`) for humans:

- `mask_counts`: prompt / supervised / image token counts, at the length the model really sees;
- `render_html`: every token as a coloured span (special tokens shown by name, "\\n" as ↵), the image
  collapsed into one block labelled with its real size, e.g. "image ×1602 (1 boi + 1600 patches + 1 eoi)";
- `plot_loss_mask`: one bar per sample over model positions, the image at its true width;
- `plot_token_cells`: the last tokens of samples as labelled cells, to compare masks token by token;
- `counts_table_html`: a small table of counts for several samples;
- `plot_stop_probability`: what training with each mask taught about stopping (`cnb.compare_masks`);
- `mask_browser`: an ipywidgets slider that steps through samples (works headless: the HTML is
  computed in Python, no browser round trip is needed).

All are pure: they return strings, figures or widgets and print nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import html
from collections.abc import Callable, Mapping, Sequence

from cogagent_nb.data.encoding import EncodedSample

CATEGORIES = ("prompt", "supervised", "image")
COLOURS = {"prompt": "#d9d9d9", "supervised": "#f4a259", "image": "#6fa8dc"}

_CSS = """
<style>
.lmv { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; line-height: 1.9; }
.lmv .tok { white-space: pre-wrap; border-radius: 3px; padding: 1px 1px; margin: 0 1px 0 0;
            border: 1px solid rgba(0,0,0,.12); }
.lmv .prompt { background: #d9d9d9; color: #333; }
.lmv .supervised { background: #f4a259; color: #000; }
.lmv .image { background: #6fa8dc; color: #000; padding: 1px 6px; font-weight: bold; }
.lmv .special { font-weight: bold; font-style: italic; }
.lmv .legend span { margin-right: 10px; }
.lmv .title { font-weight: bold; margin-bottom: 4px; }
</style>
"""


@dataclasses.dataclass(frozen=True)
class TokenView:
    """One displayed unit: a token, or the whole image triple collapsed to one block."""

    text: str
    category: str  # one of CATEGORIES
    special: bool
    ids: tuple[int, ...]
    segment_kind: str


def special_token_names(tokenizer) -> dict[int, str]:
    """id → name of the GLM-4 special tokens, read from the tokenizer (ids are never hard-coded)."""
    names = {
        "eos_id": "<|endoftext|>",
        "gmask_id": "[gMASK]",
        "sop_id": "<sop>",
        "system_id": "<|system|>",
        "user_id": "<|user|>",
        "assistant_id": "<|assistant|>",
        "observation_id": "<|observation|>",
        "boi_id": "<|begin_of_image|>",
        "eoi_id": "<|end_of_image|>",
    }
    return {getattr(tokenizer, attribute): name for attribute, name in names.items()}


def image_label(num_image_tokens: int) -> str:
    """The collapsed image block's label, with the size the model really splices in."""
    return f"image ×{num_image_tokens + 2} (1 boi + {num_image_tokens} patches + 1 eoi)"


def token_views(sample: EncodedSample, tokenizer) -> list[TokenView]:
    """The sample as display units, in order; the image triple becomes one block."""
    names = special_token_names(tokenizer)
    views: list[TokenView] = []
    for segment in sample.segments:
        if segment.kind == "image":
            views.append(TokenView(image_label(sample.num_image_tokens), "image", True, segment.ids, "image"))
            continue
        category = "supervised" if segment.supervised else "prompt"
        for token_id in segment.ids:
            special = token_id in names and segment.kind in ("prefix", "role", "end_of_turn")
            text = names[token_id] if special else tokenizer.decode([token_id])
            views.append(TokenView(text, category, special, (token_id,), segment.kind))
    return views


def mask_counts(sample: EncodedSample) -> dict[str, int]:
    """Counts at model length: prompt (not a target), supervised (a target), image (boi+patches+eoi).

    prompt + supervised + image == total == the sequence length after the image splice; `ids` is the
    length of `input_ids`, where the image is only 3 ids.
    """
    supervised = sample.num_supervised
    image = sample.num_image_tokens + 2
    prompt = len(sample.input_ids) - 3 - supervised
    return {
        "prompt": prompt,
        "supervised": supervised,
        "image": image,
        "total": prompt + supervised + image,
        "ids": len(sample.input_ids),
    }


def counts_table_html(rows: Mapping[str, Mapping[str, object]]) -> str:
    """A small HTML table: one row per named sample (or run), one column per count (or value)."""
    if not rows:
        raise ValueError("counts_table_html needs at least one row")
    columns = list(next(iter(rows.values())))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        f"<tr><th style='text-align:left'>{html.escape(name)}</th>"
        + "".join(f"<td style='text-align:right'>{counts[c]}</td>" for c in columns)
        + "</tr>"
        for name, counts in rows.items()
    )
    return f"<table class='lmv-counts'><tr><th></th>{head}</tr>{body}</table>"


def _span(view: TokenView) -> str:
    classes = f"tok {view.category}" + (" special" if view.special else "")
    shown = view.text.replace("\n", "↵\n") if not view.special else view.text
    ids = " ".join(map(str, view.ids))
    return f'<span class="{classes}" title="ids {ids}">{html.escape(shown)}</span>'


def render_html(sample: EncodedSample, tokenizer, *, title: str | None = None) -> str:
    """The sample's tokens as coloured spans with a legend of counts (display with IPython's HTML)."""
    counts = mask_counts(sample)
    legend = "".join(f'<span><span class="tok {c}">&nbsp;&nbsp;</span> {c}: {counts[c]}</span>' for c in CATEGORIES)
    heading = f'<div class="title">{html.escape(title)}</div>' if title else ""
    spans = "".join(_span(view) for view in token_views(sample, tokenizer))
    return (
        f'{_CSS}<div class="lmv">{heading}<div class="legend">{legend} '
        f"<span>(model length {counts['total']})</span></div><div>{spans}</div></div>"
    )


def _runs(sample: EncodedSample) -> list[tuple[int, int, str]]:
    """(start, width, category) runs over model positions, the image at its spliced width."""
    runs: list[tuple[int, int, str]] = []
    position = 0
    for segment in sample.segments:
        if segment.kind == "image":
            pieces = [("image", sample.num_image_tokens + 2)]
        else:
            pieces = [("supervised" if segment.supervised else "prompt", len(segment.ids))]
        for category, width in pieces:
            if runs and runs[-1][2] == category and runs[-1][0] + runs[-1][1] == position:
                start, old, _ = runs[-1]
                runs[-1] = (start, old + width, category)
            else:
                runs.append((position, width, category))
            position += width
    return runs


def _legend(ax) -> None:
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(color=COLOURS[c], label=c) for c in CATEGORIES],
        loc="upper left",
        bbox_to_anchor=(1.005, 1.0),
        frameon=False,
    )


CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Zen Hei", "Source Han Sans SC", "SimHei")
"""Fonts with Chinese glyphs, tried in order (Debian/Ubuntu: `apt-get install fonts-noto-cjk`)."""


@functools.lru_cache(maxsize=1)
def _font_families() -> tuple[str, ...]:
    """matplotlib's default family, then the first installed CJK font as a fallback (matplotlib >= 3.6
    draws each character with the first family of the list that has it)."""
    from matplotlib import rcParams
    from matplotlib.font_manager import fontManager

    installed = {f.name for f in fontManager.ttflist}
    default = (
        rcParams["font.sans-serif"][0] if rcParams["font.family"] == ["sans-serif"] else rcParams["font.family"][0]
    )
    return (default, *[name for name in CJK_FONTS if name in installed][:1])


@functools.lru_cache(maxsize=1)
def _fonts():
    from matplotlib.font_manager import FontProperties, findfont
    from matplotlib.ft2font import FT2Font

    return [FT2Font(findfont(FontProperties(family=name))) for name in _font_families()]


def _drawable(text: str) -> str:
    """`text` with characters that no available font has written as \\uXXXX escapes, so that a figure
    shows which token it is instead of empty boxes (with a CJK font installed, Chinese is drawn)."""
    fonts = _fonts()
    return "".join(
        c if c.isascii() or any(font.get_char_index(ord(c)) for font in fonts) else f"\\u{ord(c):04x}" for c in text
    )


def plot_loss_mask(samples: Sequence[EncodedSample], *, titles: Sequence[str] | None = None):
    """One horizontal bar per sample over the positions the model sees (image expanded)."""
    import matplotlib.pyplot as plt

    samples = list(samples)
    titles = list(titles) if titles is not None else [s.name for s in samples]
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.45 * len(samples)))
    for row, sample in enumerate(samples):
        for category in CATEGORIES:
            spans = [(start, width) for start, width, c in _runs(sample) if c == category]
            ax.broken_barh(spans, (row - 0.35, 0.7), color=COLOURS[category])
    ax.set_yticks(range(len(samples)), titles)
    ax.invert_yaxis()
    longest = max(s.model_length for s in samples)
    ax.set_xlim(0, longest * 1.02)  # a margin, so the longest bar visibly ends instead of running into the frame
    ax.set_xlabel("position in the sequence the model sees (image expanded to its real size)")
    _legend(ax)
    fig.tight_layout()
    return fig


def plot_token_cells(
    samples: Sequence[EncodedSample], tokenizer, *, titles: Sequence[str] | None = None, last: int = 10
):
    """The last `last` tokens of each sample as labelled cells coloured by supervision.

    Use it to compare masks token by token, e.g. the official finetune's mask beside the fixed one.
    """
    import matplotlib.pyplot as plt

    samples = list(samples)
    titles = list(titles) if titles is not None else [s.name for s in samples]
    fig, ax = plt.subplots(figsize=(1.05 * last + 1.5, 0.7 + 0.8 * len(samples)))
    for row, sample in enumerate(samples):
        views = token_views(sample, tokenizer)[-last:]
        offset = last - len(views)
        for column, view in enumerate(views):
            x = offset + column
            ax.add_patch(plt.Rectangle((x, row - 0.4), 0.95, 0.8, color=COLOURS[view.category]))
            text = _drawable(view.text if view.category != "image" else "image").replace("\n", "↵")
            ax.text(
                x + 0.475,
                row,
                text if len(text) <= 14 else text[:13] + "…",
                ha="center",
                va="center",
                fontsize=8,
                fontfamily=list(_font_families()),
                fontweight="bold" if view.special else "normal",
            )
    ax.set_xlim(0, last)
    ax.set_ylim(len(samples) - 0.5, -0.5)
    ax.set_yticks(range(len(samples)), titles)
    ax.set_xticks([])
    ax.set_xlabel(f"the last {last} tokens (orange = a target the loss trains the model to predict)")
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    _legend(ax)
    fig.tight_layout()
    return fig


def plot_stop_probability(comparison):
    """What each mask taught about stopping (`cnb.compare_masks`'s result), in two panels.

    Left: P(stop) at the position right after the answer's last token, mean over the held-out samples,
    at each measured optimizer step, one line per mask, on a log scale. Right: the share of greedy answers to the
    held-out prompts that ended on a stop token rather than at `max_new_tokens`.
    """
    import matplotlib.pyplot as plt

    colours = {"official": "#7f7f7f", "fixed": COLOURS["supervised"]}
    fig, (curve_ax, bar_ax) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [2.2, 1]})
    for mode, run in comparison.runs.items():
        steps = [point.step for point in run.curve]
        curve_ax.plot(steps, [p.p_stop for p in run.curve], marker="o", color=colours.get(mode), label=f"{mode} mask")
    lowest = min(p.p_stop for run in comparison.runs.values() for p in run.curve)
    curve_ax.set_yscale("log")  # the official run's fall (1e-3 to 1e-4) is as visible as the fix's rise to ~1
    curve_ax.set_ylim(min(1e-4, lowest / 2), 2.0)
    curve_ax.set_xlabel("optimizer step (both runs start from the same weights)")
    curve_ax.set_ylabel("P(stop) after the answer (log)")
    curve_ax.set_title(f"held-out samples (mean of {comparison.held_out_samples})", fontsize=10)
    curve_ax.grid(alpha=0.3)
    curve_ax.legend(fontsize=9)
    modes = list(comparison.runs)
    rates = [comparison.runs[m].stopped_rate for m in modes]
    bars = bar_ax.bar([f"{m} mask" for m in modes], rates, color=[colours.get(m) for m in modes])
    for bar, mode in zip(bars, modes):
        run = comparison.runs[mode]
        label = f"{sum(run.stopped)}/{len(run.stopped)}"
        bar_ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02, label, ha="center", fontsize=9)
    bar_ax.set_ylim(0, 1.15)
    bar_ax.set_ylabel("greedy answers that stop")
    bar_ax.set_title(f"after {comparison.steps} steps, max_new_tokens={comparison.max_new_tokens}", fontsize=10)
    fig.tight_layout()
    return fig


def mask_browser(get_sample: Callable[[int], EncodedSample], count: int, tokenizer):
    """An ipywidgets slider over `count` samples; `get_sample(i)` encodes sample i on demand.

    The HTML is rendered in Python whenever the slider moves, so the widget also works (and can be
    driven by setting `.children[0].value`) without a browser.
    """
    import ipywidgets as widgets

    if count < 1:
        raise ValueError("mask_browser needs at least one sample")
    slider = widgets.IntSlider(value=0, min=0, max=count - 1, description="sample")
    view = widgets.HTML()

    def show(index: int) -> None:
        sample = get_sample(index)
        view.value = render_html(sample, tokenizer, title=f"{index}: {sample.name}")

    slider.observe(lambda change: show(change["new"]), names="value")
    show(0)
    return widgets.VBox([slider, view])


def segments_table_html(sample: EncodedSample, tokenizer) -> str:
    """The segments `encode_conversation` built, one row each: role, kind, text, ids, supervised.

    This is the recipe of a sample in a table (the renderer's source is `chat_format.render_conversation`):
    which pieces exist and which carry a loss. Text is shown as the tokenizer decodes it, the image
    triple by its name.
    """
    rows = []
    for segment in sample.segments:
        if segment.kind == "image":
            text = f"[image: {image_label(sample.num_image_tokens)}]"
        else:
            text = segment.text if segment.text is not None else tokenizer.decode(list(segment.ids))
        shown = html.escape(text if len(text) <= 60 else text[:57] + "...").replace("\n", "↵")
        mark = "<b>yes</b>" if segment.supervised else "no"
        rows.append(
            f"<tr><td>{html.escape(segment.role)}</td><td>{html.escape(segment.kind)}</td>"
            f"<td style='text-align:left;font-family:monospace'>{shown}</td>"
            f"<td style='text-align:right'>{len(segment.ids)}</td><td>{mark}</td></tr>"
        )
    head = "<tr><th>role</th><th>kind</th><th>text</th><th>ids</th><th>supervised</th></tr>"
    return f"<table class='lmv-segments'>{head}{''.join(rows)}</table>"
