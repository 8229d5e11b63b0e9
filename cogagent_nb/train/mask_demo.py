"""Lesson 02's experiment: train with the official mask and with the fixed one, then see which model stops.

The official finetune (THUDM/CogAgent `finetune/finetune.py`) never labels the end-of-turn token it
appends after an answer (`encode_conversation(..., mode="official")`), so nothing in training raises
the probability of stopping. `compare_masks` shows it instead of stating it:

1. one tiny model is initialised (`init_model("tiny", seed=model_seed)`) and copied twice;
2. each copy is fully fine-tuned with a plain AdamW loop on the *same* synthetic samples in the *same*
   batch order; the only difference is the mask (`mode="official"` or `mode="fixed"`);
3. on held-out samples (episodes of the benchmark's held-out seed, never trained on) each model reads
   the prompt and the reference answer (teacher forcing), and `stop_probabilities` reads the probability
   it gives to `<|user|>`, and to the whole official stop set `tokenizer.eos_token_ids_for_generation`,
   at the position right after the answer's last token: where a model that has learnt to stop must
   emit a stop token;
4. each model then answers the held-out prompts greedily (the inference stage's `generate_answers`,
   with the official stop set), and we count the answers that end on a stop token instead of running
   into `max_new_tokens`.

Step 3 is repeated every `eval_every` steps, so the result holds curves, not only end points. All of it
is seeded and runs on a CPU: 120 steps of 8 samples take about 20 s per mask on one core.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Sequence
from typing import Any

import torch

from cogagent_nb.data.encoding import IGNORE_INDEX, EncodedSample, TrainingCollator, encode_conversation

MASKS: tuple[str, ...] = ("official", "fixed")
"""The two masks compared, as `encode_conversation(mode=...)` names them."""


@dataclasses.dataclass(frozen=True)
class StopPoint:
    """The stop measurement at one optimizer step, averaged over the held-out samples."""

    step: int
    p_user: float  # mean P(<|user|>) right after the answer's last token
    p_stop: float  # mean P(any id of the stop set) at the same position
    stop_is_top: float  # fraction of samples whose most likely next token there is a stop id


@dataclasses.dataclass(frozen=True)
class MaskRun:
    """One mask's training run and what was measured on the held-out samples."""

    mode: str  # "official" or "fixed"
    curve: tuple[StopPoint, ...]  # step 0 (the shared initial model), every eval_every steps, the last step
    losses: tuple[float, ...]  # training loss of each step
    stop_targets: int  # training labels that are a stop id: 0 with the official mask, one per sample with the fix
    answers: tuple[str, ...]  # greedy answers to the held-out prompts (special tokens removed)
    stopped: tuple[bool, ...]  # per answer: ended on a stop token (False: ran into max_new_tokens)
    new_tokens: tuple[int, ...]  # per answer: tokens generated, the stop token included
    seconds: float  # training wall time

    @property
    def final(self) -> StopPoint:
        return self.curve[-1]

    @property
    def stopped_rate(self) -> float:
        return sum(self.stopped) / len(self.stopped) if self.stopped else 0.0


@dataclasses.dataclass(frozen=True)
class MaskComparison:
    """`compare_masks`'s result: one `MaskRun` per mask, and what both were trained and measured on."""

    runs: dict[str, MaskRun]  # "official", "fixed"
    steps: int
    train_samples: int
    held_out_samples: int
    max_new_tokens: int  # the greedy answers' limit
    longest_answer: int  # targets of the longest held-out reference ("\\n" + answer + end of turn)
    model_seed: int
    train_seed: int

    def table(self) -> dict[str, dict[str, Any]]:
        """One row per mask for `counts_table_html`: stop targets, final stop probabilities, greedy stops."""
        return {
            f"{mode} mask": {
                "stop targets in training": run.stop_targets,
                "P(<|user|>) after the answer": f"{run.final.p_user:.4f}",
                "P(stop set) after the answer": f"{run.final.p_stop:.4f}",
                "stop is the top token": f"{run.final.stop_is_top:.0%}",
                "greedy answers that stop": f"{sum(run.stopped)}/{len(run.stopped)}",
                "mean tokens generated": f"{sum(run.new_tokens) / max(len(run.new_tokens), 1):.0f}",
                "final training loss": f"{run.losses[-1]:.2f}",
            }
            for mode, run in self.runs.items()
        }


# --- data ---------------------------------------------------------------------------------------------------
def demo_conversations(seed: int, count: int) -> list[dict[str, Any]]:
    """`count` conversations from the synthetic episodes 0, 1, ... of `seed` (images as PIL images).

    Taken step by step across episodes (step 0 of each, then step 1 of each, ...), so that a small set
    mixes apps, platforms and actions instead of being two whole episodes.
    """
    from cogagent_nb.train.grounding import episode_conversations

    episodes: list[list[dict[str, Any]]] = []
    while sum(map(len, episodes)) < count:
        episodes.append(list(episode_conversations(seed, len(episodes), 1)))
    longest = max(map(len, episodes))
    mixed = [episode[i] for i in range(longest) for episode in episodes if i < len(episode)]
    return mixed[:count]


def _encode(conversations: Sequence[dict[str, Any]], tokenizer, num_image_tokens: int, mode: str):
    return [
        encode_conversation(c["messages"], tokenizer, num_image_tokens=num_image_tokens, mode=mode, name=f"demo {i}")
        for i, c in enumerate(conversations)
    ]


# --- the measurement ----------------------------------------------------------------------------------------
@torch.no_grad()
def stop_probabilities(model, tokenizer, samples: Sequence[EncodedSample]) -> dict[str, list]:
    """Per sample, at the position right after the answer's last token: what the model would emit next.

    `samples` must end with their end-of-turn token (any mask; an answer not cut). The model reads
    everything before it (prompt, `<|assistant|>`, "\\n", the reference answer), and its last position's
    distribution is the one generation draws from once the answer is complete.
    Returns lists with one entry per sample: "p_user" = P(`<|user|>`), "p_stop" = P(any id of
    `tokenizer.eos_token_ids_for_generation`), "stop_is_top" = the most likely token is a stop id.
    """
    stop_ids = list(tokenizer.eos_token_ids_for_generation)
    was_training = model.training
    model.eval()
    result: dict[str, list] = {"p_user": [], "p_stop": [], "stop_is_top": []}
    for sample in samples:
        if sample.input_ids[-1].item() not in stop_ids:
            raise ValueError(f"{sample.name}: does not end with a stop id (was its answer cut by max_output_length?)")
        ids = sample.input_ids[None, :-1]  # (1, L-1): up to and including the answer's last token
        logits = model(
            input_ids=ids,
            images=sample.image[None],  # (1, 3, S, S)
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(ids.shape[1])[None],
        ).logits[0, -1]  # (V,) scores of the token after the answer
        probs = torch.softmax(logits.float(), dim=-1)
        result["p_user"].append(probs[tokenizer.user_id].item())
        result["p_stop"].append(probs[stop_ids].sum().item())
        result["stop_is_top"].append(int(probs.argmax()) in stop_ids)
    model.train(was_training)
    return result


def _point(step: int, model, tokenizer, held_out: Sequence[EncodedSample]) -> StopPoint:
    measured = stop_probabilities(model, tokenizer, held_out)
    mean = {key: sum(values) / len(values) for key, values in measured.items()}
    return StopPoint(step, mean["p_user"], mean["p_stop"], mean["stop_is_top"])


# --- training -----------------------------------------------------------------------------------------------
def batch_order(n_samples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The sample indices of each step: shuffled passes over the training set (both masks get this list)."""
    rng, pending, batches = random.Random(seed), [], []
    while len(batches) < steps:
        if len(pending) < batch_size:
            epoch = list(range(n_samples))
            rng.shuffle(epoch)
            pending += epoch
        batches.append(pending[:batch_size])
        pending = pending[batch_size:]
    return batches


def train_with_mask(
    model,
    tokenizer,
    train: Sequence[EncodedSample],
    held_out: Sequence[EncodedSample],
    batches: Sequence[Sequence[int]],
    *,
    learning_rate: float,
    eval_every: int,
    warmup_steps: int = 10,
) -> tuple[tuple[StopPoint, ...], tuple[float, ...], float]:
    """Full fine-tuning with plain AdamW, one batch of `train` per entry of `batches`, then eval mode.

    The learning rate warms up linearly over `warmup_steps`, then follows a cosine down to 10%. The stop
    measurement on `held_out` is taken before the first step, every `eval_every` steps and after the last.
    Returns (stop curve, loss per step, seconds).
    """
    collate = TrainingCollator(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    curve, losses = [_point(0, model, tokenizer, held_out)], []
    started = time.perf_counter()
    model.train()
    for step, indices in enumerate(batches, start=1):
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * (step - 1) / len(batches)))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * min(1.0, step / warmup_steps) * cosine
        loss = model(**collate([train[i] for i in indices])).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == len(batches):
            curve.append(_point(step, model, tokenizer, held_out))
    model.eval()
    return tuple(curve), tuple(losses), time.perf_counter() - started


def compare_masks(
    *,
    steps: int = 120,
    train_samples: int = 64,
    held_out_samples: int = 8,
    batch_size: int = 8,
    learning_rate: float = 3e-3,
    eval_every: int = 10,
    model_seed: int = 0,
    train_seed: int | None = None,
    max_new_tokens: int | None = None,
) -> MaskComparison:
    """Train two copies of one tiny model, official mask vs fixed mask, and measure how each one stops.

    steps: optimizer steps per mask, `batch_size` samples each, over the same `train_samples` synthetic
      samples (episodes of `train_seed`, default the grounding recipe's `TRAIN_SEED`) in the same order.
    held_out_samples: samples of episodes of the held-out seed `EVAL_SEED`, measured with
      `stop_probabilities` every `eval_every` steps, and answered greedily at the end.
    max_new_tokens: the greedy answers' limit; None = the longest held-out reference answer + 24, room
      enough for a model that writes an answer of the usual length and then stops.
    model_seed: the initial weights (`init_model("tiny", seed=model_seed)`), shared by both runs.

    Uses its own tiny model and tokenizer, so it runs the same whatever the lesson's data and tokenizer.
    Returns a `MaskComparison`; `.table()` summarises it, `cnb.plot_stop_probability` draws it.
    """
    from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer
    from cogagent_nb.infer.generate import generate_answers
    from cogagent_nb.model.loading import init_model
    from cogagent_nb.train.grounding import EVAL_SEED, TRAIN_SEED

    if min(steps, train_samples, held_out_samples, batch_size, eval_every) < 1:
        raise ValueError(
            "steps, train_samples, held_out_samples, batch_size and eval_every must be >= 1, got "
            f"{steps}, {train_samples}, {held_out_samples}, {batch_size}, {eval_every}"
        )
    train_seed = TRAIN_SEED if train_seed is None else train_seed
    if train_seed == EVAL_SEED:
        raise ValueError(f"train_seed {train_seed} is the held-out seed EVAL_SEED: pick another")
    base = init_model("tiny", seed=model_seed)
    tokenizer = ChatGLM4Tokenizer(TINY_TOKENIZER_FILE, image_size=base.config.image_size)
    n_image = base.config.num_image_tokens
    train_conversations = demo_conversations(train_seed, train_samples)
    held_conversations = demo_conversations(EVAL_SEED, held_out_samples)
    held_out = _encode(held_conversations, tokenizer, n_image, "fixed")
    longest = max(int((s.labels != IGNORE_INDEX).sum()) for s in held_out)
    limit = max_new_tokens if max_new_tokens is not None else longest + 24
    batches = batch_order(train_samples, batch_size, steps, train_seed)
    stop_ids = set(tokenizer.eos_token_ids_for_generation)

    runs = {}
    for mode in MASKS:
        train = _encode(train_conversations, tokenizer, n_image, mode)
        model = copy.deepcopy(base)  # the same initial weights for both masks
        curve, losses, seconds = train_with_mask(
            model, tokenizer, train, held_out, batches, learning_rate=learning_rate, eval_every=eval_every
        )
        generated = generate_answers(
            model,
            tokenizer,
            [c["messages"][0]["image"] for c in held_conversations],
            [c["messages"][0]["content"] for c in held_conversations],
            batch_size=held_out_samples,
            max_new_tokens=limit,
        )
        runs[mode] = MaskRun(
            mode=mode,
            curve=curve,
            losses=losses,
            stop_targets=sum(label in stop_ids for s in train for label in s.labels.tolist()),
            answers=tuple(g.text for g in generated),
            stopped=tuple(g.stopped for g in generated),
            new_tokens=tuple(g.new_tokens for g in generated),
            seconds=seconds,
        )
    return MaskComparison(runs, steps, train_samples, held_out_samples, limit, longest, model_seed, train_seed)
