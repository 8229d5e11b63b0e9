"""`finetune(DATA_DIR, MODEL_DIR, CONFIG, RESUME)`: the official fine-tuning command, as a function.

The order of work is chosen so that mistakes cost seconds, not a model load:

1. read and check the config, print it resolved (config.py);
2. validate the data files (the validator's FILE:LINE: field: message lines stop the run);
3. resolve RESUME against output_dir (a missing checkpoint lists the existing ones);
4. load the model in the config's dtype, add LoRA / prefix tuning, apply freezeV, print what trains;
5. train with CogAgentTrainer (explicit loss contract, atomic checkpoints), evaluating by generation
   with the GUI metrics when predict_with_generate is on;
6. predict test_file once, save the loss curve, print a one-line summary.

What differs from THUDM/CogAgent `finetune/finetune.py` (docs/TRAINING.md has the full list): RESUME=no
trains from scratch (the official script trains nothing), gradient checkpointing is whatever the config
says (the official script switches it on only when resuming), max_input_length counts text only and never
cuts the image, the loss masks the role token and supervises the end-of-turn token (lesson 02), and
evaluation reports GUI metrics instead of ROUGE/BLEU.

`build_training_args` is the one place where `Seq2SeqTrainingArguments` are made; distributed and
DeepSpeed set-up hook in there.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cogagent_nb.train.config import FinetuneConfig, format_config, load_config


@dataclasses.dataclass
class FinetuneResult:
    """What a run produced: where, how long, how well."""

    output_dir: Path
    checkpoint: Path | None  # the last checkpoint written (adapter or full model, + optimizer state)
    steps: int  # the last optimizer step (global step)
    first_step: int  # the step this run started after (0, or the resumed checkpoint's step)
    seconds: float
    final_loss: float | None
    losses: list[tuple[int, float]]  # (step, training loss) at every logging step
    eval_metrics: dict[str, float]
    test_metrics: dict[str, float]
    peft_type: str | None
    peak_memory_gib: float | None = None  # the accelerator's peak allocated memory (torch.cuda), None on CPU

    def summary(self) -> str:
        ran = self.steps - self.first_step
        per_step = self.seconds / max(ran, 1)
        loss = "n/a" if self.final_loss is None else f"{self.final_loss:.4f}"
        what = {"LORA": "LoRA adapter", "PREFIX_TUNING": "prefix-tuning adapter"}.get(self.peft_type, "full model")
        if self.checkpoint:
            saved = f"{what} saved to {self.checkpoint}"
        else:
            saved = "nothing saved (no step ran)" if ran == 0 else "nothing saved (save_strategy: no)"
        steps = f"{ran} steps" if not self.first_step else f"{ran} steps ({self.first_step + 1}-{self.steps})"
        memory = "" if self.peak_memory_gib is None else f", peak {self.peak_memory_gib:.2f} GiB allocated"
        timing = f"{self.seconds:.1f} s ({per_step:.2f} s/step{memory})"
        return f"finetune: {steps} in {timing}, final loss {loss}; {saved}"


def _peak_memory_gib() -> float | None:
    """This process' peak allocated CUDA memory (what an out-of-memory error would be about), or None."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(*lines: object) -> None:
    if is_main_process():
        for line in lines:
            print(line, flush=True)


# --- the seam: training arguments ---------------------------------------------------------------------------
def build_training_args(config: FinetuneConfig, *, generation_defaults: Any = None):
    """`Seq2SeqTrainingArguments` from the config's training_args, plus what this package needs.

    Added when the file does not say otherwise: remove_unused_columns=False (the model takes images and
    position_ids), report_to tensorboard only if installed, logging/saving never "disabled" silently.
    `generation_config` (a dict in the file) is merged over `generation_defaults` (the model's own
    generation_config: stop ids, pad id), because a bare GenerationConfig would lose the stop tokens.
    """
    from transformers import GenerationConfig, Seq2SeqTrainingArguments

    from cogagent_nb.train.callbacks import tensorboard_available
    from cogagent_nb.train.distributed import prepare_distributed

    kwargs = dict(config.training_args)
    kwargs.setdefault("output_dir", "./output")
    kwargs.setdefault("remove_unused_columns", False)
    kwargs.setdefault("report_to", ["tensorboard"] if tensorboard_available() else "none")
    kwargs.setdefault("disable_tqdm", True)  # callbacks.ProgressCallback draws the bar
    kwargs.setdefault("ddp_find_unused_parameters", False)  # every trainable parameter is used in each forward
    generation = kwargs.get("generation_config")
    if isinstance(generation, dict) or generation_defaults is not None:
        base = generation_defaults.to_dict() if generation_defaults is not None else {}
        merged = {**base, **(generation or {})}
        merged.pop("transformers_version", None)
        kwargs["generation_config"] = GenerationConfig(**merged)
    deepspeed = kwargs.get("deepspeed")
    if isinstance(deepspeed, str):
        kwargs["deepspeed"] = str(resolve_relative(deepspeed, config.source))
    kwargs = prepare_distributed(kwargs)  # process env, CPU DeepSpeed state, JIT cache (train/distributed.py)
    return Seq2SeqTrainingArguments(**kwargs)


def resolve_relative(path: str, config_source: str) -> Path:
    """A path from the config: as given (relative to the working directory, like the official script),
    else relative to the config file's folder or its parent (so configs/ds_zero_3.json works from anywhere)."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    source = Path(config_source)
    for base in (source.parent, source.parent.parent):
        if (base / candidate).exists():
            return base / candidate
    return candidate


# --- model ---------------------------------------------------------------------------------------------------
def model_dtype(config: FinetuneConfig):
    """The dtype to load the weights in: "auto" = bfloat16 on a GPU (official), the checkpoint's own on CPU."""
    import torch

    if config.dtype != "auto":
        return config.dtype
    on_gpu = torch.cuda.is_available() and not config.training_args.get("use_cpu", False)
    return torch.bfloat16 if on_gpu else None


def build_model(model_dir: str | os.PathLike, config: FinetuneConfig, *, echo: bool = True):
    """Load (tokenizer, model), add the config's PEFT method, apply freezeV; print trainable parameters."""
    from cogagent_nb.model.loading import load
    from cogagent_nb.model.peft_recipes import freeze_vision_tower, quiet_peft_deprecations, trainable_parameters_table

    tokenizer, model = load(model_dir, dtype=model_dtype(config))
    model.config.use_cache = False  # training never reuses a KV cache (official finetune.py does the same)
    if config.peft_config is not None:
        from peft import get_peft_model

        with quiet_peft_deprecations():
            model = get_peft_model(model, peft_config_for(model, config))
    if config.freezeV:
        freeze_vision_tower(model)
    if echo:
        _say(f"parameters (freezeV={config.freezeV}, peft={config.peft_type or 'none: full fine-tuning'}):")
        _say(trainable_parameters_table(model))
    return tokenizer, model


def peft_config_for(model: Any, config: FinetuneConfig):
    """The PEFT config object for the file's peft_config, with this project's lora_scope applied."""
    from cogagent_nb.model.peft_recipes import language_only_regex, prefix_tuning_config

    fields = {k: v for k, v in config.peft_config.items() if k != "peft_type"}
    fields.setdefault("task_type", "CAUSAL_LM")
    if config.peft_type == "LORA":
        from peft import LoraConfig

        if config.lora_scope == "language":
            names = fields.get("target_modules") or ["query_key_value"]
            fields["target_modules"] = language_only_regex([names] if isinstance(names, str) else names)
        return LoraConfig(**fields)
    shaped = prefix_tuning_config(
        model.config,
        fields.pop("num_virtual_tokens", 16),
        prefix_projection=fields.pop("prefix_projection", False),
        encoder_hidden_size=fields.pop("encoder_hidden_size", None),
    )
    for key, value in fields.items():  # e.g. inference_mode; the KV shape stays the model's
        if key not in ("num_layers", "token_dim", "num_attention_heads", "task_type"):
            setattr(shaped, key, value)
    return shaped


# --- the run -------------------------------------------------------------------------------------------------
def finetune(
    data_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    config: str | os.PathLike | FinetuneConfig,
    resume: str | int | None = None,
    *,
    overrides: Sequence[str] = (),
    callbacks: Sequence[Any] = (),
) -> FinetuneResult:
    """Fine-tune `model_dir` on `data_dir` with `config` (a YAML path or a loaded FinetuneConfig).

    resume: "yes" (newest complete checkpoint in output_dir), a step number, or "no"/None (from scratch).
    overrides: "training_args.max_steps=2" style edits applied to the file before it is checked.
    callbacks: extra TrainerCallbacks (e.g. `LiveLossPlot()` in a notebook).
    """
    from transformers import set_seed

    from cogagent_nb.train.checkpoints import check_resume_matches, resolve_resume, restore_replaced
    from cogagent_nb.train.data import check_data, split_files

    if not isinstance(config, FinetuneConfig):
        config = load_config(config, overrides)
    _say(format_config(config))
    files = split_files(data_dir, config.data_config)
    if "val" in files and config.training_args.get("eval_strategy", "no") == "no":
        del files["val"]  # read only when evaluating; a learner's own data often has no dev split
    check_data(files, echo=is_main_process())
    output_dir = Path(config.training_args.get("output_dir", "./output"))
    restore_replaced(output_dir)  # a re-save killed between its two renames left checkpoint-N.old: N again
    checkpoint = resolve_resume(resume, output_dir)
    if checkpoint is not None:
        check_resume_matches(checkpoint, config.peft_type, config.source)
        _say(f"resuming from {checkpoint}")
    else:
        _warn_about_earlier_checkpoints(output_dir)

    set_seed(int(config.training_args.get("seed", 42)))  # the adapters' random init depends on it
    tokenizer, model = build_model(model_dir, config)
    args = build_training_args(config, generation_defaults=getattr(model, "generation_config", None))
    datasets = build_datasets(files, tokenizer, config, model.config.num_image_tokens, args.predict_with_generate)
    trainer = build_trainer(model, tokenizer, args, datasets, callbacks)

    first_step = int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started
    test_metrics: dict[str, float] = {}
    if "test" in datasets and args.predict_with_generate:
        from cogagent_nb.train.trainer import compute_gui_metrics

        trainer.compute_metrics = compute_gui_metrics(trainer, "test")
        test_metrics = trainer.predict(datasets["test"], metric_key_prefix="test").metrics
        _say(f"test ({files['test'].name}): {_short(test_metrics)}")
    result = FinetuneResult(
        output_dir=Path(args.output_dir),
        checkpoint=_last_checkpoint(Path(args.output_dir), first_step, trainer.state.global_step),
        steps=trainer.state.global_step,
        first_step=first_step,
        seconds=seconds,
        final_loss=trainer.step_losses[-1][1] if trainer.step_losses else None,
        losses=list(trainer.step_losses),
        eval_metrics=_last_eval(trainer.state.log_history),
        test_metrics=test_metrics,
        peft_type=config.peft_type,
        peak_memory_gib=_peak_memory_gib(),
    )
    _say(result.summary())
    return result


def build_datasets(
    files: dict[str, Path], tokenizer: Any, config: FinetuneConfig, num_image_tokens: int, generate: bool
) -> dict[str, Any]:
    """The train split as training samples; val/test as prompts to generate from (predict_with_generate)
    or, without generation, as training samples to compute an evaluation loss on."""
    from cogagent_nb.train.data import PromptDataset, train_dataset

    datasets: dict[str, Any] = {"train": train_dataset(files["train"], tokenizer, config, num_image_tokens)}
    for split in ("val", "test"):
        if split in files:
            make = PromptDataset if generate else train_dataset
            datasets[split] = make(files[split], tokenizer, config, num_image_tokens)
    if is_main_process():  # a cut prompt or answer changes the loss without a word: count them once, say so
        for dataset in datasets.values():
            cut = dataset.truncation_summary() if hasattr(dataset, "truncation_summary") else None
            if cut:
                _say(f"warning: {cut}")
    return datasets


def build_trainer(model: Any, tokenizer: Any, args: Any, datasets: dict[str, Any], callbacks: Sequence[Any] = ()):
    """CogAgentTrainer with this package's collators, GUI metrics, progress bar, loss curve and final save."""
    from cogagent_nb.train import callbacks as cb
    from cogagent_nb.train.checkpoints import remove_stale_staging
    from cogagent_nb.train.data import PromptCollator, training_collator
    from cogagent_nb.train.trainer import CogAgentTrainer, compute_gui_metrics

    evaluating = args.eval_strategy != "no" and "val" in datasets
    trainer = CogAgentTrainer(
        model=model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("val") if evaluating else None,
        data_collator=training_collator(tokenizer),
        eval_collator=PromptCollator(tokenizer) if args.predict_with_generate else None,
        processing_class=tokenizer,
        callbacks=[cb.LossCurveCallback(), cb.SaveAtEndCallback(), *callbacks],
        references={s: getattr(d, "references", []) for s, d in datasets.items() if s != "train"},
    )
    _use_our_progress_bar(trainer)
    if args.predict_with_generate:
        trainer.compute_metrics = compute_gui_metrics(trainer, "val")
    if trainer.is_world_process_zero():
        remove_stale_staging(args.output_dir)
    return trainer


def _warn_about_earlier_checkpoints(output_dir: Path) -> None:
    """A fresh run into a folder that holds another run's checkpoints replaces those of the steps it reaches
    and leaves the rest, which a later RESUME=yes would take for this run's: say so before training."""
    from cogagent_nb.train.checkpoints import list_checkpoints

    found = list_checkpoints(output_dir) if output_dir.is_dir() else []
    if found and is_main_process():
        names = ", ".join(path.name for _, path in found)
        print(
            f"warning: {output_dir} holds {names} of an earlier run; this run starts from scratch (RESUME is not "
            "yes), replaces the checkpoints of the steps it reaches and leaves the others, which RESUME=yes would "
            "later resume from. Choose a new output_dir to keep the runs apart.",
            file=sys.stderr,
        )


def _last_checkpoint(output_dir: Path, first_step: int, last_step: int) -> Path | None:
    """The newest complete checkpoint this run wrote (steps first_step+1 .. last_step); None if it saved none.
    Checkpoints of other runs in the same folder (later steps, or before a resume) are not this run's."""
    from cogagent_nb.train.checkpoints import list_checkpoints

    mine = [path for step, path in list_checkpoints(output_dir) if first_step < step <= last_step]
    return mine[-1] if mine else None


def _use_our_progress_bar(trainer: Any) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from cogagent_nb.train.callbacks import ProgressCallback as Bar

    for stock in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(stock)
    trainer.add_callback(Bar())


def _last_eval(log_history: list[dict[str, Any]]) -> dict[str, float]:
    evals = [e for e in log_history if any(k.startswith("eval_") for k in e)]
    return dict(evals[-1]) if evals else {}


def _short(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


# --- command line ---------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    """The official positional arguments, plus --set for overrides."""
    parser.add_argument("data_dir", type=Path, help="dataset folder (data_config's files are relative to it)")
    parser.add_argument("model_dir", type=Path, help="official-format model folder (config.json, safetensors)")
    parser.add_argument("config_file", type=Path, help="YAML config, e.g. configs/lora.yaml")
    parser.add_argument(
        "auto_resume_from_checkpoint",
        nargs="?",
        default="",
        help="yes = newest complete checkpoint in output_dir, N = checkpoint-N, no/absent = from scratch",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set training_args.max_steps=2 (repeatable; VALUE is YAML)",
    )


def run_from_args(args) -> int:
    """Run `finetune` from parsed arguments; a config, data, model-folder or resume mistake prints one
    message, exit 2.

    Every such message starts with `error: ` (what `LaunchResult.first_error` finds in a launcher's log).
    """
    import sys

    from cogagent_nb.data.encoding import EncodingError
    from cogagent_nb.model.loading import CheckpointError
    from cogagent_nb.train.checkpoints import ResumeError
    from cogagent_nb.train.config import ConfigError
    from cogagent_nb.train.data import DataCheckError
    from cogagent_nb.train.distributed import finish_distributed

    try:
        finetune(
            args.data_dir, args.model_dir, args.config_file, args.auto_resume_from_checkpoint, overrides=args.overrides
        )
    except DataCheckError as err:  # the validator's lines, as `cogagent-nb validate` prints them
        print(f"error: {args.data_dir}: the data failed its check:\n{err}", file=sys.stderr)
        return 2
    except (ConfigError, ResumeError, CheckpointError, EncodingError) as err:  # model folder, prompt budget
        print(f"error: {err}", file=sys.stderr)
        return 2
    finish_distributed()  # this process ends here: every rank waits for the others, then closes its group
    return 0


def main(argv: Sequence[str] | None = None, *, prog: str = "finetune.py") -> int:
    import argparse
    import sys

    from cogagent_nb.train.distributed import consume_local_rank_argument

    parser = argparse.ArgumentParser(prog=prog, description="Fine-tune CogAgent (official command line).")
    add_arguments(parser)
    argv = consume_local_rank_argument(sys.argv[1:] if argv is None else argv)  # the deepspeed launcher's
    # intermixed: `finetune.py DATA MODEL CONFIG --set k=v yes` works too (RESUME after the options)
    return run_from_args(parser.parse_intermixed_args(argv))
