"""Does the tiny CogAgent learn the GUI task, and does it learn it from the screenshot?

Trains the tiny preset (full fine-tuning, `cogagent_nb.train.grounding.train_tiny` on fresh synthetic
episodes) for a wall-time budget, then scores greedy answers on held-out episodes (seed `EVAL_SEED`,
which nothing in the course trains on) with `cogagent_nb.infer.metrics`, next to the baselines that
show what "learning from the screenshot" means (issue 10, "Proof that it teaches"):

  untrained        the same random model before training (greedy generation)
  most common box  the reference answer with its box replaced by the most frequent training box
  text-only guess  the reference answer with its box replaced by the mean training box of the same
                   platform and element label: everything the task text can give away
  blank image      the trained model, every screenshot replaced by a white one
  trained          the trained model on the real screenshots

Below the table, click-in-box per kind of target ("mail button", "files list_item", ...: which elements
the model finds, on the real and on blank screenshots). Prints both tables and writes JSON (`--json`).
Examples:
  python benchmarks/bench_learning.py --minutes 2 --eval-episodes 24           # a quick probe
  python benchmarks/bench_learning.py --minutes 10 --json runs/learning.json   # the recorded figure
  python benchmarks/bench_learning.py --device cuda --workers 14 --clock wall --minutes 5 \
      --batch-size 64 --json runs/learning-gpu.json                    # what 20x the data buys
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a clone without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import bench_readout, run_record  # noqa: E402
from cogagent_nb.train import grounding as g  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget, on --clock")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: the process's CPU time (what an idle machine would need), wall: wall time",
    )
    parser.add_argument(
        "--grounding-per-step",
        type=int,
        default=1,
        help='"click X" samples per training screen, beside the episode step itself',
    )
    parser.add_argument(
        "--grounding-first",
        type=float,
        default=0.0,
        help="fraction of the budget spent on grounding samples alone before the episodes",
    )
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps instead")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW; train_tiny's default)")
    parser.add_argument(
        "--vision-lr-scale",
        type=float,
        default=g.VISION_LR_SCALE,
        help="the vision tower's learning rate as a fraction of --lr (train_tiny's default; 1.0: one rate)",
    )
    parser.add_argument("--eval-episodes", type=int, default=96, help="held-out episodes (96 = about 456 samples)")
    parser.add_argument(
        "--untrained-episodes",
        type=int,
        default=None,
        help="held-out episodes for the untrained row (default: all; generation runs to the limit)",
    )
    parser.add_argument("--baseline-episodes", type=int, default=400, help="training episodes for the box baselines")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core CPU)")
    parser.add_argument(
        "--device", default=None, help="train and evaluate here, e.g. cuda (default: the CPU, as the course does)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes that render training episodes (for --device cuda; use --clock wall with it)",
    )
    parser.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    parser.add_argument(
        "--lm-init",
        choices=bench_readout.LM_INITS,
        default="preset",
        help="the language model's start, as in bench_readout.py --lm-init",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="tiny preset field (vision.KEY for the vision config), e.g. vision.scaling_factor=1",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if not args.vision_lr_scale >= 0:
        parser.error(f"--vision-lr-scale {args.vision_lr_scale}: expected 0 (tower frozen) or more (1: one rate)")
    return args


def _overrides(pairs: list[str]) -> dict:
    top, vision = {}, {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        target = vision if key.startswith("vision.") else top
        target[key.removeprefix("vision.")] = json.loads(value)
    return {"top": top, "vision": vision}


def build(args: argparse.Namespace):
    """The tokenizer and a random tiny model (preset plus `--override`s) written and loaded as a course user would."""
    import cogagent_nb as cnb
    from cogagent_nb.model.configuration import CogAgentConfig
    from cogagent_nb.model.loading import init_model

    with tempfile.TemporaryDirectory(prefix="bench_learning_") as directory:  # only its tokenizer is kept
        tokenizer, _ = cnb.load(cnb.make_tiny_model(Path(directory), seed=args.seed))
    changes = _overrides(args.override)
    vision = {"vision_config": changes["vision"]} if changes["vision"] else {}  # merged onto the tiny tower
    config = CogAgentConfig.from_preset("tiny", **{**_vocab(tokenizer), **changes["top"], **vision})
    model = bench_readout.start_language_model(init_model(config, seed=args.seed), args.lm_init, args.seed)
    return tokenizer, model.float(), changes


def _vocab(tokenizer) -> dict:
    from cogagent_nb.data.bpe import read_tokenizer_model
    from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE
    from cogagent_nb.model.configuration import vocabulary_fields

    return vocabulary_fields(len(read_tokenizer_model(TINY_TOKENIZER_FILE)))


def _samples(held_out: list[dict], episodes: int | None) -> int:
    """How many held-out samples the first `episodes` episodes hold (all when None)."""
    if episodes is None:
        return len(held_out)
    return len(list(g.episode_conversations(g.EVAL_SEED, 0, episodes)))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    commit = run_record.git_commit()  # the code this run imports, read before anything can change the tree
    torch.set_num_threads(args.threads)
    tokenizer, model, changes = build(args)
    if args.device:
        model.to(args.device)
    held_out = list(g.episode_conversations(g.EVAL_SEED, 0, args.eval_episodes))
    seen = list(g.episode_conversations(g.TRAIN_SEED, 10**6, args.baseline_episodes))
    references = [c["messages"][-1]["content"] for c in held_out]
    results: dict[str, dict] = {}

    started = time.perf_counter()
    results["untrained"], _ = g.model_rates(model, tokenizer, held_out[: _samples(held_out, args.untrained_episodes)])
    results.update(g.baseline_rates(held_out, seen))
    print(f"baselines in {time.perf_counter() - started:.0f} s", flush=True)

    log = g.train_tiny(
        model,
        tokenizer,
        minutes=args.minutes,
        max_steps=args.max_steps,
        clock=args.clock,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        vision_lr_scale=args.vision_lr_scale,
        grounding_per_step=args.grounding_per_step,
        grounding_first=args.grounding_first,
        workers=args.workers,
    )
    started = time.perf_counter()
    results["blank image"], blank_predictions = g.model_rates(model, tokenizer, held_out, blank_images=True)
    results["trained"], predictions = g.model_rates(model, tokenizer, held_out)
    by_target = {
        "trained": g.scores_by_target(predictions, held_out),
        "blank image": g.scores_by_target(blank_predictions, held_out),
    }
    print(f"evaluation in {time.perf_counter() - started:.0f} s", flush=True)
    print("\n" + g.format_report(results))
    print("\nclick-in-box by target\n" + g.format_targets(by_target))
    report = {
        **run_record.header("learning", commit, args),
        "threads": args.threads,
        "overrides": changes,
        "training": {
            "steps": log.steps,
            "samples": log.samples,
            "seconds": round(log.seconds, 1),
            "clock": args.clock,
            "wall_seconds": round(log.wall_seconds, 1),
            "final_loss": round(sum(log.losses[-20:]) / max(1, len(log.losses[-20:])), 4),
        },
        "eval_samples": len(held_out),
        "results": results,
        "by_target": by_target,
        "examples": [{"reference": r, "prediction": p} for r, p in list(zip(references, predictions))[:5]],
    }
    print(
        f"\ntrained {log.steps} steps / {log.samples} samples in {log.seconds:.0f} s {args.clock} "
        f"({log.wall_seconds:.0f} s wall); "
        f"final loss {report['training']['final_loss']}; {report['machine']}"
    )
    run_record.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
