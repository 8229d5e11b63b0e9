"""Every file in `configs/` is read by the code that will read it in a run, so a typo in a key fails here
and not hours into a run.

A recipe (`configs/*.yaml`, the layout of the official `finetune/configs/lora.yaml` of THUDM/CogAgent) goes
through `train.config.load_config`, which checks every key, type and `training_args` field as
`finetune.py` does; a LoRA recipe's `peft_config` must build through `peft.get_peft_config` into the same
adapter as this package's `lora_config()` defaults, which state the official recipe. A DeepSpeed file
(`configs/ds_zero_*.json`) goes through `train.distributed.read_deepspeed_config`, and every field in it
must be one whose meaning the package explains (notebook 04 prints them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cogagent_nb.train.config import load_config
from cogagent_nb.train.distributed import explain_deepspeed_config, read_deepspeed_config

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(path for path in CONFIGS_DIR.iterdir() if path.is_file())


def test_configs_folder_holds_the_official_recipes() -> None:
    names = {path.name for path in CONFIG_FILES}
    assert {"lora.yaml", "sft.yaml", "ds_zero_2.json", "ds_zero_3.json"} <= names, sorted(names)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_file_reads_through_its_reader(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CONFIGS_DIR.parent)  # recipes name their DeepSpeed file relative to the repository
    if path.suffix == ".yaml":
        config = load_config(path)
        assert config.max_input_length and config.max_output_length, f"{path.name}: text budgets missing"
        if config.peft_type == "LORA":
            _check_lora(path.name, config.peft_config)
    elif path.suffix == ".json":
        unexplained = [
            key for key, _, meaning in explain_deepspeed_config(read_deepspeed_config(path)) if "not one of" in meaning
        ]
        assert unexplained == [], f"{path.name}: fields the package does not know: {unexplained}"
    else:
        pytest.fail(f"{path.name}: no reader is known for {path.suffix} files; add one to this test")


def _check_lora(name: str, peft_config: dict) -> None:
    from peft import get_peft_config

    from cogagent_nb.model.peft_recipes import lora_config

    built = get_peft_config(dict(peft_config))
    ours = lora_config()
    for field in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules"):
        assert getattr(built, field) == getattr(ours, field), f"{name}: peft_config: {field}"


@pytest.mark.parametrize("name", ["tiny_lora.yaml", "tiny_sft.yaml"])
def test_the_course_configs_cut_no_demo_sample(name: str, demo_data_dir: Path) -> None:
    """The course trains on its demo set with these budgets: none of its samples may lose a token."""
    from cogagent_nb.data.encoding import ConversationDataset
    from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer
    from cogagent_nb.train.data import length_budgets

    tokenizer = ChatGLM4Tokenizer(TINY_TOKENIZER_FILE, image_size=224)
    budgets = length_budgets(load_config(CONFIGS_DIR / name))
    for split in ("train", "dev", "test"):
        dataset = ConversationDataset(demo_data_dir / f"{split}.jsonl", tokenizer, 64, **budgets)
        assert dataset.truncation_summary() is None
    tight = ConversationDataset(demo_data_dir / "train.jsonl", tokenizer, 64, **{**budgets, "max_output_length": 128})
    assert "1 of 361 samples are cut to fit max_input_length=512, max_output_length=128: answer cut in 1" in str(
        tight.truncation_summary()
    )
