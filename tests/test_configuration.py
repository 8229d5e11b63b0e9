"""CogAgentConfig: official config.json fields, presets, derived sizes, loud failure on inconsistency."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cogagent_nb.model.configuration import EVA2_CLIP_E, PRESETS, CogAgentConfig, VisionConfig


def test_tiny_preset_matches_the_documented_architecture() -> None:
    config = CogAgentConfig.from_preset("tiny")
    assert (config.hidden_size, config.num_layers, config.num_attention_heads) == (128, 2, 4)
    assert (config.multi_query_group_num, config.kv_channels, config.ffn_hidden_size) == (2, 32, 256)
    assert config.padded_vocab_size == 832
    assert config.eos_token_id == [768, 775, 777]
    assert (config.pad_token_id, config.boi_token_id, config.eoi_token_id) == (768, 778, 779)
    assert config.original_rope is False and config.layernorm_epsilon == 1e-5
    vision = config.vision_config
    assert isinstance(vision, VisionConfig)
    assert (vision.image_size, vision.patch_size, vision.num_positions) == (224, 14, 257)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_heads) == (64, 2, 4)
    assert config.num_image_tokens == 64  # 16x16 patches -> 8x8 after the 2x2 conv
    assert config.rotary_dim == 16  # half of each 32-wide head


def test_9b_presets_differ_only_in_rope_style_and_epsilon() -> None:
    cogagent = CogAgentConfig.from_preset("cogagent-9b-20241220")
    glm = CogAgentConfig.from_preset("glm-4v-9b")
    assert cogagent.original_rope is False and cogagent.layernorm_epsilon == 1e-5
    assert glm.original_rope is True and glm.layernorm_epsilon == 1.5625e-07
    assert cogagent.num_image_tokens == 1600 and cogagent.qkv_width == 4608
    assert cogagent.vision_head_dim == 112 and cogagent.rotary_dim == 64
    differing = {
        key
        for key, value in cogagent.to_dict().items()
        if glm.to_dict().get(key) != value and key not in ("architectures",)
    }
    assert differing == {"original_rope", "layernorm_epsilon"}
    assert all("source" in preset for preset in PRESETS.values())


def test_standard_names_map_onto_official_fields() -> None:
    config = CogAgentConfig.from_preset("tiny")
    assert config.num_hidden_layers == config.num_layers == 2
    assert config.vocab_size == config.padded_vocab_size
    assert config.num_key_value_heads == 2
    assert "num_hidden_layers" not in config.to_dict()


def test_official_config_json_round_trips_with_unknown_fields(parity_dir: Path, tmp_path: Path) -> None:
    official = json.loads((parity_dir / "config.json").read_text())
    official["some_future_field"] = {"kept": True}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "config.json").write_text(json.dumps(official))
    config = CogAgentConfig.from_pretrained(tmp_path / "in")
    assert config.num_image_tokens == 16 and config.original_rope is True
    assert isinstance(config.vision_config, VisionConfig)
    config.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert isinstance(written["vision_config"], dict)  # the official nested block, not a repr
    for key, value in official.items():
        if key == "torch_dtype":  # transformers 5 writes it as "dtype"
            assert written["dtype"] == value
        else:
            assert written[key] == value, key


def test_missing_vision_fields_take_the_eva2_clip_defaults() -> None:
    config = CogAgentConfig(vision_config={"num_hidden_layers": 3})
    assert config.vision_config.num_hidden_layers == 3
    assert config.vision_config.hidden_size == 1792


def test_unknown_vision_keys_are_kept_and_written_back(tmp_path: Path) -> None:
    config = CogAgentConfig.from_preset("tiny", vision_config={"future_key": [1, 2]})
    assert config.vision_config.extra == {"readable_init": True, "future_key": [1, 2]}  # tiny key + new
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["vision_config"]
    assert written == {**config.vision_config.to_dict(), "future_key": [1, 2]}
    assert CogAgentConfig.from_pretrained(tmp_path).vision_config == config.vision_config


def test_vision_config_is_typed_not_a_dict() -> None:
    config = CogAgentConfig.from_preset("tiny")
    with pytest.raises(TypeError, match=r"read config\.vision_config\.image_size"):
        config.vision_config["image_size"]
    with pytest.raises(AttributeError):  # frozen: derived sizes cannot drift from the checked fields
        config.vision_config.image_size = 448


def test_partial_vision_override_merges_onto_the_presets_own_values() -> None:
    """Issue 7: the rest of the tower stays the tiny one (not the 9B: 1120 px, 63 layers, 15360)."""
    config = CogAgentConfig.from_preset("tiny", vision_config={"hidden_size": 128, "num_heads": 4})
    tiny = CogAgentConfig.from_preset("tiny").vision_config
    assert (config.vision_config.hidden_size, config.vision_config.num_heads) == (128, 4)
    assert config.vision_config == tiny.merged({"hidden_size": 128})
    assert (config.vision_config.image_size, config.vision_config.num_hidden_layers) == (224, 2)
    assert config.vision_config.intermediate_size == 128 != EVA2_CLIP_E.intermediate_size
    assert config.vision_head_dim == 32 and config.num_image_tokens == 64


def test_vision_override_of_the_image_size_moves_the_position_table() -> None:
    config = CogAgentConfig.from_preset("tiny", vision_config={"image_size": 448})
    assert config.vision_config.num_positions == 32 * 32 + 1 and config.num_image_tokens == 256
    with pytest.raises(ValueError, match="num_positions"):  # given explicitly, a wrong value still fails
        CogAgentConfig.from_preset("tiny", vision_config={"image_size": 448, "num_positions": 257})
    whole = VisionConfig(num_hidden_layers=1)  # a VisionConfig replaces the preset's tower whole
    assert CogAgentConfig.from_preset("tiny", vision_config=whole).vision_config == whole


def test_rotary_frequencies_are_computed_once_in_the_config() -> None:
    config = CogAgentConfig.from_preset("cogagent-9b-20241220")
    inv_freq = config.rotary_inv_freq()
    assert inv_freq.shape == (32,) and inv_freq.dtype == torch.float32  # fp32, as the hub computes them
    assert inv_freq[0].item() == 1.0 and abs(inv_freq[1].item() - 10000 ** (-2 / 64)) < 1e-7


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"vision_config": {"num_positions": 6400}}, "num_positions"),
        ({"vision_config": {"image_size": 1000}}, "image_size"),
        ({"vision_config": {"image_size": 14 * 79, "num_positions": 79 * 79 + 1}}, "2x2 conv"),
        ({"multi_query_group_num": 3}, "multi_query_group_num"),
        ({"rotary_percent": 0.3}, "rotary_percent"),
        ({"rope_table_dtype": "bf16"}, "rope_table_dtype"),
        ({"boi_token_id": 10**6}, "boi_token_id"),
    ],
)
def test_inconsistent_config_fails_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CogAgentConfig(**overrides)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="tiny"):
        CogAgentConfig.from_preset("huge")


def test_tiny_preset_special_ids_agree_with_the_tiny_tokenizer(tmp_path) -> None:
    from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer, write_tokenizer_files

    write_tokenizer_files(tmp_path, TINY_TOKENIZER_FILE, image_size=224)
    tokenizer = ChatGLM4Tokenizer.from_pretrained(tmp_path)
    config = CogAgentConfig.from_preset("tiny")
    assert config.pad_token_id == tokenizer.pad_token_id == tokenizer.eos_id
    assert (config.boi_token_id, config.eoi_token_id) == (tokenizer.boi_id, tokenizer.eoi_id)
    assert sorted(config.eos_token_id) == sorted(tokenizer.eos_token_ids_for_generation)
    assert len(tokenizer) <= config.padded_vocab_size < len(tokenizer) + 64
