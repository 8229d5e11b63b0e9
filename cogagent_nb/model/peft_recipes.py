"""Parameter-efficient fine-tuning recipes for CogAgent, built on PEFT.

The official recipe (THUDM/CogAgent `finetune/configs/lora.yaml`, copied with comments in
`configs/lora.yaml`) is LoRA with r=8, alpha=32, dropout 0.1 on every module *named* `query_key_value`.
That name occurs in both towers — the GLM-4 decoder's `self_attention.query_key_value` and the EVA2-CLIP
vision layers' `attention.query_key_value` — so the official recipe adapts the vision tower too. Whether
that is what you want is a real choice (adapting the vision tower helps with unusual screenshots, costs
memory for the 1601-token vision activations), so it is the visible option `scope`:

- `scope="both"`: the official behaviour, every matching module in either tower;
- `scope="language"`: only modules under `transformer.encoder` (a PEFT regex target).

The other recipe of the official repository, full fine-tuning (`sft.yaml`), freezes the vision tower
(`freezeV: True`): `freeze_vision_tower` does that. Prefix tuning goes through PEFT's PREFIX_TUNING: the
learned prefix arrives in the model as a KV cache of `num_virtual_tokens` entries per layer, shaped for
the model's 2 KV groups (GQA), plus an attention mask that covers it.

PEFT is imported inside the functions, so this module (and `freeze_vision_tower`) works without it.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel, PrefixTuningConfig

SCOPES = ("both", "language")
LANGUAGE_PREFIX = "transformer.encoder."
VISION_PREFIX = "transformer.vision."

# Official lora.yaml values (THUDM/CogAgent finetune/configs/lora.yaml).
OFFICIAL_LORA = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ("query_key_value",)}
PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"  # PEFT reads the old name; transformers 5 warns


@contextmanager
def quiet_peft_deprecations() -> Iterator[None]:
    """Silence the one FutureWarning that PEFT's own code triggers in transformers 5 on every wrap: a learner
    cannot act on it, and it reads as if this course did something wrong. Other warnings still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
        yield


# --- LoRA ---------------------------------------------------------------------------------------------------
def lora_config(
    scope: str = "both",
    r: int = 8,
    alpha: int = 32,
    dropout: float = 0.1,
    target_modules: Sequence[str] = ("query_key_value",),
) -> LoraConfig:
    """A PEFT `LoraConfig`; the defaults are the official lora.yaml.

    `target_modules` are module names matched as PEFT does (a full name or its last dotted parts), e.g.
    ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"). With scope="language" they become one
    regex restricted to `transformer.encoder.*`, so same-named vision modules (`attention.dense`) are left out.
    """
    from peft import LoraConfig

    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}: expected one of {SCOPES}")
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not names:
        raise ValueError("target_modules is empty")
    targets: list[str] | str = names if scope == "both" else language_only_regex(names)
    return LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none"
    )


def language_only_regex(names: Sequence[str]) -> str:
    """A PEFT regex target (re.fullmatch on the module's full name) for `names` inside the language model."""
    alternatives = "|".join(re.escape(name) for name in names)
    return rf"{re.escape(LANGUAGE_PREFIX)}(.*\.)?({alternatives})"


def add_lora(
    model: torch.nn.Module,
    *,
    scope: str = "both",
    r: int = 8,
    alpha: int = 32,
    dropout: float = 0.1,
    target_modules: Sequence[str] = ("query_key_value",),
) -> PeftModel:
    """Wrap `model` with LoRA adapters (`lora_config` arguments); only the adapters remain trainable."""
    from peft import get_peft_model

    with quiet_peft_deprecations():
        return get_peft_model(
            model, lora_config(scope, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)
        )


def adapted_modules(peft_model: torch.nn.Module) -> list[str]:
    """Names (relative to the base model) of the modules that received a LoRA adapter, in model order."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    return [name for name, module in base.named_modules() if isinstance(module, LoraLayer)]


# --- prefix tuning ------------------------------------------------------------------------------------------
def prefix_tuning_config(
    config: Any,
    num_virtual_tokens: int = 16,
    *,
    prefix_projection: bool = False,
    encoder_hidden_size: int | None = None,
) -> PrefixTuningConfig:
    """A PEFT `PrefixTuningConfig` shaped for this model's KV cache.

    PEFT would size the prefix as `hidden_size` split into `num_attention_heads` heads (32 × 128 on the 9B);
    CogAgent's cache holds keys and values for its 2 KV groups only (GQA, [B, 2, T, 128]), so the shape is
    given explicitly: `num_attention_heads` = KV groups, `token_dim` = KV groups × head dim.
    """
    from peft import PrefixTuningConfig

    kv_heads = config.num_key_value_heads
    token_dim = kv_heads * config.kv_channels
    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        num_layers=config.num_layers,
        token_dim=token_dim,
        num_attention_heads=kv_heads,
        prefix_projection=prefix_projection,
        encoder_hidden_size=encoder_hidden_size or token_dim,
    )


def add_prefix_tuning(
    model: torch.nn.Module, num_virtual_tokens: int = 16, *, prefix_projection: bool = False
) -> PeftModel:
    """Wrap `model` with PEFT prefix tuning: `num_virtual_tokens` learned key/value pairs in every layer.

    The model must not use gradient checkpointing (PEFT refuses: its prefix cache is rebuilt inside the
    checkpointed region).
    """
    from peft import get_peft_model

    config = model.config
    with quiet_peft_deprecations():
        return get_peft_model(
            model, prefix_tuning_config(config, num_virtual_tokens, prefix_projection=prefix_projection)
        )


# --- full fine-tuning (official sft.yaml) -------------------------------------------------------------------
def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Freeze `transformer.vision` (EVA2-CLIP, conv, GLU adapter, boi/eoi) as the official sft.yaml does
    (`freezeV: True`); returns the number of parameters frozen."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = base.transformer.vision
    vision.requires_grad_(False)
    return sum(p.numel() for p in vision.parameters())


# --- saving, loading, merging adapters ----------------------------------------------------------------------
def save_adapter(peft_model: PeftModel, out_dir: str | os.PathLike) -> str:
    """Write adapter_config.json + adapter_model.safetensors (adapter weights only, never the base model)."""
    out = Path(out_dir)
    peft_model.save_pretrained(out, safe_serialization=True)
    return str(out)


def load_adapter(model: torch.nn.Module, adapter_dir: str | os.PathLike, *, is_trainable: bool = False) -> PeftModel:
    """Attach a saved adapter to a freshly loaded base model (eval mode unless `is_trainable`).

    The folder must be local: PEFT would take a missing path for a hub id and try to download it.
    """
    from peft import PeftModel

    from cogagent_nb.model.loading import CheckpointError

    config_file = Path(adapter_dir).expanduser() / "adapter_config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{config_file}: missing; pass the folder that `save_adapter` or `cogagent-nb finetune` wrote"
        )
    try:
        with quiet_peft_deprecations():
            return PeftModel.from_pretrained(model, str(config_file.parent), is_trainable=is_trainable)
    except RuntimeError as err:  # torch's dump lists every mismatching tensor; one line says what happened
        if "size mismatch" not in str(err):
            raise
        first = next(line.strip() for line in str(err).splitlines() if "size mismatch" in line)
        raise CheckpointError(
            f"{config_file.parent}: this adapter was trained on a model of another shape than the one loaded "
            f"(first difference: {first}); load it on the base model it was trained on"
        ) from None


def merge_adapter(peft_model: PeftModel) -> torch.nn.Module:
    """Fold LoRA weights into the base weights (W + B·A·alpha/r) and return the plain model, which then
    saves and loads like any checkpoint. Prefix tuning has nothing to fold: PEFT raises for it."""
    return peft_model.merge_and_unload()


# --- what trains --------------------------------------------------------------------------------------------
@dataclass
class ParameterTable:
    """Trainable vs total parameters per part of the model; prints as a table, renders as HTML in Jupyter."""

    rows: list[tuple[str, int, int]] = field(default_factory=list)  # (part, trainable, total)

    @property
    def trainable(self) -> int:
        return sum(r[1] for r in self.rows)

    @property
    def total(self) -> int:
        return sum(r[2] for r in self.rows)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {part: {"trainable": t, "total": n} for part, t, n in self.rows}

    def __str__(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [len("total")])
        lines = [f"{'part':<{width}}  {'trainable':>14}  {'total':>14}  {'%':>7}"]
        for part, t, n in [*self.rows, ("total", self.trainable, self.total)]:
            lines.append(f"{part:<{width}}  {t:>14,}  {n:>14,}  {100 * t / max(n, 1):>6.2f}%")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><td>{p}</td><td style='text-align:right'>{t:,}</td><td style='text-align:right'>{n:,}</td>"
            f"<td style='text-align:right'>{100 * t / max(n, 1):.2f}%</td></tr>"
            for p, t, n in [*self.rows, ("<b>total</b>", self.trainable, self.total)]
        )
        return f"<table><tr><th>part</th><th>trainable</th><th>total</th><th>%</th></tr>{cells}</table>"


# (pattern on the parameter's full name, part label); first match wins, so adapters come before the
# tower they sit in. Rows are shown as: the model as built, then what PEFT added.
_PARTS: tuple[tuple[str, str], ...] = (
    (r"prompt_encoder\.", "prefix (PEFT prompt encoder)"),
    (r"transformer\.vision\..*\.lora_", "LoRA adapters, vision tower"),
    (r"\.lora_", "LoRA adapters, language model"),
    (r"transformer\.embedding\.", "language: word embeddings"),
    (r"transformer\.encoder\.", "language: decoder layers + final norm"),
    (r"transformer\.output_layer\.", "language: output layer"),
    (r"transformer\.vision\.transformer\.", "vision: EVA2-CLIP layers"),
    (r"transformer\.vision\.", "vision: patch embedding, conv, GLU adapter, boi/eoi"),
)


def trainable_parameters_table(model: torch.nn.Module) -> ParameterTable:
    """Count trainable and total parameters by part (language, vision, LoRA, prefix) of a model or PeftModel."""
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        part = next((label for pattern, label in _PARTS if re.search(pattern, name)), "other")
        trainable, total = counts.setdefault(part, [0, 0])
        counts[part] = [trainable + (param.numel() if param.requires_grad else 0), total + param.numel()]
    order = [label for _, label in _PARTS[3:]] + [label for _, label in _PARTS[2::-1]] + ["other"]
    return ParameterTable([(p, *counts[p]) for p in order if p in counts])
