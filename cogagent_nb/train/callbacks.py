"""What a person watching a run sees: a progress bar with loss, learning rate and ETA, a loss curve next to
the checkpoints, and (in a notebook) the same curve redrawn live.

All of it runs on the main process only (`state.is_world_process_zero`), so a 2-process run prints one
bar and writes one PNG. TensorBoard logging is the Trainer's own (`report_to`), switched on by
`finetune` only when the `tensorboard` package is installed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

LOSS_CURVE_PNG = "loss_curve.png"
LOSS_HISTORY_JSON = "loss_history.json"


def loss_points(log_history: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, losses) of the training-loss entries of a Trainer log history."""
    entries = [e for e in log_history if "loss" in e and "step" in e]
    return [int(e["step"]) for e in entries], [float(e["loss"]) for e in entries]


def save_loss_curve(log_history: list[dict[str, Any]], output_dir: str | Path) -> Path | None:
    """Write loss_curve.png and loss_history.json (every logged entry, exact floats) into output_dir."""
    steps, losses = loss_points(log_history)
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / LOSS_HISTORY_JSON).write_text(json.dumps(log_history, indent=1) + "\n", encoding="utf-8")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over target tokens)")
    ax.set_title(output_dir.name)
    ax.grid(alpha=0.3)
    path = output_dir / LOSS_CURVE_PNG
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class ProgressCallback(TrainerCallback):
    """One tqdm bar over optimizer steps whose postfix shows the last logged loss and learning rate.

    Replaces transformers' ProgressCallback, whose bar shows neither and which prints each log dict.
    Evaluation results are printed as one line.
    """

    def __init__(self) -> None:
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', math.nan):.2e}")
        elif any(k.startswith("eval_") for k in logs):
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in logs.items()}
            self.bar.write(f"step {state.global_step}: {shown}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LossCurveCallback(TrainerCallback):
    """Rewrite output_dir/loss_curve.png (and loss_history.json) at every save and at the end."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            save_loss_curve(state.log_history, args.output_dir)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            save_loss_curve(state.log_history, args.output_dir)


class SaveAtEndCallback(TrainerCallback):
    """Log the loss and save a checkpoint at the last step, so every run ends with a final loss and a usable
    (and resumable) result.

    The official script saves only every save_steps; a run of 3000 steps with save_steps 500 ends
    saved, but max_steps 2 (a smoke test) would otherwise leave nothing and log no loss.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = args.logging_strategy != "no"
            control.should_save = args.save_strategy != "no"
        return control


class LiveLossPlot(TrainerCallback):
    """Redraw the loss curve in the notebook after each log (main process; needs IPython)."""

    def __init__(self, title: str = "training loss", every: int = 1) -> None:
        self.title = title
        self.every = every
        self.handle = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        steps, losses = loss_points(state.log_history)
        if len(steps) % self.every:
            return
        import matplotlib.pyplot as plt
        from IPython.display import display

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(steps, losses, marker=".")
        ax.set_xlim(0, max(state.max_steps, 1))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(f"{self.title}: step {state.global_step}/{state.max_steps}, loss {losses[-1]:.3f}")
        ax.grid(alpha=0.3)
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)
        plt.close(fig)


def tensorboard_available() -> bool:
    """True when the `tensorboard` package (what the Trainer's TensorBoard logger needs) is installed."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


class StopAfterSteps(TrainerCallback):
    """Stop training after `steps` optimizer steps, as an interrupted run would (lesson 06, resume tests).

    Unlike lowering max_steps, the learning-rate schedule stays the one of the full run, so resuming
    continues exactly where an uninterrupted run would be. Put a save at that step (save_steps) to
    resume from it.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True
        return control
