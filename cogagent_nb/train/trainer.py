"""`CogAgentTrainer`: Seq2SeqTrainer with an explicit loss contract, generation-based GUI evaluation and
atomic checkpoints. Each override exists because the stock behaviour is wrong or missing here.

The loss contract. The model's `forward` takes `**kwargs`; transformers 5 reads that as "the model
handles `num_items_in_batch`" (Trainer.__init__, `model_accepts_loss_kwargs`), so it stops dividing the
loss by the gradient-accumulation steps and multiplies it by the process count, expecting the model to
divide a *sum* of token losses by the number of target tokens in the whole optimizer step. The model's
own loss is a per-batch mean and ignores `num_items_in_batch`, which would make gradients N times too
large with N accumulation steps. `compute_loss` below therefore computes the loss itself:

    loss = (sum of token cross-entropies in this micro-batch) / num_items_in_batch × world_size

where `num_items_in_batch` counts the target tokens of all micro-batches of the step on all processes
(the Trainer gathers it). DDP averages gradients over processes (the × world_size undoes that) and
accumulation adds them (no division needed), so every target token of the optimizer step weighs the
same: accumulation 2 × batch 1 = batch 2, and 2 processes × batch 1 = 1 process × batch 2
(tests/test_train_loss.py checks both). The token losses come from the model's own loss (mean over the
supervised positions, × their count = the sum): with labels, the model runs its output layer only at
supervised rows (`modeling.supervised_lm_loss`), so no (B, L, vocabulary) logits tensor is made at all
(151552 columns on the 9B; about 5% of positions are supervised).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Seq2SeqTrainer

from cogagent_nb.data.encoding import IGNORE_INDEX
from cogagent_nb.train import checkpoints


def supervised_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over labelled positions, number of them), fp32.

    logits (B, L, V) in the model dtype, labels (B, L) aligned with the inputs (shifted here by one).
    """
    targets = labels[:, 1:].to(logits.device)  # (B, L-1)
    keep = targets != IGNORE_INDEX  # (B, L-1)
    picked = logits[:, :-1][keep].float()  # (N, V): only the supervised rows become fp32
    total = F.cross_entropy(picked, targets[keep], reduction="sum")
    return total, int(keep.sum())


def expand_labels(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels aligned with the spliced sequence (the image triple becomes num_image_tokens + 2 positions)."""
    from cogagent_nb.model.modeling import splice_image

    labels = inputs["labels"]
    if inputs.get("images") is None:
        return labels
    config = _base_model(model).config
    return splice_image(
        inputs["input_ids"],
        num_image_tokens=config.num_image_tokens,
        boi_token_id=config.boi_token_id,
        eoi_token_id=config.eoi_token_id,
        labels=labels,
    ).labels


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DDP / DeepSpeed wrappers
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class CogAgentTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer for CogAgent. `references`: the val split's answers, indexed by the eval labels."""

    # compute_loss already normalises over the whole optimizer step (see the module docstring).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        references: dict[str, list[str]] | None = None,
        eval_collator: Any = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator  # left-padded prompts for generation (None: the training collator)
        # Make the Trainer count target tokens over the step (and gather the count across processes)
        # whatever the model's signature says: compute_loss below is what consumes the count.
        self.model_accepts_loss_kwargs = True
        self.references = references or {}
        self.step_losses: list[tuple[int, float]] = []  # (global step, loss) as logged, for curves and tests

    # --- batches of similar length ---------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        """`train_sampling_strategy: group_by_length` with lengths read from the text, not from encoded items.

        The Trainer's own `LengthGroupedSampler` would encode every sample (screenshots included) to learn its
        length. Every sample carries exactly one image, so the text length orders samples as their spliced
        length does; `ConversationDataset.text_lengths` counts it without opening an image. Batches of similar
        length waste less compute on padding (docs/BENCHMARKS.md, "batch 4, mixed lengths").
        """
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(self.args, "train_sampling_strategy", None) == "group_by_length" and hasattr(
            dataset, "text_lengths"
        ):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            group = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(group, lengths=dataset.text_lengths())
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        """Evaluation keeps the file's order under length grouping (answers are matched to references by index)."""
        if getattr(self.args, "train_sampling_strategy", None) == "group_by_length":
            return torch.utils.data.SequentialSampler(eval_dataset)
        return super()._get_eval_sampler(eval_dataset)

    # --- loss ------------------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Sum of token losses / target tokens of the optimizer step (× processes, undoing DDP's mean).

        Without `num_items_in_batch` (evaluation loss) it is the mean over this batch's target tokens.
        """
        count = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())  # = the spliced count: image rows are unlabelled
        if count == 0:
            raise ValueError("a training batch has no supervised token (every label is -100): check the encoder")
        outputs = model(**inputs, use_cache=False)  # with labels: the head runs at supervised rows only
        total = outputs.loss * count  # the model's loss is the mean over exactly these `count` tokens
        if num_items_in_batch is None:
            loss = total / max(count, 1)
        else:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            self.step_losses.append((self.state.global_step, float(logs["loss"])))
        super().log(logs, start_time)

    # --- evaluation by generation ----------------------------------------------------------------------------
    def get_eval_dataloader(self, eval_dataset=None):
        with self._collating_for_generation():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._collating_for_generation():
            return super().get_test_dataloader(test_dataset)

    @contextlib.contextmanager
    def _collating_for_generation(self):
        """Evaluation and prediction batches use the prompt collator (left padding, indices as labels)."""
        training_collator = self.data_collator
        if self.eval_collator is not None:
            self.data_collator = self.eval_collator
        try:
            yield
        finally:
            self.data_collator = training_collator

    # --- ----------------------------------------------------------------------------
    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
        **gen_kwargs: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Generate from left-padded prompts and return only the new tokens (the prompt is cut off, as
        the official finetune's prediction_step does); labels are the samples' indices."""
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        indices = inputs.pop("labels")
        generation_config = gen_kwargs.pop("generation_config", None) or self.model.generation_config
        # ZeRO-3 / FSDP gather each layer's weights from every process: all must keep stepping until the
        # longest answer is done (what Seq2SeqTrainer.prediction_step does too).
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
        from transformers.integrations.fsdp import is_fsdp_managed_module

        gen_kwargs.setdefault("synced_gpus", is_deepspeed_zero3_enabled() or is_fsdp_managed_module(self.model))
        with torch.no_grad():
            generated = self.accelerator.unwrap_model(model).generate(
                **inputs, generation_config=generation_config, **gen_kwargs
            )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]  # (B, T)
        return None, new_tokens, indices

    def decode_predictions(self, token_ids: np.ndarray) -> list[str]:
        """Generated ids (padded with -100 by the evaluation loop) -> answer texts, cut at the first stop id."""
        tokenizer = self.processing_class
        stops = set(_as_list(self.model.generation_config.eos_token_id)) | {tokenizer.pad_token_id, IGNORE_INDEX}
        texts = []
        for row in np.asarray(token_ids).tolist():
            kept = []
            for token in row:
                if token in stops:
                    break
                kept.append(token)
            texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
        return texts

    # --- atomic checkpoints ----------------------------------------------------------------------------------
    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """The stock save, written into a staging folder and published with one rename (see checkpoints.py)."""
        step = self.state.global_step
        run_dir = Path(self._get_output_dir(trial=trial))
        staging_root = run_dir / f"{checkpoints.STAGING_PREFIX}{step}"
        final = run_dir / f"{checkpoints.PREFIX}{step}"
        limit = self.args.save_total_limit
        self._get_output_dir = lambda trial=None: str(staging_root)  # the stock save writes staging/checkpoint-N
        self.args.save_total_limit = None  # rotation happens after publishing, in run_dir
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir  # the class's method again
            self.args.save_total_limit = limit
        checkpoints.fault_injection("save", step)
        self.accelerator.wait_for_everyone()
        self._unstage_best_checkpoint(staging_root, run_dir)
        if self.args.should_save:
            checkpoints.publish(staging_root / final.name, final)
            os.rmdir(staging_root)
            self._rotate(run_dir)
        self.accelerator.wait_for_everyone()

    def _unstage_best_checkpoint(self, staging_root: Path, run_dir: Path) -> None:
        """The stock save records the best checkpoint (`metric_for_best_model`) under the staging folder it
        wrote to; point it at the published folder, in memory and in the staged `trainer_state.json`, so a
        resumed run still knows which checkpoint `_rotate` must keep."""
        best = self.state.best_model_checkpoint
        if not best or str(staging_root) not in best:
            return
        self.state.best_model_checkpoint = best.replace(str(staging_root), str(run_dir))
        state_file = staging_root / f"{checkpoints.PREFIX}{self.state.global_step}" / "trainer_state.json"
        if self.args.should_save and state_file.is_file():
            saved = json.loads(state_file.read_text(encoding="utf-8"))
            saved["best_model_checkpoint"] = self.state.best_model_checkpoint
            state_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def _rotate(self, run_dir: Path) -> None:
        """Delete the oldest complete checkpoints beyond save_total_limit (never the best one)."""
        limit = self.args.save_total_limit
        if not limit:
            return
        found = checkpoints.list_checkpoints(run_dir)
        best = self.state.best_model_checkpoint
        removable = [path for _, path in found if str(path) != best]
        for path in removable[: max(len(found) - limit, 0)]:
            shutil.rmtree(path, ignore_errors=True)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def compute_gui_metrics(trainer: CogAgentTrainer, split: str):
    """A `compute_metrics` function for `split`: decode the generated answers and score them with
    `cogagent_nb.infer.metrics.gui_metrics` (parse rate, action type, click-in-box, typed text)."""
    from cogagent_nb.infer.metrics import gui_metrics

    def compute(prediction) -> dict[str, float]:
        predictions = trainer.decode_predictions(prediction.predictions)
        indices = np.asarray(prediction.label_ids).reshape(-1).tolist()
        # Several processes pad the last batch by repeating samples; each sample index counts once.
        first = {index: row for row, index in reversed(list(enumerate(indices)))}
        references = [trainer.references[split][i] for i in first]
        metrics = gui_metrics([predictions[row] for row in first.values()], references)
        return {k: (float(v) if v is not None else float("nan")) for k, v in metrics.items()}

    return compute
