"""Looking at a model before and after fine-tuning: parameter charts, loss curves side by side, the answer
to a test screen, and the loss on answers the model never trained on (lessons 03 and 06)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def plot_parameter_tables(tables: Mapping[str, Any], *, ax: Any = None):
    """Grouped horizontal bars: trainable parameters per part of the model, one bar per setup.

    `tables` maps a setup's name ("LoRA, both towers", "full, freezeV") to its
    `cnb.trainable_parameters_table(model)`. A log scale shows 10 thousand adapters next to 800 thousand
    weights (on the 9B: 20 million next to 13 billion).
    """
    import matplotlib.pyplot as plt

    parts = list(dict.fromkeys(part for table in tables.values() for part, _, _ in table.rows))
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.45 * len(parts) * max(len(tables), 2) / 2 + 1))
    height = 0.8 / max(len(tables), 1)
    for i, (name, table) in enumerate(tables.items()):
        trainable = {part: t for part, t, _ in table.rows}
        values = [max(trainable.get(part, 0), 0.8) for part in parts]  # 0 drawn as a stub on the log axis
        ax.barh([p + i * height for p in range(len(parts))], values, height=height, label=name)
    ax.set_yticks([p + 0.4 - height / 2 for p in range(len(parts))], parts)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale; a stub = frozen)")
    ax.legend(fontsize=8, loc="lower right")
    ax.figure.tight_layout()
    return ax


def plot_loss_curves(curves: Mapping[str, Sequence[tuple[int, float]]], *, ax: Any = None):
    """Several (step, loss) series on one axis; later series are dashed so overlaps stay visible."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    styles = ["-", "--", ":", "-."]
    for i, (name, points) in enumerate(curves.items()):
        steps, losses = zip(*points) if points else ((), ())
        ax.plot(steps, losses, styles[i % len(styles)], marker="o" if i == 0 else "x", label=name, alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.figure.tight_layout()
    return ax


def preview_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    jsonl: str | Path,
    indices: Sequence[int] = (0,),
    *,
    max_new_tokens: int = 48,
    config: Any = None,
) -> list[dict[str, str]]:
    """Greedy answers of `model` to samples `indices` of a JSONL split, next to the reference answers.

    The prompt is encoded exactly as in training and evaluation (train.data.PromptDataset: the sample up
    to its last <|assistant|>), batched with left padding.
    """
    from cogagent_nb.train.data import PromptCollator, PromptDataset

    dataset = PromptDataset(Path(jsonl), tokenizer, config or _NoBudgets(), model.config.num_image_tokens)
    batch = PromptCollator(tokenizer)([dataset[i] for i in indices])
    batch.pop("labels")
    stops = _stop_ids(model)
    model.eval()
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    new = generated[:, batch["input_ids"].shape[1] :].tolist()  # (B, T)
    rows = []
    for index, tokens in zip(indices, new):
        cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
        answer = tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()
        rows.append({"sample": str(index), "model": answer, "reference": dataset.references[index]})
    return rows


def mean_answer_loss(model: torch.nn.Module, tokenizer: Any, jsonl: str | Path, *, config: Any = None) -> float:
    """Mean cross-entropy per target token of the split's answers (teacher forcing, no generation).

    On the test split this is the held-out loss: it falls when fine-tuning taught the model something
    that carries over to screens it never trained on, long before its greedy answers become right.
    """
    from cogagent_nb.data.encoding import ConversationDataset
    from cogagent_nb.train.data import training_collator
    from cogagent_nb.train.trainer import expand_labels, supervised_token_losses

    budgets = {} if config is None else _budgets(config)
    dataset = ConversationDataset(Path(jsonl), tokenizer, model.config.num_image_tokens, **budgets)
    collate = training_collator(tokenizer)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), 4):
            batch = collate([dataset[i] for i in range(start, min(start + 4, len(dataset)))])
            labels = expand_labels(model, batch)
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            batch_total, batch_count = supervised_token_losses(logits, labels)
            total, count = total + float(batch_total), count + batch_count
    return total / max(count, 1)


class _NoBudgets:
    max_input_length = None
    max_output_length = None
    max_model_length = None


def _budgets(config: Any) -> dict[str, Any]:
    from cogagent_nb.train.data import length_budgets

    return length_budgets(config)


def _stop_ids(model: torch.nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, (list, tuple)) else [eos])
    if model.generation_config.pad_token_id is not None:
        stops.add(model.generation_config.pad_token_id)
    return stops
