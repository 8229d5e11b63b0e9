"""Can the tiny CogAgent learn to *say where* something is on its screenshot? Learning curves in steps.

Issue 10 asks the course's tiny model to click inside the right box. On GUI episodes it stays at the
level of a guess from the task text (`bench_learning.py`). This benchmark takes the question apart with
graded tasks, all answered the way the agent answers ("Action: Click the 'X' element." then
`CLICK(box=[[x1,y1,x2,y2]], ...)` in thousandths), from easiest to the course's own:

  rectangle   one white rectangle (24-56 x 20-44 px) anywhere on a black 224-px image, "Click 'box'."
  labelled    --objects coloured rectangles on white, each in the colour of an app of `screens.STYLE`
              (Mail blue, Music red, ...); the task names one: the model must tell them apart by colour
  gui         "click X" on the synthetic GUI screens (`synthetic.grounding_samples`, fresh episodes)
  episodes    the course's mix: episode steps plus two "click X" samples per screen

and two starts of the tiny model:

  preset      as `cogagent_nb.make_tiny_model` writes it: the vision tower started so that a box can be
              read out of its vectors (`cogagent_nb.model.tiny_init`: 2-D sin-cos patch positions,
              identity-start layers, a fan-in adapter)
  plain       normal(0.02) everywhere, image vectors lifted to the text scale (`PLAIN_START`)

and, with --lm-init, two starts of its language model's decoder layers: the preset's normal(0.02), or
`fan-in` (1/sqrt(fan-in), `cogagent_nb.model.tiny_init.fan_in_language_model`). Telling elements
apart by their look ("labelled") is learnt at --lr 3e-4 with either start, in every seed measured
(45-70% after 77k samples); at 1e-3 only one fan-in draw of four learnt it (docs/BENCHMARKS.md,
"Sixth session" and "Seventh session"). What fails at 1e-3 is the vision tower's rate: with the tower
alone at 3e-4 or 1e-4 (--vision-lr-scale 0.3 or 0.1) the binding is learnt at 1e-3 too ("Ninth session").

At each step in --evals it scores greedy answers on held-out samples (fixed seeds, never trained on):
click-in-box with the real screenshot and with a white one. Prints a table and writes JSON (--json).
Examples:
  python benchmarks/bench_readout.py --task rectangle --steps 600 --evals 300,600        # a CPU probe
  python benchmarks/bench_readout.py --task rectangle --device cuda --workers 2 --batch-size 32 \
      --steps 4000 --evals 1000,2000,4000 --json runs/readout-rectangle.json
  python benchmarks/bench_readout.py --task labelled --lr 3e-4 --seed 1 --device cuda --workers 1 \
      --batch-size 32 --steps 2400 --evals 800,1600,2400 --json runs/readout-labelled-lr3e-4.json
  python benchmarks/bench_readout.py --task labelled --lr 1e-3 --vision-lr-scale 0.3 --device cuda \
      --workers 1 --batch-size 32 --steps 2400 --evals 800,1600,2400   # the tower at 3e-4, the rest at 1e-3
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a clone without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import run_record  # noqa: E402
from cogagent_nb.data import screens, synthetic  # noqa: E402
from cogagent_nb.data.encoding import TrainingCollator, encode_conversation  # noqa: E402
from cogagent_nb.train import grounding as g  # noqa: E402

TASKS = ("rectangle", "labelled", "gui", "episodes")
APPS = ("Mail", "Music", "Files", "Maps", "Photos", "Browser")  # distinct colours in screens.STYLE
SIZE = 224  # the tiny tower's image size; the rectangle tasks draw at it, so no resize blurs the edges


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="rectangle")
    parser.add_argument("--init", choices=("preset", "plain"), default="preset")
    parser.add_argument(
        "--lm-init",
        choices=LM_INITS,
        default="preset",
        help="preset: the language model's matrices at normal(0.02); fan-in: its decoder layers' matrices "
        "at 1/sqrt(fan-in) (cogagent_nb.model.tiny_init.fan_in_language_model)",
    )
    parser.add_argument(
        "--numbers",
        choices=("digits", "whole", "whole-smooth"),
        default="digits",
        help="digits: the tiny tokenizer (a coordinate is 3 digit tokens); whole: every number 0-999 one "
        "token, as in the real GLM-4 tokenizer; whole-smooth: the same, with the number tokens' embedding "
        "and output rows started as a smooth code of the number",
    )
    parser.add_argument("--objects", type=int, default=3, help="rectangles on a 'labelled' screen")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--evals", default="300,600", help="steps after which to score, comma-separated")
    parser.add_argument("--eval-samples", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, warm-up then cosine)")
    parser.add_argument(
        "--vision-lr-scale",
        type=float,
        default=1.0,
        help="the vision tower's learning rate as a fraction of --lr (1.0, this script's default: one rate, "
        f"as in the runs of the first eight sessions; train_tiny uses {g.VISION_LR_SCALE})",
    )
    parser.add_argument(
        "--first-digit-weight",
        type=float,
        default=1.0,
        help="loss weight of the first digit of every number in the answer (the coarse position)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes that draw the samples")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if not args.vision_lr_scale >= 0:
        parser.error(f"--vision-lr-scale {args.vision_lr_scale}: expected 0 (tower frozen) or more (1: one rate)")
    try:
        args.evals = sorted({int(step) for step in args.evals.split(",")})
    except ValueError:
        parser.error(f"--evals {args.evals!r}: expected step numbers separated by commas, e.g. 300,600")
    if args.evals[0] < 1:
        parser.error(f"--evals {args.evals[0]}: steps count from 1")
    if args.evals[-1] > args.steps:
        parser.error(f"--evals {args.evals[-1]} is after the last step ({args.steps})")
    if not 1 <= args.objects <= len(APPS):
        parser.error(
            f"--objects {args.objects}: a 'labelled' screen holds 1 to {len(APPS)} rectangles ({', '.join(APPS)})"
        )
    return args


# --- the starts -------------------------------------------------------------------------------------------
LM_INITS = ("preset", "fan-in")
"""Starts of the language model's decoder layers (`--lm-init`): the preset's normal(0.02), or fan-in scale."""


def start_language_model(model, lm_init: str, seed: int):
    """The model with its decoder layers started as `lm_init` says (`LM_INITS`)."""
    from cogagent_nb.model.tiny_init import fan_in_language_model

    return fan_in_language_model(model, seed=seed) if lm_init == "fan-in" else model


PLAIN_START = {"readable_init": False, "scaling_factor": 0.125}
"""The tiny tower without `readable_init`: normal(0.02) everywhere, with the image vectors lifted to the
text scale (norm ~0.3) by dividing by 0.125 instead of 8; the preset before issue 10's last change, less
its patch-position spread of 0.3."""


def tiny_model(seed: int, init: str, tokenizer_file: Path | None = None):
    """(tokenizer, random tiny model) of the preset (`init` "preset") or of the plain start ("plain").

    tokenizer_file: the course's tiny tokenizer when None; the model's vocabulary follows the file's ranks.
    """
    from cogagent_nb.data.bpe import read_tokenizer_model
    from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer
    from cogagent_nb.model.configuration import CogAgentConfig, vocabulary_fields
    from cogagent_nb.model.loading import init_model

    tokenizer_file = tokenizer_file or TINY_TOKENIZER_FILE
    fields = vocabulary_fields(len(read_tokenizer_model(tokenizer_file)))
    vision = PLAIN_START if init == "plain" else {}
    config = CogAgentConfig.from_preset("tiny", vision_config=vision, **fields)
    return ChatGLM4Tokenizer(tokenizer_file, image_size=SIZE), init_model(config, seed=seed)


def whole_number_model(seed: int, init: str, smooth: bool):
    """The tiny tokenizer plus one rank for every number 10-999 (and 00-09, the merge steps), with a tiny
    model of that vocabulary: a coordinate is then one token, one 1000-way choice, as in the real GLM-4
    tokenizer (`\\p{N}{1,3}` pieces), instead of three digits of which the first carries the coarse position.

    smooth: the number tokens' input and output rows start as a sin-cos code of the number (neighbours
    similar), so the head's choice of number can follow a smooth position code from the image.
    """
    from cogagent_nb.data.bpe import read_tokenizer_model, write_tokenizer_model
    from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE

    ranks = read_tokenizer_model(TINY_TOKENIZER_FILE)
    for number in [f"{i:02d}" for i in range(100)] + [str(i) for i in range(100, 1000)]:
        ranks.setdefault(number.encode(), len(ranks))
    vocab_file = write_tokenizer_model(Path(tempfile.mkdtemp(prefix="bench_readout_tok_")) / "tokenizer.model", ranks)
    tokenizer, model = tiny_model(seed, init, vocab_file)
    ids = [tokenizer.encode(str(k), add_special_tokens=False) for k in range(1000)]
    if any(len(i) != 1 for i in ids):
        raise ValueError("a number 0-999 is not one token")
    if smooth:
        with torch.no_grad():
            ids_t = torch.tensor([i[0] for i in ids])
            for table in (model.transformer.embedding.word_embeddings.weight, model.transformer.output_layer.weight):
                norm = table.norm(dim=1).mean()
                k = torch.arange(1000.0)[:, None]
                freq = (torch.arange(table.shape[1] // 2) + 1) * math.pi / 1000
                code = torch.cat([(k * freq).cos(), (k * freq).sin()], dim=1)
                table[ids_t] = code * norm / code.norm(dim=1, keepdim=True)
    return tokenizer, model


# --- the tasks ----------------------------------------------------------------------------------------------
def _free_box(rng: random.Random, taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    while True:
        width, height = rng.randint(24, 56), rng.randint(20, 44)
        left, top = rng.randint(0, SIZE - width), rng.randint(0, SIZE - height)
        box = (left, top, left + width, top + height)
        if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in taken):
            return box


def rectangle_conversation(rng: random.Random, task: str, objects: int) -> dict[str, Any]:
    """One sample of the 'rectangle' task (`synthetic.rectangle_conversation`, which the course trains on too)
    or of the 'labelled' one; the first rectangle drawn is the target."""
    if task == "rectangle":
        return synthetic.rectangle_conversation(rng, SIZE)
    image, labels = Image.new("RGB", (SIZE, SIZE), (250, 250, 250)), rng.sample(APPS, objects)
    colours = [screens.STYLE[label].colour for label in labels]
    boxes: list[tuple[int, int, int, int]] = []
    for colour in colours:
        boxes.append(_free_box(rng, boxes))
        image.paste(colour, boxes[-1])
    return synthetic.click_conversation(image, labels[0], boxes[0])


def conversations(task: str, objects: int, seed: int, start: int = 0) -> Iterator[dict[str, Any]]:
    """Endless fresh conversations of `task` (the GUI tasks from episode `start` of `seed` on)."""
    if task in ("rectangle", "labelled"):
        rng = random.Random(seed)
        while True:
            yield rectangle_conversation(rng, task, objects)
    index = start
    while True:
        yield from g.episode_conversations(seed, index, 1, grounding_per_step=2, steps=task == "episodes")
        index += 1


class Stream(torch.utils.data.IterableDataset):
    """Collated training batches of fresh samples; DataLoader worker w draws from its own seed."""

    def __init__(self, args: argparse.Namespace, tokenizer, num_image_tokens: int) -> None:
        self.args, self.tokenizer, self.num_image_tokens = args, tokenizer, num_image_tokens

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        w = 0 if worker is None else worker.id
        collate, args = TrainingCollator(self.tokenizer), self.args
        source = conversations(args.task, args.objects, seed=g.TRAIN_SEED + 7_777 * w, start=10**5 * w)
        while True:
            samples = [next(source) for _ in range(args.batch_size)]
            yield collate(
                [
                    encode_conversation(s["messages"], self.tokenizer, num_image_tokens=self.num_image_tokens, name="s")
                    for s in samples
                ]
            )


def held_out(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The scored samples: a fixed seed the training stream never uses."""
    source = conversations(args.task, args.objects, seed=g.EVAL_SEED)
    return [next(source) for _ in range(args.eval_samples)]


# --- training and scoring -----------------------------------------------------------------------------------
def score(model, tokenizer, samples: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, float]:
    """Greedy click-in-box with the real and a white screenshot, and the teacher-forced accuracy of the
    numbers' first digits (the coarse position) and of their other digits."""
    references = [s["messages"][1]["content"] for s in samples]
    tokens = answer_budget(tokenizer, references)
    real = g.rates(g.generate_answers(model, tokenizer, samples, max_new_tokens=tokens), references)
    blank = g.rates(g.generate_answers(model, tokenizer, samples, max_new_tokens=tokens, blank_images=True), references)
    return {
        "parse": real["parse_rate"],
        "click_in_box": real["click_in_box"],
        "blank_click_in_box": blank["click_in_box"],
        **digit_accuracy(model, tokenizer, samples, args.device),
    }


def answer_budget(tokenizer, references: list[str], margin: int = 16) -> int:
    """New tokens to allow: the longest reference answer plus a margin, so that no task's answer format
    is cut short (a fixed 60 cut the longer formats of a scratch task once, and read as parse failures)."""
    return max(len(tokenizer.encode_text(answer)) for answer in references) + margin


@torch.no_grad()
def digit_accuracy(model, tokenizer, samples: list[dict[str, Any]], device: str) -> dict[str, float]:
    """Teacher-forced argmax accuracy on the answers' digits: first digits of numbers, and the rest."""
    collate, first_digits = TrainingCollator(tokenizer), FirstDigits(tokenizer, device)
    hits = {"first_digit_accuracy": [0, 0], "other_digit_accuracy": [0, 0]}
    for start in range(0, len(samples), 32):
        encoded = [
            encode_conversation(s["messages"], tokenizer, num_image_tokens=model.config.num_image_tokens, name="s")
            for s in samples[start : start + 32]
        ]
        batch = {key: value.to(device) for key, value in collate(encoded).items()}
        targets = batch["labels"][:, 1:]
        predicted = next_token_logits(model(**batch).logits, batch["labels"]).argmax(-1)
        first = first_digits(targets)
        other = torch.isin(targets, first_digits.digits) & ~first
        for key, mask in (("first_digit_accuracy", first), ("other_digit_accuracy", other)):
            hits[key][0] += int((predicted[mask] == targets[mask]).sum())
            hits[key][1] += int(mask.sum())
    return {key: right / max(1, total) for key, (right, total) in hits.items()}


def next_token_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits (B, L - 1, V) that predict `labels[:, 1:]`.

    The model's logits run over the spliced sequence (the image's placeholder replaced by its vectors,
    so `logits.shape[1] - labels.shape[1]` positions longer); the answer comes after the image, so its
    predictions sit that many positions further on. Positions before the image are not supervised.
    """
    offset = logits.shape[1] - labels.shape[1]
    return logits[:, offset : offset + labels.shape[1] - 1]


class FirstDigits:
    """Which supervised targets start a number: a first digit (the tiny tokenizer spells numbers digit by
    digit) or a whole number token (with --numbers whole)."""

    def __init__(self, tokenizer, device: str) -> None:
        ids = [tokenizer.encode(str(k), add_special_tokens=False) for k in range(1000)]
        if any(len(i) != 1 for i in ids[:10]):
            raise ValueError(f"digits are not single tokens in this tokenizer: {ids[:10]}")
        self.digits = torch.tensor(sorted({i[0] for i in ids if len(i) == 1}), device=device)

    def __call__(self, targets: torch.Tensor) -> torch.Tensor:
        is_digit = torch.isin(targets, self.digits)
        after_digit = torch.zeros_like(is_digit)
        after_digit[:, 1:] = is_digit[:, :-1]
        return is_digit & ~after_digit


def weighted_loss(model, batch: dict[str, torch.Tensor], first_digits: FirstDigits, weight: float) -> torch.Tensor:
    """The mean answer cross-entropy, with the first digit of each number counted `weight` times.

    Why: with digits spelled one by one, the tens and units of a coordinate follow from its first digit
    (the context), so the mean loss can fall far while the first digit, the coarse position that only
    the image tells, stays a guess. This puts that digit's gradient back in front.
    """
    if weight == 1.0:
        return model(**batch).loss
    out = model(**batch, return_logits=True)
    targets = batch["labels"][:, 1:]
    first = first_digits(targets) & (targets != -100)
    rows, cols = first.nonzero(as_tuple=True)
    extra = torch.nn.functional.cross_entropy(
        next_token_logits(out.logits, batch["labels"])[rows, cols].float(), targets[rows, cols], reduction="sum"
    )
    return out.loss + (weight - 1.0) * extra / (targets != -100).sum()


def train(args: argparse.Namespace, model, tokenizer, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """AdamW with a 50-step warm-up and a cosine to 10% over --steps; a score row at each --evals step."""
    stream = Stream(args, tokenizer, model.config.num_image_tokens)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=args.workers, persistent_workers=args.workers > 0
    )
    batches = iter(loader)
    optimizer = torch.optim.AdamW(
        g.parameter_groups(model, args.vision_lr_scale), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95)
    )
    first_digits = FirstDigits(tokenizer, args.device)
    rows, losses, started = [], [], time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        scale = min(1.0, step / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * scale * group["lr_scale"]
        batch = {key: value.to(args.device, non_blocking=True) for key, value in next(batches).items()}
        loss = weighted_loss(model, batch, first_digits, args.first_digit_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step in args.evals:
            model.eval()
            row = {
                "step": step,
                "samples": step * args.batch_size,
                "loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
            }
            row.update(score(model, tokenizer, samples, args))
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(_row_line(row), flush=True)
            model.train()
    model.eval()
    return rows


def _row_line(row: dict[str, Any]) -> str:
    return (
        f"{row['step']:>6} {row['samples']:>8} {row['loss']:>7.3f} {row['parse']:>6.1%} "
        f"{row['click_in_box']:>13.1%} {row['blank_click_in_box']:>13.1%} {row['first_digit_accuracy']:>12.1%} "
        f"{row['other_digit_accuracy']:>12.1%} {row['seconds']:>8.0f}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    commit = run_record.git_commit()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.numbers == "digits":
        tokenizer, model = tiny_model(args.seed, args.init)
    else:
        tokenizer, model = whole_number_model(args.seed, args.init, smooth=args.numbers == "whole-smooth")
    model = start_language_model(model, args.lm_init, args.seed).float().to(args.device)
    samples = held_out(args)
    print(
        f"task {args.task}, init {args.init}, lm-init {args.lm_init}, batch {args.batch_size}, lr {args.lr}, {len(samples)} held-out samples"
    )
    print(
        f"{'step':>6} {'samples':>8} {'loss':>7} {'parse':>6} {'click-in-box':>13} {'blank image':>13} {'first digits':>12} {'other digits':>12} {'seconds':>8}"
    )
    rows = train(args, model, tokenizer, samples)
    report = {**run_record.header("readout", commit, args), "rows": rows}
    run_record.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
