"""Every file in `configs/` is read as the fine-tuning code reads it, so a typo in a key fails here and
not hours into a run.

A recipe (`configs/*.yaml`, the layout of the official `finetune/configs/lora.yaml` of THUDM/CogAgent) is
loaded with `yaml.safe_load`; its top-level keys must be the recipe's known keys, `training_args` must
name fields of `transformers.Seq2SeqTrainingArguments` (which the official script builds from it), and
`peft_config` must build through `peft.get_peft_config` into the same adapter as this package's
`lora_config()` defaults, which state the official recipe.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(path for path in CONFIGS_DIR.iterdir() if path.is_file())

RECIPE_KEYS = {"data_config", "combine", "freezeV", "max_input_length", "max_output_length", "training_args"}
OPTIONAL_RECIPE_KEYS = {"peft_config"}  # absent in a full fine-tuning recipe (sft.yaml)
DATA_KEYS = {"train_file", "val_file", "test_file", "num_proc"}


def test_configs_folder_is_not_empty() -> None:
    assert CONFIG_FILES, f"no files in {CONFIGS_DIR}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_file_reads_with_known_keys(path: Path) -> None:
    assert path.suffix == ".yaml", f"{path.name}: no reader is known for {path.suffix} files; add one to this test"
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(recipe, dict), f"{path.name}: expected a mapping at the top level"
    keys = set(recipe)
    assert keys >= RECIPE_KEYS, f"{path.name}: missing {sorted(RECIPE_KEYS - keys)}"
    assert keys <= RECIPE_KEYS | OPTIONAL_RECIPE_KEYS, (
        f"{path.name}: unknown {sorted(keys - RECIPE_KEYS - OPTIONAL_RECIPE_KEYS)}"
    )
    assert set(recipe["data_config"]) <= DATA_KEYS, (
        f"{path.name}: data_config: unknown {set(recipe['data_config']) - DATA_KEYS}"
    )
    for key in ("max_input_length", "max_output_length"):
        assert isinstance(recipe[key], int) and recipe[key] > 0, f"{path.name}: {key} must be a positive integer"
    _check_training_args(path.name, recipe["training_args"])
    if "peft_config" in recipe:
        _check_peft_config(path.name, recipe["peft_config"])


def _check_training_args(name: str, training_args: dict) -> None:
    from transformers import Seq2SeqTrainingArguments

    fields = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    unknown = sorted(set(training_args) - fields)
    assert unknown == [], f"{name}: training_args: not fields of Seq2SeqTrainingArguments: {unknown}"


def _check_peft_config(name: str, peft_config: dict) -> None:
    from peft import get_peft_config

    from cogagent_nb.model.peft_recipes import lora_config

    built = get_peft_config(dict(peft_config))
    ours = lora_config()
    for field in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules"):
        assert getattr(built, field) == getattr(ours, field), f"{name}: peft_config: {field}"
