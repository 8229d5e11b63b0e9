"""From DATA_DIR and `data_config` to what the Trainer consumes: checked files, datasets, collators.

Training samples are `encode_conversation` outputs (the loss mask of lesson 02) batched with right
padding. Evaluation samples are *prompts*: everything up to and including the last `<|assistant|>`,
batched with left padding so that generation continues every row at the same column (the official
finetune's eval collator pads on the left for the same reason). An evaluation batch carries the
samples' indices as its `labels`, so the metric step can look up the reference answer text exactly as
written in the file instead of decoding tokens back.

Data is checked with the validator *before* the model is loaded: a typo in line 300 of train.jsonl
should cost a second, not the minutes it takes to load a 9B checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cogagent_nb.data.encoding import IGNORE_INDEX, ConversationDataset, TrainingCollator, encode_conversation


class DataCheckError(ValueError):
    """The data files failed validation; the message holds the validator's FILE:LINE: field: message lines."""


def split_files(data_dir: str | Path, data_config: Any) -> dict[str, Path]:
    """{"train": path, "val": path, "test": path} for the files the config names, relative to `data_dir`."""
    data_dir = Path(data_dir)
    names = {"train": data_config.train_file, "val": data_config.val_file, "test": data_config.test_file}
    return {split: data_dir / name for split, name in names.items() if name}


def check_data(files: dict[str, Path], *, echo: bool = True) -> None:
    """Validate every split file (`cnb.validate_paths`); raise DataCheckError listing the errors.

    Warnings are printed and do not stop training. Each file is checked once even if two splits share
    it (the official lora.yaml uses dev.jsonl as both val_file and test_file).
    """
    from cogagent_nb.data.validation import validate_paths

    missing = [
        f"{path}: data_config.{split}_file: file not found" for split, path in files.items() if not path.is_file()
    ]
    if missing:
        raise DataCheckError("\n".join(missing))
    problems = validate_paths(list(dict.fromkeys(files.values())))
    errors = [p for p in problems if p.severity == "error"]
    if echo:
        for problem in problems:
            if problem.severity != "error":
                print(problem)
    if errors:
        lines = "\n".join(str(p) for p in errors)
        raise DataCheckError(f"{lines}\n{len(errors)} error(s) in the data; fix them before training")


def train_dataset(path: Path, tokenizer, config: Any, num_image_tokens: int) -> ConversationDataset:
    """The training split, encoded lazily (in the DataLoader's workers) with the config's length budgets."""
    return ConversationDataset(path, tokenizer, num_image_tokens, **length_budgets(config))


def length_budgets(config: Any) -> dict[str, int | None]:
    return {
        "max_input_length": config.max_input_length,
        "max_output_length": config.max_output_length,
        "max_model_length": config.max_model_length,
    }


@dataclasses.dataclass(frozen=True)
class PromptSample:
    """One evaluation prompt: the encoded sample cut before its last answer, and the answer as written."""

    index: int
    input_ids: torch.Tensor  # (P,) ends with <|assistant|>
    image: torch.Tensor  # (3, S, S)
    reference: str
    name: str


def prompt_length(sample: Any) -> int:
    """Number of ids up to and including the role token of the sample's last assistant turn."""
    last = max(s.message_index for s in sample.segments if s.message_index is not None)
    offset = 0
    for segment in sample.segments:
        offset += len(segment.ids)
        if segment.message_index == last and segment.kind == "role":
            return offset
    raise ValueError(f"{sample.name}: no role token for the last message")


class PromptDataset(torch.utils.data.Dataset):
    """A split as generation prompts; `references[i]` is sample i's last assistant message."""

    def __init__(self, path: Path, tokenizer, config: Any, num_image_tokens: int):
        from cogagent_nb.data.validation import load_conversations

        self.path = Path(path)
        self.conversations = load_conversations(self.path)
        self.references = [c["messages"][-1]["content"] for c in self.conversations]
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.budgets = length_budgets(config)

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> PromptSample:
        name = f"{self.path} sample {index}"
        sample = encode_conversation(
            self.conversations[index],
            self.tokenizer,
            num_image_tokens=self.num_image_tokens,
            image_root=self.path.parent,
            name=name,
            **self.budgets,
        )
        cut = prompt_length(sample)
        return PromptSample(index, sample.input_ids[:cut], sample.image, self.references[index], name)


class PromptCollator:
    """Left-pad prompts for generation; `labels` carries each sample's index (B, 1) for the metrics."""

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, samples: Sequence[PromptSample]) -> dict[str, torch.Tensor]:
        width = max(len(s.input_ids) for s in samples)
        ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)  # (B, P)
        mask = torch.zeros_like(ids)
        positions = torch.zeros_like(ids)
        for row, sample in enumerate(samples):
            n = len(sample.input_ids)
            ids[row, width - n :] = sample.input_ids
            mask[row, width - n :] = 1
            positions[row, width - n :] = torch.arange(n)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "images": torch.stack([s.image for s in samples]),  # (B, 3, S, S)
            "labels": torch.tensor([[s.index] for s in samples], dtype=torch.long),  # (B, 1)
        }


def training_collator(tokenizer) -> TrainingCollator:
    """Right padding: labels of padded positions are IGNORE_INDEX, so the side does not change the loss."""
    assert IGNORE_INDEX == -100  # the Trainer counts num_items_in_batch with labels != -100
    return TrainingCollator(tokenizer, padding_side="right")
