"""The loss contract under the Trainer: every target token of an optimizer step weighs the same, however the
step is split into micro-batches (gradient accumulation) or processes (DDP over gloo).

Two training samples with different numbers of target tokens make the cases distinguishable: a per-micro-
batch mean would weigh their tokens differently, and the transformers-5 trap (model takes **kwargs, loss
ignores num_items_in_batch) would double the gradient. Plain SGD without clipping keeps the update
proportional to the gradient (Adam's first step is scale-free and would hide a factor of 2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

LR = 0.5
SGD_ONE_STEP = [
    "training_args.max_steps=1",
    "training_args.optim=sgd",
    f"training_args.learning_rate={LR}",
    "training_args.lr_scheduler_type=constant",
    "training_args.warmup_steps=0",
    "training_args.max_grad_norm=0",
    "training_args.save_steps=1",
    "data_config.test_file=null",
]


@pytest.fixture(scope="module")
def two_samples(tiny_train_data, tmp_path_factory) -> Path:
    """A dataset of exactly two training conversations (so a batch of 2 is the whole epoch)."""
    out = tmp_path_factory.mktemp("two-samples")
    lines = (tiny_train_data / "train.jsonl").read_text(encoding="utf-8").splitlines()[:2]
    (out / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copy(tiny_train_data / "dev.jsonl", out / "dev.jsonl")
    shutil.copytree(tiny_train_data / "images", out / "images")
    return out


def _weights_after_one_step(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "checkpoint-1" / "model.safetensors"))


def _reference_update(model_dir: Path, data_dir: Path, repo_root: Path) -> dict[str, torch.Tensor]:
    """W - lr * grad of (sum of token losses of both samples / their target count), computed by hand."""
    from cogagent_nb.train.config import load_config
    from cogagent_nb.train.data import train_dataset, training_collator
    from cogagent_nb.train.finetune import build_model
    from cogagent_nb.train.trainer import expand_labels, supervised_token_losses

    config = load_config(repo_root / "configs" / "tiny_sft.yaml")
    tokenizer, model = build_model(model_dir, config, echo=False)
    dataset = train_dataset(data_dir / "train.jsonl", tokenizer, config, model.config.num_image_tokens)
    samples = [dataset[0], dataset[1]]
    assert samples[0].num_supervised != samples[1].num_supervised, "the test needs unequal target counts"
    batch = training_collator(tokenizer)(samples)
    model.train()
    labels = expand_labels(model, batch)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    total, count = supervised_token_losses(logits, labels)
    (total / count).backward()
    with torch.no_grad():
        return {n: (p - LR * p.grad) if p.grad is not None else p.clone() for n, p in model.named_parameters()}


def _assert_same_update(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], label: str) -> None:
    moved = 0
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, rtol=1e-5, atol=1e-6), f"{label}: {name} differs"
        moved += 1
    assert moved > 10


@pytest.fixture(scope="module")
def reference(tiny_model_dir, two_samples, repo_root) -> dict[str, torch.Tensor]:
    return _reference_update(tiny_model_dir, two_samples, repo_root)


def test_accumulation_of_two_equals_one_batch_of_two(tiny_model_dir, two_samples, repo_root, reference, tmp_path):
    from cogagent_nb.train.finetune import finetune

    config = repo_root / "configs" / "tiny_sft.yaml"
    runs = {"batch 2": ("2", "1"), "batch 1 x accumulation 2": ("1", "2")}
    for label, (batch, accumulation) in runs.items():
        out = tmp_path / label.replace(" ", "_")
        finetune(
            two_samples,
            tiny_model_dir,
            config,
            overrides=[
                *SGD_ONE_STEP,
                f"training_args.output_dir={out}",
                f"training_args.per_device_train_batch_size={batch}",
                f"training_args.gradient_accumulation_steps={accumulation}",
            ],
        )
        _assert_same_update(_weights_after_one_step(out), reference, label)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_twice_the_batch(
    tiny_model_dir, two_samples, repo_root, reference, tmp_path
):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nnodes=1", "--nproc_per_node=2", "finetune.py"]
    command += [str(two_samples), str(tiny_model_dir), "configs/tiny_sft.yaml"]
    for override in [*SGD_ONE_STEP, f"training_args.output_dir={out}", "training_args.per_device_train_batch_size=1"]:
        command += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finetune: 1 steps" in done.stdout
    _assert_same_update(_weights_after_one_step(out), reference, "2 processes x batch 1")
