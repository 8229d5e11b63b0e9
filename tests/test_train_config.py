"""The config file contract: official keys and files accepted as they are, mistakes named precisely."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cogagent_nb.train.config import ConfigError, config_from_dict, format_config, load_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my.yaml"
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = """
data_config:
  train_file: train.jsonl
training_args:
  output_dir: ./out
"""


def test_the_official_files_load_with_their_values(repo_root):
    lora = load_config(repo_root / "configs" / "lora.yaml")
    assert lora.peft_type == "LORA" and lora.peft_config["r"] == 8 and lora.peft_config["lora_alpha"] == 32
    assert lora.freezeV is False and lora.lora_scope == "both"
    assert lora.max_input_length == 512 and lora.max_output_length == 512
    assert lora.training_args["learning_rate"] == 5.0e-4
    assert lora.training_args["generation_config"] == {"max_new_tokens": 512}
    sft = load_config(repo_root / "configs" / "sft.yaml")
    assert sft.peft_type is None and sft.freezeV is True
    assert sft.training_args["learning_rate"] == 5.0e-5
    assert sft.training_args["deepspeed"] == "configs/ds_zero_3.json"


def test_every_key_of_the_shipped_configs_is_commented(repo_root):
    """Each `key: value` line carries its explanation (section headers like `training_args:` too)."""
    for path in sorted((repo_root / "configs").glob("*.yaml")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if code.strip() and ":" in code and code.lstrip()[0].isalpha():
                assert "#" in line, f"{path.name}:{number}: key without a comment: {line.strip()!r}"


def test_renamed_training_arguments_are_accepted_with_a_warning(tmp_path):
    evaluated = MINIMAL.replace("train_file: train.jsonl", "train_file: train.jsonl\n  val_file: dev.jsonl")
    path = _write(tmp_path, evaluated + "  evaluation_strategy: steps\n")
    with pytest.warns(FutureWarning, match=r"training_args\.evaluation_strategy is called 'eval_strategy'"):
        config = load_config(path)
    assert config.training_args["eval_strategy"] == "steps"
    assert "evaluation_strategy" not in config.training_args


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("lora_rank: 8\n", r"my\.yaml: unknown key 'lora_rank'"),
        ("max_input_lenght: 8\n", r"unknown key 'max_input_lenght' \(did you mean 'max_input_length'\?\)"),
        (
            "training_args:\n  output_dir: x\n  learning_rat: 0.1\n",
            r"my\.yaml: unknown key 'training_args\.learning_rat' \(did you mean 'learning_rate'\?\)",
        ),
        (
            "training_args:\n  output_dir: x\n  group_by_length: true\n",
            r"'training_args\.group_by_length': transformers 5 replaced it by `train_sampling_strategy: group_by_length`",
        ),
        ("peft_config:\n  peft_type: LORA\n  rank: 8\n", r"my\.yaml: unknown key 'peft_config\.rank' for LORA"),
        ("peft_config:\n  peft_type: IA3\n", r"peft_config\.peft_type: 'IA3' is not one of"),
        ("lora_scope: vision\n", r"lora_scope: 'vision' is not one of both, language"),
    ],
)
def test_unknown_keys_and_values_name_the_key_and_the_file(tmp_path, extra, message):
    text = MINIMAL if not extra.startswith("training_args") else "data_config:\n  train_file: t.jsonl\n"
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text + extra))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("  max_steps: ten\n", r"training_args\.max_steps: 'ten' is str, expected int"),
        ("  learning_rate: fast\n", r"training_args\.learning_rate: 'fast' is str, expected float"),
        (
            "  eval_strategy: sometimes\n",
            r"training_args\.eval_strategy: 'sometimes' is str, expected one of no, steps",
        ),
        ("  predict_with_generate: 3\n", r"training_args\.predict_with_generate: 3 is int, expected bool"),
    ],
)
def test_wrong_types_name_the_key_the_value_and_the_expected_type(tmp_path, line, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, MINIMAL + line))
    with pytest.raises(ConfigError, match=r"freezeV: 'yes please' is str, expected bool"):
        load_config(_write(tmp_path, MINIMAL + "freezeV: yes please\n"))


def test_yaml_1_1_spellings_are_read_as_meant(tmp_path):
    config = load_config(_write(tmp_path, MINIMAL + "  learning_rate: 5e-5\n  save_strategy: no\n"))
    assert config.training_args["learning_rate"] == 5e-5  # PyYAML reads "5e-5" as a string
    assert config.training_args["save_strategy"] == "no"  # and bare `no` as False


def test_overrides_edit_the_file_before_it_is_checked(repo_root):
    config = load_config(
        repo_root / "configs" / "lora.yaml",
        ["training_args.max_steps=2", "peft_config.r=4", "data_config.test_file=null", "lora_scope=language"],
    )
    assert config.training_args["max_steps"] == 2 and config.peft_config["r"] == 4
    assert config.data_config.test_file is None and config.lora_scope == "language"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(repo_root / "configs" / "lora.yaml", ["training_args.max_steps"])


def test_values_out_of_range_are_refused_before_the_model_loads(repo_root):
    official = repo_root / "configs" / "lora.yaml"
    for override, words in (
        ("per_device_train_batch_size=0", "per_device_train_batch_size: 0 must be at least 1"),
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps: 0 must be at least 1"),
        ("learning_rate=-1", "learning_rate: -1 must not be negative"),
        ("save_steps=0", "save_steps: 0 must be above 0 with save_strategy 'steps'"),
        ("eval_steps=-5", "eval_steps: -5 must not be negative"),
    ):
        with pytest.raises(
            ConfigError, match=re.escape(f"lora.yaml: training_args.{words} (from --set training_args.")
        ):
            load_config(official, [f"training_args.{override}"])
    for valid in (  # what transformers accepts: a ratio, eval_steps 0 (= logging_steps), values it does not read
        ["training_args.max_steps=-1", "training_args.eval_steps=0.25"],
        ["training_args.eval_steps=0"],
        ["training_args.save_strategy=epoch", "training_args.save_steps=0"],
        ["training_args.num_train_epochs=0"],  # max_steps 3000 counts
    ):
        assert load_config(official, valid), valid
    with pytest.raises(ConfigError, match=r"num_train_epochs: 0 must be above 0 \(max_steps is not set\)"):
        load_config(official, ["training_args.max_steps=-1", "training_args.num_train_epochs=0"])


def test_a_folder_for_the_config_file_is_named_as_one(repo_root):
    with pytest.raises(ConfigError, match=r"configs: is a folder; give the config's \.yaml file"):
        load_config(repo_root / "configs")


def test_set_mistakes_are_named_as_set_mistakes(repo_root):
    official = repo_root / "configs" / "lora.yaml"
    with pytest.raises(
        ConfigError, match=r"unknown key 'training_args\.max_stepz'.*\(from --set training_args\.max_stepz=2\)"
    ):
        load_config(official, ["training_args.max_stepz=2"])
    with pytest.raises(ConfigError, match=r"unknown key 'max_steps' \(did you mean 'training_args\.max_steps'\?\)"):
        load_config(official, ["max_steps=2"])
    with pytest.raises(ConfigError, match=r"--set 'training_args\.max_steps=\[1': the value is not valid YAML"):
        load_config(official, ["training_args.max_steps=[1"])


def test_the_best_model_metric_must_be_one_that_evaluation_reports(repo_root):
    official = repo_root / "configs" / "lora.yaml"  # predict_with_generate: true
    with pytest.raises(ConfigError, match=r"metric_for_best_model: 'eval_loss' is not reported.*generates answers"):
        load_config(official, ["training_args.metric_for_best_model=eval_loss"])
    assert load_config(official, ["training_args.metric_for_best_model=eval_click_in_box"])
    plain = ["training_args.predict_with_generate=false"]
    with pytest.raises(ConfigError, match=r"'click_in_box' is not reported.*computes the loss only; use one of loss"):
        load_config(official, plain + ["training_args.metric_for_best_model=click_in_box"])
    assert load_config(official, plain + ["training_args.metric_for_best_model=loss"])
    with pytest.raises(ConfigError, match=r"metric_for_best_model: 'loss' is not reported.*generates answers"):
        load_config(official, ["training_args.load_best_model_at_end=true"])  # transformers' default metric


def test_evaluating_without_a_validation_file_is_refused_by_name(repo_root):
    official = repo_root / "configs" / "lora.yaml"  # eval_strategy: steps, val_file: dev.jsonl
    with pytest.raises(ConfigError, match=r"lora.yaml: training_args.eval_strategy: 'steps' evaluates on data_config"):
        load_config(official, ["data_config.val_file=null"])
    config = load_config(official, ["data_config.val_file=null", "training_args.eval_strategy=no"])
    assert config.data_config.val_file is None


def test_the_resolved_config_prints_as_yaml_that_reads_back(repo_root):
    config = load_config(repo_root / "configs" / "tiny_lora.yaml")
    text = format_config(config)
    assert text.startswith("# resolved config (")
    assert config_from_dict(yaml.safe_load(text)).as_dict() == config.as_dict()


def test_bad_data_stops_the_run_before_the_model_loads(tmp_path, repo_root):
    from cogagent_nb.data.synthetic import write_flawed_example

    data = tmp_path / "data"
    data.mkdir()
    flawed, _ = write_flawed_example(data)
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl"):
        (data / name).write_text(Path(flawed).read_text(encoding="utf-8"), encoding="utf-8")
    command = [sys.executable, "finetune.py", str(data), str(tmp_path / "no-model"), "configs/tiny_lora.yaml"]
    done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "# resolved config" in done.stdout  # printed first
    errors = [line for line in done.stderr.splitlines() if "train.jsonl:" in line]
    assert errors, done.stderr[-2000:]
    assert all(re.match(r".*train\.jsonl:\d+: [\w\[\].]+: ", line) for line in errors), (
        errors
    )  # FILE:LINE: field: message
    assert "error(s) in the data" in done.stderr
    assert "no-model" not in done.stderr  # the model folder was never opened


def test_a_missing_model_folder_is_one_line_not_a_traceback(tmp_path, repo_root, tiny_train_data):
    command = [
        sys.executable,
        "finetune.py",
        str(tiny_train_data),
        str(tmp_path / "no-model"),
        "configs/tiny_lora.yaml",
    ]
    done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == f"error: {tmp_path / 'no-model'}: no such directory"


def test_training_arguments_keep_the_models_stop_tokens(repo_root, tmp_path):
    """generation_config from the file is merged over the model's own, so evaluation still stops on
    the official stop ids; columns the model needs are kept; TensorBoard only when installed."""
    from transformers import GenerationConfig

    from cogagent_nb.train.callbacks import tensorboard_available
    from cogagent_nb.train.finetune import build_training_args

    config = load_config(repo_root / "configs" / "lora.yaml", [f"training_args.output_dir={tmp_path}"])
    model_generation = GenerationConfig(eos_token_id=[151329, 151336, 151338], pad_token_id=151329, do_sample=False)
    args = build_training_args(config, generation_defaults=model_generation)
    assert args.generation_config.max_new_tokens == 512  # from the file
    assert args.generation_config.eos_token_id == [151329, 151336, 151338]  # from the model
    assert args.remove_unused_columns is False and args.eval_strategy == "steps"
    assert ("tensorboard" in args.report_to) == tensorboard_available()
