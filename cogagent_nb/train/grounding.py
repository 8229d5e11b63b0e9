"""A plain, fast recipe that teaches the tiny CogAgent to ground: fresh synthetic episodes, full fine-tuning.

Why a recipe of its own: on a 2-core CPU the course can afford a few minutes of training, and a tiny
random model that sees the same ~360 committed samples over and over memorises their answers instead of
learning to read the screen (issue 10, "Proof that it teaches"). Rendering is cheap, so every training
sample here comes from a *fresh* episode (`synthetic.make_episode` with a training seed), never repeated:
the only way to lower the loss on the box is to look at the screenshot.

The pieces:
- `EpisodeStream`: an endless `IterableDataset` of collated batches from fresh episodes (or, with
  task="rectangle", from one-rectangle screens: grounding with nothing else to learn);
- `train_tiny`: a plain AdamW loop with a time budget (the nanoGPT `train.py` shape), full fine-tuning;
- `generate_answers`: greedy answers for a list of conversations, left-padded batches;
- `baseline_rates`: what answers that ignore the image score (most common box, text-only guess);
- `grounding_report` and `rectangle_report`: a trained model beside those baselines and itself on blank screens.

Seeds: the committed demo set uses seed 0; training streams use `TRAIN_SEED`, the benchmark's held-out
screens `EVAL_SEED`, which nothing in the course trains on.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from cogagent_nb.data.actions import Action, parse_answer
from cogagent_nb.data.encoding import EncodedSample, TrainingCollator, encode_conversation
from cogagent_nb.data.synthetic import (
    DemoStep,
    episode_samples,
    grounding_samples,
    make_episode,
    rectangle_conversations,
)

COURSE_MINUTES: dict[str, float] = {"notebook": 4.0, "full": 10.0}
"""Minutes of `train_tiny` in the course: lesson 07's default (`learning_minutes`, wall clock), and the
`-p learning_minutes 10` run whose figures docs/BENCHMARKS.md records (`benchmarks/bench_learning.py
--minutes 10`, CPU clock with one thread: about the same number of steps on a 2-core laptop)."""

TRAIN_SEED = 1
"""Seed of the training stream's episodes (the committed demo set is seed 0)."""
EVAL_SEED = 1_000
"""Seed of the held-out episodes the benchmark scores on; never trained on."""


# --- data ---------------------------------------------------------------------------------------------------
def episode_conversations(
    seed: int, start: int, count: int, *, grounding_per_step: int = 0, steps: bool = True
) -> Iterator[dict[str, Any]]:
    """Conversations (images as PIL images) of episodes `start ... start + count - 1` for `seed`.

    Each episode's steps come first (unless `steps` is False), then `grounding_per_step` "click X" samples per screen
    (`synthetic.grounding_samples`); every conversation carries its episode's `platform`, and a step also
    says what it points at: `target` is "<episode kind> <widget kind>" (e.g. "mail button") when its
    operation has a box, "" when not (`scores_by_target` groups click-in-box by it).
    """
    for index in range(start, start + count):
        episode = make_episode(index, seed=seed)
        names = [f"episode {index} step {step}" for step in range(len(episode.steps))]
        for step, sample in zip(episode.steps, episode_samples(episode, names) if steps else ()):
            user, answer = sample["messages"]
            yield {
                "messages": [{**user, "image": step.image}, answer],
                "platform": episode.platform,
                "target": _target_widget(episode.kind, step),
            }
        if grounding_per_step:
            rng = random.Random(seed * 7_919 + index)
            for sample in grounding_samples(episode, rng, grounding_per_step):
                yield {**sample, "platform": episode.platform}


def _target_widget(episode_kind: str, step: DemoStep) -> str:
    """ "<episode kind> <widget kind>" of the element a step's operation points at ("" without a box)."""
    if "box" not in step.operation.args:
        return ""
    label = step.operation.args.get("element_info")
    kinds = [widget.kind for widget in step.widgets if widget.label == label]
    return f"{episode_kind} {kinds[0] if kinds else 'element'}"


TASKS = ("episodes", "rectangle")
"""What `train_tiny` trains on: the course's synthetic GUI episodes, or one-rectangle screens
(`synthetic.rectangle_conversation`), the simplest grounding there is."""


class EpisodeStream(torch.utils.data.IterableDataset):
    """Batches of fresh episodes, endlessly: episode `start`, `start + 1`, ... of `seed`, never repeated.

    Yields collated batches (use `DataLoader(stream, batch_size=None)`). Samples gather in a pool of
    `pool_batches` batches; the pool is sorted by length and cut into batches whose order is shuffled,
    so a batch holds samples of similar length (little padding: ~25% less compute) from many episodes.
    task="rectangle" draws one-rectangle screens instead of episodes (`TASKS`).
    """

    def __init__(
        self,
        tokenizer,
        num_image_tokens: int,
        batch_size: int,
        *,
        seed: int = TRAIN_SEED,
        start: int = 0,
        grounding_per_step: int = 0,
        steps: bool = True,
        pool_batches: int = 8,
        task: str = "episodes",
        **encode_kwargs: Any,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        self.task = task
        self.tokenizer, self.num_image_tokens, self.batch_size = tokenizer, num_image_tokens, batch_size
        self.seed, self.start, self.grounding_per_step, self.steps = seed, start, grounding_per_step, steps
        self.pool_batches, self.encode_kwargs = pool_batches, encode_kwargs
        self.collate = TrainingCollator(tokenizer)

    def _conversations(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(name for error messages, conversation) pairs: this process's share of the endless stream."""
        # In DataLoader workers, worker w of n renders episodes start + w, start + w + n, ...: together
        # the same fresh, never-repeated episodes as one process, rendered n times as fast.
        worker = torch.utils.data.get_worker_info()
        index, stride = (self.start, 1) if worker is None else (self.start + worker.id, worker.num_workers)
        if self.task == "rectangle":  # one endless draw per worker, each from its own seed
            for conversation in rectangle_conversations(self.seed * 7_919 + index):
                yield f"seed {self.seed} rectangle", conversation
        while True:
            for conversation in episode_conversations(
                self.seed, index, 1, grounding_per_step=self.grounding_per_step, steps=self.steps
            ):
                yield f"seed {self.seed} episode {index}", conversation
            index += stride

    def _encoded(self) -> Iterator[EncodedSample]:
        for name, conversation in self._conversations():
            yield encode_conversation(
                conversation["messages"],
                self.tokenizer,
                num_image_tokens=self.num_image_tokens,
                name=name,
                **self.encode_kwargs,
            )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = random.Random(self.seed)
        pool: list[EncodedSample] = []
        for sample in self._encoded():
            pool.append(sample)
            if len(pool) < self.batch_size * self.pool_batches:
                continue
            rng.shuffle(pool)  # episodes mixed before the (stable) sort breaks ties
            pool.sort(key=lambda s: len(s.input_ids))
            batches = [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
            rng.shuffle(batches)
            for batch in batches:
                yield self.collate(batch)
            pool = []


# --- training -----------------------------------------------------------------------------------------------
VISION_LR_SCALE = 0.3
"""The vision tower's learning rate as a fraction of the language model's, in `train_tiny`.

A measured choice (docs/BENCHMARKS.md, "Ninth session"): with every parameter at 1e-3 the tiny model
never learns to tell three coloured rectangles apart by the name in the task (5-6% click-in-box after 77k
samples); with only the tower at 3e-4 or 1e-4 it does (53-55%, 0-4% on blank screenshots), and with only
the language model at 3e-4 it does not (5%). A fast-moving tower keeps changing the vectors that the
language model is learning to match names against. On the course's mix the lower tower rate gave
21-26% after 26k samples against 16-17% at one rate, and after 10 CPU minutes on a 2-core laptop 21.4%
against 19.3% (blank screenshots 15.5% and 17.0%): a small step, not the issue's 80%.
"""


def parameter_groups(model, vision_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups: the vision tower (`transformer.vision`) with `lr_scale` = `vision_lr_scale`, the rest 1.0."""
    if not vision_lr_scale >= 0:  # also catches NaN
        raise ValueError(f"vision_lr_scale must be >= 0 (0 freezes the tower, 1 is one rate), got {vision_lr_scale}")
    tower = {id(p) for p in model.transformer.vision.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) in tower], "lr_scale": vision_lr_scale},
        {"params": [p for p in params if id(p) not in tower], "lr_scale": 1.0},
    ]


@dataclass
class TrainingLog:
    """What `train_tiny` did: steps, samples, seconds, and the loss after each step."""

    steps: int = 0
    samples: int = 0
    seconds: float = 0.0  # on the budget's clock (CPU or wall)
    wall_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    def summary(self, last: int = 10) -> str:
        """One line: steps, samples, wall seconds, and the first loss against the mean of the `last` ones."""
        if not self.losses:
            return "no steps taken"
        tail = self.losses[-last:]
        return (
            f"{self.steps} steps, {self.samples} fresh samples in {self.wall_seconds:.0f} s; "
            f"loss {self.losses[0]:.2f} -> {sum(tail) / len(tail):.2f}"
        )


def train_tiny(
    model,
    tokenizer,
    *,
    minutes: float,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    vision_lr_scale: float = VISION_LR_SCALE,
    warmup_steps: int = 20,
    seed: int = TRAIN_SEED,
    max_steps: int | None = None,
    grounding_per_step: int = 1,
    grounding_first: float = 0.0,
    clock: str = "cpu",
    log_every: int = 25,
    device: str | torch.device | None = None,
    workers: int = 0,
    task: str = "episodes",
    **encode_kwargs: Any,
) -> TrainingLog:
    """Full fine-tuning on `EpisodeStream` for `minutes` (or `max_steps`), then eval mode.

    task: "episodes" (the course's GUI mix) or "rectangle" (one light rectangle on a dark screen, "click
    the box": grounding alone, which the tiny model learns in minutes; `rectangle_report` scores it).

    grounding_first: the fraction of the budget spent on "click X" samples alone (a grounding phase,
    as CogAgent itself was pretrained on grounding before agent data) before the episodes start.

    clock: "cpu" counts the process's CPU time (`time.process_time`), so a run on a machine shared with
    other work does as much as it would on an idle one: with one torch thread, 10 CPU minutes are at
    most 10 wall minutes on an idle 2-core laptop. "wall" counts wall time.
    The learning rate warms up linearly, then follows a cosine to 10% over the budget, so a slower
    machine takes fewer steps but still ends on a small learning rate. The peak, 1e-3, is a measured
    choice (docs/BENCHMARKS.md, "Fifth session"): at 3e-3 the tiny model never learns to read a box off
    its screenshot, at 5e-4 it is still learning the answer format after 10 CPU minutes.
    vision_lr_scale: the vision tower trains at `learning_rate * vision_lr_scale` (`VISION_LR_SCALE`, why
    there); 1.0 trains every parameter at the same rate.

    device: where the model trains (None: where it is). workers: DataLoader processes that render the
    episodes (0: in this process). Both are for measuring what far more data would buy (a GPU run of
    `benchmarks/bench_learning.py --device cuda --workers 14`); the course trains on the CPU with neither.
    With workers, use clock="wall": the CPU clock counts only this process.
    """
    if task == "rectangle" and grounding_first > 0:
        raise ValueError(
            "grounding_first is a phase of GUI 'click X' samples before episodes: use it with task='episodes'"
        )
    torch.manual_seed(seed)
    stream = EpisodeStream(
        tokenizer,
        model.config.num_image_tokens,
        batch_size,
        seed=seed,
        grounding_per_step=grounding_per_step,
        task=task,
        **encode_kwargs,
    )
    grounding = EpisodeStream(
        tokenizer,
        model.config.num_image_tokens,
        batch_size,
        seed=seed + 1,
        grounding_per_step=max(2, grounding_per_step),
        steps=False,
        **encode_kwargs,
    )
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    loader = dict(batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    phases = (
        iter(torch.utils.data.DataLoader(grounding, **loader)) if grounding_first > 0 else iter(()),
        iter(torch.utils.data.DataLoader(stream, **loader)),
    )
    optimizer = torch.optim.AdamW(
        parameter_groups(model, vision_lr_scale), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.95)
    )
    now = {"cpu": time.process_time, "wall": time.perf_counter}[clock]
    log, budget, started, wall = TrainingLog(), minutes * 60, now(), time.perf_counter()
    model.train()
    while True:
        elapsed = now() - started
        if elapsed >= budget or (max_steps is not None and log.steps >= max_steps):
            break
        progress = elapsed / budget if max_steps is None else log.steps / max_steps
        batch = next(phases[0] if progress < grounding_first else phases[1])
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        warm = min(1.0, (log.steps + 1) / warmup_steps)
        scale = warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * scale * group["lr_scale"]
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        log.steps += 1
        log.samples += len(batch["input_ids"])
        log.losses.append(loss.item())
        if log_every and log.steps % log_every == 0:
            print(f"step {log.steps:5d}  samples {log.samples:6d}  loss {loss:.3f}  {elapsed:6.0f} s", flush=True)
    log.seconds, log.wall_seconds = now() - started, time.perf_counter() - wall
    model.eval()
    return log


# --- generation ---------------------------------------------------------------------------------------------
def white_like(image: Image.Image) -> Image.Image:
    """A white screenshot of the same size: what the model sees when the image carries no information."""
    return Image.new("RGB", image.size, (255, 255, 255))


def generate_answers(
    model,
    tokenizer,
    conversations: Sequence[dict[str, Any]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 160,
    blank_images: bool = False,
) -> list[str]:
    """Greedy answers to the user turns of `conversations`, through the inference stage's batched,
    left-padded `infer.generate.generate_answers` (official stop set, image markers suppressed).
    `blank_images` swaps every screenshot for a white one (`white_like`)."""
    from cogagent_nb.infer.generate import generate_answers as generate

    users = [conversation["messages"][0] for conversation in conversations]
    images = [white_like(user["image"]) if blank_images else user["image"] for user in users]
    prompts = [user["content"] for user in users]
    generated = generate(model, tokenizer, images, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return [g.text for g in generated]


# --- baselines that ignore the image ------------------------------------------------------------------------
def _target(conversation: dict[str, Any]) -> Action:
    """The reference operation of a conversation (read from its answer, as the metrics read it)."""
    return parse_answer(conversation["messages"][-1]["content"]).operation


def element_label(conversation: dict[str, Any]) -> str:
    """The reference operation's `element_info` (the label the task text names), or "" without one."""
    return str(_target(conversation).args.get("element_info", ""))


def _mean_box(boxes: list[Sequence[int]]) -> tuple[int, ...]:
    return tuple(round(sum(b[i] for b in boxes) / len(boxes)) for i in range(4))


def text_only_boxes(train: Sequence[dict[str, Any]]) -> dict[tuple[str, str], tuple[int, ...]]:
    """Mean training box per (platform, element label), and per (platform, "") for labels never seen.

    The best a model can do from the text alone: the task and the history name the element, the
    platform line names the device, nothing says where the element is on *this* screen.
    """
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for conversation in train:
        op = _target(conversation)
        if op.box is not None:
            groups[(conversation["platform"], element_label(conversation))].append(op.box)
            groups[(conversation["platform"], "")].append(op.box)
    return {key: _mean_box(boxes) for key, boxes in groups.items()}


def text_only_answer(conversation: dict[str, Any], means: dict[tuple[str, str], tuple[int, ...]]) -> str:
    """The reference answer with the text-only box (`text_only_boxes`) in place of the true one."""
    platform = conversation["platform"]
    return with_box(conversation, means.get((platform, element_label(conversation)), means.get((platform, ""))))


def most_common_box(train: Sequence[dict[str, Any]]) -> tuple[int, ...]:
    """The single most frequent training box (ties: the first seen)."""
    counts = Counter(tuple(op.box) for op in map(_target, train) if op.box is not None)
    return counts.most_common(1)[0][0]


def with_box(conversation: dict[str, Any], box: Sequence[int] | None) -> str:
    """The reference answer with its operation's box replaced by `box` (None: the answer unchanged)."""
    answer = conversation["messages"][-1]["content"]
    op = _target(conversation)
    if box is None or op.box is None:
        return answer
    old = "[[" + ",".join(str(v) for v in op.box) + "]]"
    return answer.replace(old, "[[" + ",".join(str(v) for v in box) + "]]", 1)


# --- the whole comparison -----------------------------------------------------------------------------------
REPORT_ROWS: tuple[str, ...] = ("untrained", "most common box", "text-only guess", "blank image", "trained")
"""The rows of `learning_report`, in table order."""


def rates(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int | None]:
    """The GUI metrics (`cogagent_nb.infer.metrics.summarize`) of greedy answers against references."""
    from cogagent_nb.infer.metrics import score_answers, summarize

    summary = summarize(score_answers(predictions, references))
    keys = ("parse_rate", "click_in_box", "type_accuracy", "text_exact", "step_success", "n", "n_with_box")
    return {key: summary[key] for key in keys}


def baseline_rates(held_out: Sequence[dict[str, Any]], seen: Sequence[dict[str, Any]]) -> dict[str, dict]:
    """What answers that ignore the screenshot score: the most common box and the text-only guess.

    Both keep the reference answer's text and action and change only the box, so they measure the
    box alone (parse and type rates are 100% by construction).
    """
    references = [c["messages"][-1]["content"] for c in held_out]
    common = most_common_box(seen)
    means = text_only_boxes(seen)
    return {
        "most common box": rates([with_box(c, common) for c in held_out], references),
        "text-only guess": rates([text_only_answer(c, means) for c in held_out], references),
    }


def model_rates(
    model, tokenizer, held_out: Sequence[dict[str, Any]], *, blank_images: bool = False, batch_size: int = 32
) -> tuple[dict, list[str]]:
    """Greedy answers on `held_out` and their rates; `blank_images` swaps every screenshot for a white one."""
    predictions = generate_answers(model, tokenizer, held_out, blank_images=blank_images, batch_size=batch_size)
    return rates(predictions, [c["messages"][-1]["content"] for c in held_out]), predictions


def blank_and_trained(model, tokenizer, held_out: Sequence[dict[str, Any]], *, batch_size: int = 32) -> dict[str, dict]:
    """The report rows "blank image" (the model on white screens) and "trained" (on the real ones)."""
    return {
        "blank image": model_rates(model, tokenizer, held_out, blank_images=True, batch_size=batch_size)[0],
        "trained": model_rates(model, tokenizer, held_out, batch_size=batch_size)[0],
    }


def scores_by_target(predictions: Sequence[str], held_out: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Click-in-box per kind of target ("files list_item", "mail button", ...): which elements a model finds.

    Uses the `target` that `episode_conversations` gives each step; steps without a box are left out.
    Returns {target: {"n": samples, "click_in_box": rate}}, targets sorted by name.
    """
    from cogagent_nb.infer.metrics import score_answers

    scores = score_answers(predictions, [c["messages"][-1]["content"] for c in held_out])
    groups: dict[str, list[bool]] = defaultdict(list)
    for conversation, score in zip(held_out, scores):
        if conversation.get("target") and score.click_in_box is not None:
            groups[conversation["target"]].append(score.click_in_box)
    return {name: {"n": len(hits), "click_in_box": sum(hits) / len(hits)} for name, hits in sorted(groups.items())}


def format_targets(by_row: dict[str, dict[str, dict[str, float]]]) -> str:
    """`scores_by_target` of several rows (e.g. "trained", "blank image") side by side, as a text table."""
    rows = list(by_row)
    targets = sorted({target for table in by_row.values() for target in table})
    lines = [f"{'target':22s} {'n':>4s} " + " ".join(f"{row:>12s}" for row in rows)]
    for target in targets:
        n = next(table[target]["n"] for table in by_row.values() if target in table)
        cells = " ".join(
            f"{by_row[row][target]['click_in_box']:12.1%}" if target in by_row[row] else f"{'-':>12s}" for row in rows
        )
        lines.append(f"{target:22s} {n:4d} {cells}")
    return "\n".join(lines)


def format_report(results: dict[str, dict]) -> str:
    """The comparison as a text table: parse rate, click-in-box, action type and step success per row."""
    lines = [f"{'setting':18s} {'parse':>7s} {'click-in-box':>13s} {'type':>7s} {'step':>7s}"]
    for name, row in results.items():
        lines.append(
            f"{name:18s} {row['parse_rate']:7.1%} {row['click_in_box']:13.1%} "
            f"{row['type_accuracy']:7.1%} {row['step_success']:7.1%}"
        )
    return "\n".join(lines)


def grounding_report(
    model,
    tokenizer,
    *,
    eval_episodes: int = 96,
    baseline_episodes: int = 400,
    untrained: dict | None = None,
    batch_size: int = 32,
) -> dict[str, dict]:
    """The comparison of issue 10 on held-out episodes (seed `EVAL_SEED`), rows as in `REPORT_ROWS`.

    `untrained`: the rates of the same model before training (`model_rates` on the held-out episodes),
    measured by the caller before it trains; left out of the table when None. The text-only and
    most-common-box rows use `baseline_episodes` episodes of the training distribution.
    Print it with `format_report`.
    """
    held_out = list(episode_conversations(EVAL_SEED, 0, eval_episodes))
    seen = list(episode_conversations(TRAIN_SEED, 10**6, baseline_episodes))
    results = {} if untrained is None else {"untrained": untrained}
    results.update(baseline_rates(held_out, seen))
    results.update(blank_and_trained(model, tokenizer, held_out, batch_size=batch_size))
    return results


def rectangle_held_out(count: int = 64) -> list[dict[str, Any]]:
    """The first `count` one-rectangle conversations of `EVAL_SEED`, which no training stream draws."""
    return list(itertools.islice(rectangle_conversations(EVAL_SEED), count))


def rectangle_report(model, tokenizer, *, samples: int = 64, batch_size: int = 32) -> dict[str, dict]:
    """What a model trained with `train_tiny(task="rectangle")` scores on held-out one-rectangle screens.

    Rows: "text-only guess" (the task text never changes, so the best answer without the screenshot is one
    fixed box: the mean of 400 boxes drawn as the training ones are), "blank image" (the model on white screens) and "trained".
    On this task grounding is all there is: "trained" far above both others is the model reading the
    screenshot. Plot it with `plot_learning_report`, print it with `format_report`.
    """
    held_out = rectangle_held_out(samples)
    seen = list(itertools.islice(rectangle_conversations(TRAIN_SEED), 400))
    references = [c["messages"][-1]["content"] for c in held_out]
    means = text_only_boxes(seen)
    results = {"text-only guess": rates([text_only_answer(c, means) for c in held_out], references)}
    results.update(blank_and_trained(model, tokenizer, held_out, batch_size=batch_size))
    return results
