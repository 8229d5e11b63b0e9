"""PEFT recipes on the tiny model: which modules LoRA adapts in each scope, that LoRA and prefix tuning
learn (loss falls on a fixed batch), merging, saving and loading adapters, and the parameter table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cogagent_nb.model.loading import load
from cogagent_nb.model.peft_recipes import (
    OFFICIAL_LORA,
    adapted_modules,
    add_lora,
    add_prefix_tuning,
    freeze_vision_tower,
    load_adapter,
    lora_config,
    merge_adapter,
    quiet_peft_deprecations,
    save_adapter,
    trainable_parameters_table,
)


@pytest.fixture
def model(tiny_model_dir):
    """A fresh tiny model per test (PEFT wraps modules in place)."""
    return load(tiny_model_dir)[1]


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    """A fixed batch of 2 samples, one image each, ids from the tokenizer, answer-only labels."""
    tokenizer, model = load(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    n, text = 2, 12
    prefix = torch.tensor(
        [tokenizer.gmask_id, tokenizer.sop_id, tokenizer.user_id, tokenizer.boi_id, tokenizer.eos_id, tokenizer.eoi_id]
    )
    ids = torch.cat([prefix.expand(n, -1), torch.randint(0, 400, (n, text), generator=g)], dim=1)
    labels = ids.clone()
    labels[:, : len(prefix) + 4] = -100  # supervise only the last tokens, as a chat answer
    size = model.config.image_size
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(ids.shape[1]).expand(n, -1).contiguous(),
        "images": torch.randn(n, 3, size, size, generator=g),
    }


def eval_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def logits_of(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def train(model, batch, steps: int = 6, lr: float = 1e-2) -> None:
    """A few AdamW steps on the fixed batch (dropout on, seeded so every run draws the same masks)."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()


def frozen_copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}


# --- which modules get adapters -----------------------------------------------------------------------------
def test_official_defaults():
    config = lora_config()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 32, 0.1)
    assert set(config.target_modules) == set(OFFICIAL_LORA["target_modules"]) == {"query_key_value"}
    with pytest.raises(ValueError, match="scope 'vision'"):
        lora_config(scope="vision")


@pytest.mark.parametrize(
    ("scope", "targets", "language_per_layer", "vision_per_layer"),
    [
        ("both", ("query_key_value",), 1, 1),  # the official recipe: both towers by name
        ("language", ("query_key_value",), 1, 0),
        ("both", ("query_key_value", "dense"), 2, 2),  # self_attention.dense and vision attention.dense
        ("language", ("query_key_value", "dense"), 2, 0),
        ("language", ("dense_h_to_4h", "dense_4h_to_h"), 2, 0),  # the MLP, not the vision GLU of the same names
    ],
)
def test_lora_scope_decides_which_modules_are_adapted(model, scope, targets, language_per_layer, vision_per_layer):
    n_language, n_vision = model.config.num_layers, model.config.vision_config.num_hidden_layers
    adapted = adapted_modules(add_lora(model, scope=scope, target_modules=targets))
    language = [name for name in adapted if name.startswith("transformer.encoder.layers.")]
    vision = [name for name in adapted if name.startswith("transformer.vision.transformer.layers.")]
    assert len(language) == language_per_layer * n_language
    assert len(vision) == vision_per_layer * n_vision
    assert len(adapted) == len(language) + len(vision)  # nothing else (e.g. the GLU adapter) was touched


def test_parameter_table_counts_lora_exactly(model):
    config = model.config
    total_before = sum(p.numel() for p in model.parameters())
    peft_model = add_lora(model, scope="language", r=4)
    table = trainable_parameters_table(peft_model)
    per_layer = 4 * config.hidden_size + config.qkv_width * 4  # A: r x in, B: out x r
    assert table.trainable == config.num_layers * per_layer
    assert table.total == total_before + table.trainable
    assert table.as_dict()["LoRA adapters, language model"]["trainable"] == table.trainable
    assert "LoRA adapters, vision tower" not in table.as_dict()
    assert "total" in str(table) and "<table>" in table._repr_html_()


def test_freeze_vision_tower_as_in_sft_yaml(model):
    vision_total = sum(p.numel() for p in model.transformer.vision.parameters())
    assert freeze_vision_tower(model) == vision_total
    table = trainable_parameters_table(model).as_dict()
    vision_rows = [row for part, row in table.items() if part.startswith("vision")]
    assert sum(r["total"] for r in vision_rows) == vision_total
    assert all(r["trainable"] == 0 for r in vision_rows)
    decoder = table["language: decoder layers + final norm"]
    assert decoder["trainable"] == decoder["total"]


# --- LoRA learns, merges, saves and loads -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("scope", ["both", "language"])
def test_lora_training_reduces_loss_and_keeps_base_frozen(model, batch, scope):
    peft_model = add_lora(model, scope=scope)
    before_weights = frozen_copy(peft_model)
    before = eval_loss(peft_model, batch)
    train(peft_model, batch)
    after = eval_loss(peft_model, batch)
    assert after < before - 0.05, (before, after)
    for name, param in peft_model.named_parameters():
        if name in before_weights:
            assert torch.equal(param, before_weights[name]), name


def test_merge_and_unload_gives_the_adapted_logits(model, batch):
    peft_model = add_lora(model, scope="both")
    train(peft_model, batch, steps=3)
    adapted = logits_of(peft_model, batch)
    merged = merge_adapter(peft_model)
    assert type(merged).__name__ == "CogAgentForConditionalGeneration"
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits_of(merged, batch), adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_adapter_save_load_round_trip(model, batch, tiny_model_dir, tmp_path):
    peft_model = add_lora(model, scope="both")
    train(peft_model, batch, steps=3)
    expected = logits_of(peft_model, batch)
    out = Path(save_adapter(peft_model, tmp_path / "adapter"))
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in key for key in keys)  # the adapter only, never the base weights

    fresh = load(tiny_model_dir)[1]
    assert not torch.equal(logits_of(fresh, batch), expected)  # the adapter changed the model
    reloaded = load_adapter(fresh, out)
    assert torch.equal(logits_of(reloaded, batch), expected)
    assert not any(p.requires_grad for p in reloaded.parameters())  # inference mode by default
    trainable = load_adapter(load(tiny_model_dir)[1], out, is_trainable=True)
    assert trainable_parameters_table(trainable).trainable == trainable_parameters_table(peft_model).trainable


# --- prefix tuning ------------------------------------------------------------------------------------------
def test_prefix_tuning_is_shaped_for_the_kv_groups(model):
    config = model.config
    peft_model = add_prefix_tuning(model, num_virtual_tokens=4)
    table = trainable_parameters_table(peft_model).as_dict()
    kv_width = config.multi_query_group_num * config.kv_channels
    # one key and one value vector of the KV width per layer and virtual token
    assert table["prefix (PEFT prompt encoder)"]["trainable"] == 4 * config.num_layers * 2 * kv_width
    assert trainable_parameters_table(peft_model).trainable == table["prefix (PEFT prompt encoder)"]["trainable"]


def test_prefix_tuning_changes_the_output_and_trains(model, batch):
    base = logits_of(model, batch)
    peft_model = add_prefix_tuning(model, num_virtual_tokens=4)
    with_prefix = logits_of(peft_model, batch)
    # the image is spliced in as without the prefix; the prefix adds cache entries, not output positions
    assert with_prefix.shape == base.shape
    assert not torch.allclose(with_prefix, base)
    before = eval_loss(peft_model, batch)
    train(peft_model, batch, steps=6, lr=3e-2)
    after = eval_loss(peft_model, batch)
    assert after < before - 0.05, (before, after)


def test_prefix_mask_covers_the_prefix_under_left_padding(model, batch):
    """A left-padded copy of sample 0 must give the same logits on its real tokens: the prefix columns of
    the attention mask (PEFT prepends ones) must stay attended while the padding columns are masked."""
    peft_model = add_prefix_tuning(model, num_virtual_tokens=4)
    with torch.no_grad():  # give the prefix non-trivial values
        for param in peft_model.prompt_encoder.parameters():
            param.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    pad, pad_id = 3, model.config.pad_token_id
    single = {k: v[:1] for k, v in batch.items()}
    padded = {
        "input_ids": torch.cat([torch.full((1, pad), pad_id), single["input_ids"]], dim=1),
        "attention_mask": torch.cat([torch.zeros(1, pad, dtype=torch.long), single["attention_mask"]], dim=1),
        "position_ids": torch.cat([torch.zeros(1, pad, dtype=torch.long), single["position_ids"]], dim=1),
        "labels": torch.cat([torch.full((1, pad), -100), single["labels"]], dim=1),
        "images": single["images"],
    }
    expected = logits_of(peft_model, single)
    got = logits_of(peft_model, padded)[:, pad:]
    spliced_length = single["input_ids"].shape[1] + model.config.num_image_tokens - 1
    assert got.shape == expected.shape and expected.shape[1] == spliced_length  # the image was spliced in
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_prefix_adapter_save_load_round_trip(model, batch, tiny_model_dir, tmp_path):
    peft_model = add_prefix_tuning(model, num_virtual_tokens=4)
    train(peft_model, batch, steps=2, lr=3e-2)
    expected = logits_of(peft_model, batch)
    out = save_adapter(peft_model, tmp_path / "prefix")
    reloaded = load_adapter(load(tiny_model_dir)[1], out)
    assert torch.equal(logits_of(reloaded, batch), expected)


def test_wrapping_shows_no_warning_a_learner_cannot_act_on(model, tiny_model_dir, tmp_path):
    """PEFT reads transformers' deprecated `is_gradient_checkpointing`; that FutureWarning is silenced, others not."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = add_lora(model)
        save_adapter(adapted, tmp_path / "a")
        load_adapter(load(tiny_model_dir)[1], tmp_path / "a")
        add_prefix_tuning(load(tiny_model_dir)[1])
    assert [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)] == []
    with warnings.catch_warnings(record=True) as caught, quiet_peft_deprecations():
        warnings.simplefilter("always")
        warnings.warn("something else", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]
