"""The fine-tuning config file: the official YAML keys with their official meanings, checked before anything runs.

The official script (THUDM/CogAgent `finetune/finetune.py`) reads a YAML file with these top-level keys,
and so does this package, with the same meanings:

    data_config        train_file, val_file, test_file (relative to DATA_DIR), num_proc (the official
                       tokenizing workers; accepted and unused: samples are encoded in the DataLoader)
    combine            read but unused by the official script ("Not use now"); accepted and ignored here too
    freezeV            freeze the vision tower (transformer.vision) after PEFT wraps the model
    max_input_length   text tokens of the prompt; the image's num_image_tokens + 2 vectors come on top
    max_output_length  text tokens of the answer (end-of-turn token included)
    training_args      any `transformers.Seq2SeqTrainingArguments` field; generation_config is a dict
                       of `GenerationConfig` fields (max_new_tokens ...), deepspeed a JSON file path
    peft_config        absent/null: full fine-tuning; `peft_type: LORA` or `peft_type: PREFIX_TUNING`

This project's keys (absent from the official files; their defaults reproduce the official behaviour):

    lora_scope         "both" (official: every module named like target_modules, vision tower included)
                       or "language" (adapters in the GLM-4 decoder only)
    max_model_length   optional budget of everything the model sees, the image's vectors included
    dtype              weights' dtype: "auto" = bfloat16 on a GPU (the official "Must use BFloat 16"),
                       the checkpoint's own dtype on CPU (fp32 for the tiny model); or bfloat16/float32...

Errors say which file and key: an unknown key, a wrong type (with the value and what was expected), a
missing required key. Keys that transformers 5 renamed (`evaluation_strategy` -> `eval_strategy`) are
accepted with a warning that names the new key, so a config written for transformers 4 runs unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml

TOP_LEVEL_KEYS = (
    "data_config",
    "combine",
    "freezeV",
    "max_input_length",
    "max_output_length",
    "training_args",
    "peft_config",
)
"""The official keys (THUDM/CogAgent finetune/finetune.py `FinetuningConfig`)."""

PROJECT_KEYS = ("lora_scope", "max_model_length", "dtype")
"""Keys of this project only; the official files do not have them and get the defaults."""

DATA_CONFIG_KEYS = ("train_file", "val_file", "test_file", "num_proc")

RENAMED_TRAINING_ARGS = {
    "evaluation_strategy": "eval_strategy",  # transformers 4.41 -> 5
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
    "no_cuda": "use_cpu",
}
"""Old Seq2SeqTrainingArguments names -> the transformers-5 name they were replaced by."""

REPLACED_TRAINING_ARGS = {
    "group_by_length": "transformers 5 replaced it by `train_sampling_strategy: group_by_length`",
}
"""Old keys whose transformers-5 successor takes a different value: the error says what to write instead."""

PEFT_TYPES = ("LORA", "PREFIX_TUNING")
LORA_SCOPES = ("both", "language")
DTYPES = ("auto", "bfloat16", "float16", "float32")


class ConfigError(ValueError):
    """A config file that cannot run; the message starts with the file and names the key."""


@dataclasses.dataclass
class DataConfig:
    """`data_config`: the split files (relative to DATA_DIR), and `num_proc`, the official script's tokenizing
    worker count, accepted and unused (this package encodes samples lazily in the DataLoader workers)."""

    train_file: str
    val_file: str | None = None
    test_file: str | None = None
    num_proc: int | None = None


@dataclasses.dataclass
class FinetuneConfig:
    """One resolved config file. `training_args` and `peft_config` stay dicts until the run builds them."""

    data_config: DataConfig
    training_args: dict[str, Any]
    combine: bool = True
    freezeV: bool = True  # noqa: N815  (the official key, spelled as in the files)
    max_input_length: int | None = None
    max_output_length: int | None = None
    peft_config: dict[str, Any] | None = None
    lora_scope: str = "both"
    max_model_length: int | None = None
    dtype: str = "auto"
    source: str = "<dict>"

    @property
    def peft_type(self) -> str | None:
        """ "LORA", "PREFIX_TUNING", or None for full fine-tuning."""
        return None if self.peft_config is None else str(self.peft_config["peft_type"]).upper()

    def as_dict(self) -> dict[str, Any]:
        """The resolved config in the file's layout (what `format_config` prints)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


# --- reading ------------------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """Read a config file, apply `--set` overrides ("training_args.max_steps=2"), check every key.

    Override values are parsed as YAML (`2` is an int, `null` is None, `[a, b]` a list).
    """
    path = Path(path)
    if not path.is_file():
        what = (
            "is a folder; give the config's .yaml file (e.g. configs/lora.yaml)"
            if path.is_dir()
            else "config file not found"
        )
        raise ConfigError(f"{path}: {what}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override, path)
    try:
        return config_from_dict(raw, source=str(path))
    except ConfigError as err:  # a key the file does not hold came from the command line: say so
        culprits = [o for o in overrides if _names_key(str(err), o.partition("=")[0].strip())]
        if not culprits:
            raise
        raise ConfigError(f"{err} (from {', '.join('--set ' + o for o in culprits)})") from None


def apply_override(raw: dict[str, Any], override: str, source: str | os.PathLike = "--set") -> None:
    """Set one dotted key in the raw mapping: "training_args.max_steps=2", "peft_config=null"."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. training_args.max_steps=2")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: --set {override!r}: {part} is not a mapping")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", err)
        raise ConfigError(f"{source}: --set {override!r}: the value is not valid YAML: {problem}") from None


def _names_key(message: str, key: str) -> bool:
    """Whether an error message names `key` as a whole dotted key (`max_steps` is not in `training_args.max_stepsx`)."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message) is not None


def _did_you_mean(key: str, known: Any) -> str:
    """`: did you mean 'max_input_length'?` for a near miss (a typo), else nothing."""
    import difflib

    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _nested_hint(key: str) -> str:
    """` (did you mean 'training_args.max_steps'?)` for a training argument written at the top level."""
    from transformers import Seq2SeqTrainingArguments

    if key in {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}:
        return f" (did you mean 'training_args.{key}'?)"
    return ""


def config_from_dict(raw: dict[str, Any], *, source: str = "<dict>") -> FinetuneConfig:
    """Check and resolve a raw config mapping (what the YAML file holds)."""
    known = TOP_LEVEL_KEYS + PROJECT_KEYS
    for key in raw:
        if key not in known:
            hint = _did_you_mean(key, known) or _nested_hint(key)
            raise ConfigError(f"{source}: unknown key {key!r}{hint} (known: {', '.join(known)})")
    for key in ("data_config", "training_args"):
        if key not in raw or raw[key] is None:
            raise ConfigError(f"{source}: {key}: missing (required)")
    config = FinetuneConfig(
        data_config=_data_config(raw["data_config"], source),
        training_args=check_training_args(raw["training_args"], source),
        combine=_typed(raw, "combine", bool, True, source),
        freezeV=_typed(raw, "freezeV", bool, True, source),
        max_input_length=_length(raw, "max_input_length", source),
        max_output_length=_length(raw, "max_output_length", source),
        peft_config=_peft_config(raw.get("peft_config"), source),
        lora_scope=_choice(raw, "lora_scope", LORA_SCOPES, "both", source),
        max_model_length=_length(raw, "max_model_length", source),
        dtype=_choice(raw, "dtype", DTYPES, "auto", source),
        source=source,
    )
    _check_evaluation_data(config)
    return config


def _check_evaluation_data(config: FinetuneConfig) -> None:
    """Evaluating during training reads data_config.val_file: refuse the pair here, by name, rather than let
    the Trainer stop later with a traceback ("you didn't pass an eval_dataset")."""
    strategy = config.training_args.get("eval_strategy", "no")
    if strategy not in ("no", None) and not config.data_config.val_file:
        raise ConfigError(
            f"{config.source}: training_args.eval_strategy: {str(strategy)!r} evaluates on data_config.val_file, "
            "which is not set: name a val_file, or --set training_args.eval_strategy=no"
        )


def _typed(raw: dict, key: str, kind: type, default: Any, source: str, where: str = "") -> Any:
    value = raw.get(key, default)
    if value is None:
        return default
    if not _is_instance(value, kind):
        raise ConfigError(f"{source}: {where}{key}: {value!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _length(raw: dict, key: str, source: str) -> int | None:
    value = _typed(raw, key, int, None, source)
    if value is not None and value < 1:
        raise ConfigError(f"{source}: {key}: {value!r} must be a positive number of tokens (or null)")
    return value


def _choice(raw: dict, key: str, choices: tuple[str, ...], default: str, source: str) -> str:
    value = _typed(raw, key, str, default, source)
    if value not in choices:
        raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _data_config(raw: Any, source: str) -> DataConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: data_config: {raw!r} is {type(raw).__name__}, expected a mapping")
    for key in raw:
        if key not in DATA_CONFIG_KEYS:
            raise ConfigError(f"{source}: unknown key 'data_config.{key}' (known: {', '.join(DATA_CONFIG_KEYS)})")
    if not raw.get("train_file"):
        raise ConfigError(f"{source}: data_config.train_file: missing (required)")
    files = {k: _typed(raw, k, str, None, source, "data_config.") for k in DATA_CONFIG_KEYS[:3]}
    num_proc = _typed(raw, "num_proc", int, None, source, "data_config.")
    return DataConfig(num_proc=num_proc, **files)


def _peft_config(raw: Any, source: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: peft_config: {raw!r} is {type(raw).__name__}, expected a mapping or null")
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type not in PEFT_TYPES:
        raise ConfigError(f"{source}: peft_config.peft_type: {raw.get('peft_type')!r} is not one of {PEFT_TYPES}")
    peft_class = _peft_config_class(peft_type)
    fields = {f.name for f in dataclasses.fields(peft_class)}
    hints = typing.get_type_hints(peft_class)
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key 'peft_config.{key}' for {peft_type} ({peft_class.__name__})")
        if key != "peft_type" and value is not None and not _matches(value, hints.get(key, Any)):
            raise ConfigError(
                f"{source}: peft_config.{key}: {value!r} is {type(value).__name__}, expected {_describe(hints[key])}"
            )
    return {**raw, "peft_type": peft_type}


def _peft_config_class(peft_type: str) -> type:
    from peft import LoraConfig, PrefixTuningConfig

    return LoraConfig if peft_type == "LORA" else PrefixTuningConfig


# --- training_args ----------------------------------------------------------------------------------------
def check_training_args(raw: Any, source: str) -> dict[str, Any]:
    """Check `training_args` against `Seq2SeqTrainingArguments`' fields and types; rename old keys.

    Returns a new dict; `generation_config` stays a dict here (`build_training_args` makes the object).
    """
    from transformers import GenerationConfig, Seq2SeqTrainingArguments

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: training_args: {raw!r} is {type(raw).__name__}, expected a mapping")
    fields = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init}
    hints = typing.get_type_hints(Seq2SeqTrainingArguments)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = RENAMED_TRAINING_ARGS.get(key, key)
        if name != key:
            warnings.warn(
                f"{source}: training_args.{key} is called {name!r} since transformers 5; read as {name}",
                FutureWarning,
                stacklevel=2,
            )
            if name in raw:
                raise ConfigError(f"{source}: training_args: both {key!r} and its new name {name!r} are set")
        if name not in fields:
            hint = f": {REPLACED_TRAINING_ARGS[key]}" if key in REPLACED_TRAINING_ARGS else _did_you_mean(key, fields)
            raise ConfigError(
                f"{source}: unknown key 'training_args.{key}'{hint} (not a Seq2SeqTrainingArguments field)"
            )
        if name == "generation_config" and isinstance(value, dict):
            valid = set(GenerationConfig().to_dict())
            unknown = [k for k in value if k not in valid]
            if unknown:
                raise ConfigError(f"{source}: unknown key 'training_args.generation_config.{unknown[0]}'")
        elif value is not None:
            value = _coerce_float(value, hints.get(name))
            if not _matches(value, hints.get(name, Any)):
                raise ConfigError(
                    f"{source}: training_args.{name}: {value!r} is {type(value).__name__}, "
                    f"expected {_describe(hints[name])}"
                )
        out[name] = value
    check_training_ranges(out, source)
    check_best_metric(out, source)
    return out


AT_LEAST_ONE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
NOT_NEGATIVE = ("learning_rate", "weight_decay", "warmup_steps", "max_grad_norm", "eval_steps")
STEPS_OF_STRATEGY = {"save_steps": "save_strategy", "logging_steps": "logging_strategy"}  # read only for "steps"


def check_training_ranges(training_args: dict[str, Any], source: str) -> None:
    """Values of the right type but out of range: the Trainer or torch would stop on them only after the
    model has loaded (batch size 0, a negative learning rate), or divide by zero (accumulation 0). Values
    that transformers reads only in some settings are checked only there (save_steps under
    save_strategy "steps", epochs when max_steps does not count; eval_steps 0 falls back to logging_steps)."""
    max_steps = training_args.get("max_steps")
    counts_epochs = max_steps is None or max_steps <= 0  # transformers: a positive max_steps overrides epochs
    for key, value in training_args.items():
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key in AT_LEAST_ONE and value < 1:
            raise ConfigError(f"{source}: training_args.{key}: {value!r} must be at least 1")
        if key in NOT_NEGATIVE and value < 0:
            raise ConfigError(f"{source}: training_args.{key}: {value!r} must not be negative")
        strategy = STEPS_OF_STRATEGY.get(key)
        if strategy and training_args.get(strategy, "steps") == "steps" and value <= 0:
            raise ConfigError(f"{source}: training_args.{key}: {value!r} must be above 0 with {strategy} 'steps'")
        if key == "num_train_epochs" and counts_epochs and value <= 0:
            raise ConfigError(
                f"{source}: training_args.num_train_epochs: {value!r} must be above 0 (max_steps is not set)"
            )


def check_best_metric(training_args: dict[str, Any], source: str) -> None:
    """`metric_for_best_model` must be a number the evaluation reports: the GUI metrics when it generates
    (`predict_with_generate`: no loss is computed), the loss otherwise. Transformers finds out only at the
    first evaluation, with a KeyError in the middle of training."""
    from cogagent_nb.infer.metrics import METRICS

    metric = training_args.get("metric_for_best_model")
    uses_a_metric = training_args.get("load_best_model_at_end") or training_args.get("lr_scheduler_type") in (
        "reduce_lr_on_plateau",
        "greedy",
    )
    if metric is None and uses_a_metric:
        metric = "loss"  # what transformers fills in for these two settings
    if metric is None:
        return
    available = METRICS if training_args.get("predict_with_generate") else ("loss",)
    if metric.removeprefix("eval_") not in available:
        how = "generates answers (predict_with_generate: true)" if available == METRICS else "computes the loss only"
        raise ConfigError(
            f"{source}: training_args.metric_for_best_model: {metric!r} is not reported, since evaluation {how}; "
            f"use one of {', '.join(available)}"
        )


def _coerce_float(value: Any, hint: Any) -> Any:
    """Undo two PyYAML readings of YAML 1.1: `5e-5` (no dot) is a string, and `no` is False. A float field
    takes the string as the number it spells; a strategy field takes False as "no"."""
    if value is False and not _matches(False, hint) and _matches("no", hint):
        return "no"
    if isinstance(value, str) and _matches(1.0, hint) and not _matches(value, hint):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is_instance(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a dataclass type hint (Optional/Union, Literal, enums by value, containers)."""
    if hint is Any or hint is None:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        enums = [a for a in typing.get_args(hint) if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):  # `IntervalStrategy | str` means "a value of the enum, as text"
            return any(_matches(value, e) for e in enums)
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple, set):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        if issubclass(hint, enum.Enum):
            return value in {m.value for m in hint} or isinstance(value, hint)
        if hint in (bool, int, float):
            return _is_instance(value, hint)
        if hint in (str, dict, list):
            return isinstance(value, hint)
        if issubclass(hint, os.PathLike):
            return isinstance(value, str)
        return isinstance(value, (hint, dict))  # e.g. GenerationConfig given as a mapping
    return True


def _describe(hint: Any) -> str:
    """A hint as a reader writes it: 'int', 'str or null', 'one of no, steps, epoch'."""
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args):
            args = tuple(a for a in args if a is not str)
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in hint)
    return getattr(hint, "__name__", str(hint))


# --- printing --------------------------------------------------------------------------------------------
def format_config(config: FinetuneConfig) -> str:
    """The resolved config as YAML, headed by its file; printed at the start of every run."""
    body = yaml.safe_dump(config.as_dict(), sort_keys=False, default_flow_style=None, width=110)
    return f"# resolved config ({config.source})\n{body}"
