"""The tiny grounding recipe (issue 10): grounding samples, the training stream, the loop, the baselines,
and the tokenizer's digit-by-digit numbers."""

from __future__ import annotations

import random

import pytest
import torch

import cogagent_nb as cnb
from cogagent_nb.data import screens as gr
from cogagent_nb.data.actions import parse_answer
from cogagent_nb.data.boxes import to_pixels
from cogagent_nb.data.synthetic import grounding_samples, make_episode
from cogagent_nb.train import grounding as g


def test_tiny_tokenizer_spells_every_number_digit_by_digit(tiny_model_dir) -> None:
    tokenizer, _ = cnb.load(tiny_model_dir)
    digits = [tokenizer.encode_text(str(d)) for d in range(10)]
    assert all(len(ids) == 1 for ids in digits)
    for number in ("559", "242", "1000", "07"):
        assert tokenizer.encode_text(number) == [digits[int(c)][0] for c in number]


def test_grounding_samples_point_at_labelled_elements_of_their_own_screen() -> None:
    episode = make_episode(2, seed=5)
    samples = grounding_samples(episode, random.Random(0), per_step=3)
    assert len(samples) >= len(episode.steps)  # every screen has at least one labelled element
    for sample in samples:
        user, answer = sample["messages"]
        operation = parse_answer(answer["content"]).operation
        label = operation.args["element_info"]
        assert f"'{label}'" in user["content"]
        left, top, right, bottom = to_pixels(operation.box, *user["image"].size)
        colours = {c for _, c in user["image"].crop((left, top, right, bottom)).getcolors(1 << 16)}
        if label in gr.STYLE:  # buttons and icons keep their label's colour inside the box
            assert gr.STYLE[label].colour in colours, label


def test_text_only_guess_uses_the_label_mean_and_falls_back_to_the_platform_mean() -> None:
    seen = list(g.episode_conversations(g.TRAIN_SEED, 0, 12))
    means = g.text_only_boxes(seen)
    conversation = next(c for c in seen if g.element_label(c) == "Settings")
    guess = parse_answer(g.text_only_answer(conversation, means)).operation.box
    assert guess == means[(conversation["platform"], "Settings")]
    unknown = {**conversation, "platform": conversation["platform"]}
    means_without_label = {k: v for k, v in means.items() if k[1] != "Settings"}
    fallback = parse_answer(g.text_only_answer(unknown, means_without_label)).operation.box
    assert fallback == means[(conversation["platform"], "")]


def test_stream_batches_are_fresh_bucketed_and_carry_images(tiny_model_dir) -> None:
    tokenizer, model = cnb.load(tiny_model_dir)
    stream = g.EpisodeStream(tokenizer, model.config.num_image_tokens, 4, grounding_per_step=1, pool_batches=3)
    batches = [batch for batch, _ in zip(stream, range(3))]
    assert all(b["images"].shape == (4, 3, 224, 224) for b in batches)
    widths = sorted(b["input_ids"].shape[1] for b in batches)
    real = sorted(int(n) for b in batches for n in b["attention_mask"].sum(1))
    assert real[-1] <= widths[-1] and len(set(widths)) > 1  # sorted by length: batches of different widths


def test_train_tiny_lowers_the_loss_and_ends_in_eval_mode(tiny_model_dir) -> None:
    torch.manual_seed(0)
    tokenizer, model = cnb.load(tiny_model_dir)
    log = g.train_tiny(model, tokenizer, minutes=5, max_steps=12, batch_size=4, learning_rate=3e-3, log_every=0)
    assert log.steps == 12 and log.samples == 48
    assert log.summary().startswith("12 steps, 48 fresh samples") and f"{log.losses[0]:.2f} ->" in log.summary()
    assert sum(log.losses[-3:]) / 3 < sum(log.losses[:3]) / 3
    assert not model.training


def test_train_tiny_trains_the_vision_tower_at_its_own_rate(tiny_model_dir) -> None:
    tokenizer, model = cnb.load(tiny_model_dir)
    groups = g.parameter_groups(model, 0.3)
    assert [group["lr_scale"] for group in groups] == [0.3, 1.0]
    with pytest.raises(ValueError, match="vision_lr_scale must be >= 0"):
        g.parameter_groups(model, -0.3)
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))
    tower, language = model.transformer.vision.patch_embedding.proj.weight, model.transformer.output_layer.weight
    before = tower.detach().clone(), language.detach().clone()
    g.train_tiny(model, tokenizer, minutes=5, max_steps=2, batch_size=2, vision_lr_scale=0.0, log_every=0)
    assert torch.equal(tower, before[0])  # a rate of 0: the tower is left as it was
    assert not torch.equal(language, before[1])


def test_the_tiny_preset_puts_image_vectors_at_the_text_scale() -> None:
    from cogagent_nb.model.configuration import CogAgentConfig
    from cogagent_nb.model.loading import init_model

    model = init_model(CogAgentConfig.from_preset("tiny"))
    screens = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        image = model.transformer.vision(screens)[:, 1:-1]  # (B, n, H) without boi/eoi
    text = model.get_input_embeddings().weight
    ratio = image.norm(dim=-1).mean() / text.norm(dim=-1).mean()
    assert 0.3 < ratio < 3, ratio
    assert CogAgentConfig.from_preset("cogagent-9b-20241220").vision_config.scaling_factor == 8  # 9B untouched


def test_stream_workers_share_out_the_episodes_without_repeats(tiny_model_dir, monkeypatch) -> None:
    """Worker w of n renders episodes start + w, start + w + n, ...: all workers together see each episode once."""
    from types import SimpleNamespace

    tokenizer, model = cnb.load(tiny_model_dir)
    stream = g.EpisodeStream(tokenizer, model.config.num_image_tokens, 4, start=10, steps=False, grounding_per_step=1)
    seen = {}
    for worker in range(3):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda w=worker: SimpleNamespace(id=w, num_workers=3))
        names = []
        for sample in stream._encoded():
            if sample.name not in names:
                names.append(sample.name)
            if len(names) == 3:
                break
        seen[worker] = names
    assert seen[1] == [f"seed {g.TRAIN_SEED} episode {i}" for i in (11, 14, 17)]
    assert len({name for names in seen.values() for name in names}) == 9  # no episode twice


def test_learning_report_plot_has_a_bar_per_row_and_metric_and_the_text_only_line(tmp_path) -> None:
    from cogagent_nb.viz.predictions import LEARNING_METRICS, plot_learning_report

    def row(parse: float, click: float, kind: float) -> dict:
        return {"parse_rate": parse, "click_in_box": click, "type_accuracy": kind}

    results = {
        "text-only guess": row(1.0, 0.17, 1.0),
        "blank image": row(0.9, 0.18, 0.85),
        "trained": row(1.0, 0.2, 0.99),
    }
    ax = plot_learning_report(results)
    heights = sorted(round(p.get_height(), 3) for p in ax.patches)
    # the text-only guess copies the reference action: only its click-in-box bar is drawn
    assert len(ax.patches) == 2 * len(LEARNING_METRICS) + 1
    assert heights == sorted([0.9, 0.18, 0.85, 1.0, 0.2, 0.99, 0.17])
    assert [line.get_ydata()[0] for line in ax.lines] == [0.17]  # the dashed text-only level
    ax.figure.savefig(tmp_path / "learning.png")


def test_lesson_07_trains_for_the_course_minutes() -> None:
    """The notebook's `learning_minutes` default is `COURSE_MINUTES["notebook"]` (the two must not drift)."""
    import json
    from pathlib import Path

    notebook = json.loads((Path(__file__).parents[1] / "notebooks" / "07_inference.ipynb").read_text())
    cell = next(c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", []))
    parameters: dict = {}
    exec("".join(cell["source"]), parameters)
    assert parameters["learning_minutes"] == g.COURSE_MINUTES["notebook"]


def test_scores_by_target_groups_click_in_box_by_what_a_step_points_at() -> None:
    held_out = list(g.episode_conversations(g.EVAL_SEED, 0, 8))
    references = [c["messages"][-1]["content"] for c in held_out]
    boxed = [c for c in held_out if parse_answer(c["messages"][-1]["content"]).operation.box is not None]
    assert all(c["target"] for c in boxed) and all(not c["target"] for c in held_out if c not in boxed)
    exact = g.scores_by_target(references, held_out)
    assert sum(row["n"] for row in exact.values()) == len(boxed)
    assert all(row["click_in_box"] == 1.0 for row in exact.values())
    # a box moved to the far corner misses everywhere; a step without a box is not counted
    corner = [g.with_box(c, (0, 0, 1, 1)) for c in held_out]
    assert all(row["click_in_box"] == 0.0 for row in g.scores_by_target(corner, held_out).values())
    kinds = {target.split()[1] for target in exact}
    assert {"icon", "button"} <= kinds, kinds
    table = g.format_targets({"trained": exact, "blank image": g.scores_by_target(corner, held_out)})
    header, *rows = table.splitlines()
    assert header.split()[2:] == ["trained", "blank", "image"] and len(rows) == len(exact)
    assert all(row.split()[-2:] == ["100.0%", "0.0%"] for row in rows), table


# --- the one-rectangle task ----------------------------------------------------------------------------------
def test_a_rectangle_screen_lights_exactly_the_box_its_answer_names() -> None:
    from cogagent_nb.data.synthetic import RECTANGLE_SCREEN, rectangle_conversation

    first, again = rectangle_conversation(random.Random(3)), rectangle_conversation(random.Random(3))
    assert first["messages"][1]["content"] == again["messages"][1]["content"], "the same draw gives the same screen"
    user, answer = first["messages"]
    assert user["content"] == rectangle_conversation(random.Random(4))["messages"][0]["content"], "fixed task text"
    image = user["image"]
    assert image.size == (RECTANGLE_SCREEN, RECTANGLE_SCREEN)
    lit = (
        image.convert("L").point(lambda v: 255 if v > 128 else 0).getbbox()
    )  # (left, top, right, bottom) of the light pixels
    box = parse_answer(answer["content"]).operation.box
    assert all(abs(a - b) <= 1 for a, b in zip(to_pixels(box, *image.size), lit)), (box, lit)
    boxes = {rectangle_conversation(random.Random(s))["messages"][1]["content"] for s in range(20)}
    assert len(boxes) == 20, "the rectangle moves from draw to draw"


def test_train_tiny_on_rectangles_and_its_report(tiny_model_dir) -> None:
    torch.manual_seed(0)
    tokenizer, model = cnb.load(tiny_model_dir)
    log = g.train_tiny(model, tokenizer, minutes=5, max_steps=6, batch_size=4, task="rectangle", log_every=0)
    assert log.steps == 6 and sum(log.losses[-2:]) < sum(log.losses[:2])
    report = g.rectangle_report(model, tokenizer, samples=4)
    assert list(report) == ["text-only guess", "blank image", "trained"]
    assert all(row["n"] == 4 and row["n_with_box"] == 4 for row in report.values())
    assert report["text-only guess"]["parse_rate"] == 1.0  # the reference answer with one fixed box
    with pytest.raises(ValueError, match="task must be one of episodes, rectangle"):
        g.EpisodeStream(tokenizer, model.config.num_image_tokens, 4, task="circles")
    with pytest.raises(ValueError, match="grounding_first"):
        g.train_tiny(model, tokenizer, minutes=1, max_steps=1, task="rectangle", grounding_first=0.5)


def test_rectangle_stream_draws_fresh_screens_in_each_worker(tiny_model_dir, monkeypatch) -> None:
    tokenizer, model = cnb.load(tiny_model_dir)
    stream = g.EpisodeStream(tokenizer, model.config.num_image_tokens, 4, task="rectangle", pool_batches=2)

    def images(worker_id: int | None) -> list[bytes]:
        info = None if worker_id is None else type("Info", (), {"id": worker_id, "num_workers": 2})()
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)
        return [bytes(b["images"][i].numpy()) for b, _ in zip(iter(stream), range(2)) for i in range(4)]

    alone, worker0, worker1 = images(None), images(0), images(1)
    assert len(set(alone)) == 8 and not set(worker0) & set(worker1), "workers must not draw the same screens"


def test_show_clicks_draws_a_row_per_screen_kind(tiny_model_dir) -> None:
    tokenizer, model = cnb.load(tiny_model_dir)
    figure = cnb.show_clicks(model, tokenizer, g.rectangle_held_out(3))
    assert len(figure.axes) == 6 and figure.axes[0].get_title(loc="left") == "screenshot"
    assert figure.axes[3].get_title(loc="left") == "blank screen"
    assert len(cnb.show_clicks(model, tokenizer, g.rectangle_held_out(2), blank=False).axes) == 2
