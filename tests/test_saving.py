"""Building a random model (`init_model`), saving it with its tokenizer (`save_pretrained`), loading it back.

Issue 7: there was no public way to build a random model from a config, and `model.save_pretrained(d)`
followed by `load(d)` failed with a TypeError about None because tokenizer.model was missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cogagent_nb as cnb
from cogagent_nb.model.configuration import CogAgentConfig
from cogagent_nb.model.loading import CheckpointError, _init_on_device, init_model, load, save_pretrained


@pytest.fixture(scope="module")
def tiny_config() -> CogAgentConfig:
    return CogAgentConfig.from_preset("tiny")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


# --- init_model ------------------------------------------------------------------------------------------------
def test_init_model_is_public_and_depends_on_the_seed_only(tiny_config):
    assert cnb.init_model is init_model and cnb.save_pretrained is save_pretrained
    state = torch.random.get_rng_state()
    a, b, c = init_model("tiny", seed=0), init_model(tiny_config, seed=0), init_model(tiny_config, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG stream is untouched
    assert _same_weights(a, b) and not _same_weights(a, c)
    assert not a.training and a.config.num_image_tokens == 64


def test_init_model_dtype(tiny_config):
    fp32 = init_model(tiny_config, seed=0)
    bf16 = init_model(tiny_config, seed=0, dtype="bf16")
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}  # the tiny preset's torch_dtype
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert all(torch.equal(p.to(torch.bfloat16), q) for p, q in zip(fp32.parameters(), bf16.parameters()))
    with pytest.raises(ValueError, match="dtype 'fp8' not understood"):
        init_model(tiny_config, dtype="fp8")


def test_init_on_a_device_initialises_every_parameter(tiny_config):
    """The GPU path (meta -> to_empty -> init_weights), run on the CPU: no tensor is left as raw memory.

    Its draws differ from the CPU path's (the modules consume the RNG in another order), so each tensor
    is compared by its statistics: ones stay ones, zeros stay zeros, normal(0, 0.02) keeps its spread;
    what is drawn without the RNG (the tiny tower's sin-cos patch positions, all rows but the cls
    token's) is equal.
    """
    reference = init_model(tiny_config, seed=0).state_dict()
    on_device = _init_on_device(tiny_config, seed=0, dtype=torch.float32, device=torch.device("cpu")).state_dict()
    assert reference.keys() == on_device.keys()
    for key, expected in reference.items():
        got = on_device[key]
        assert torch.isfinite(got).all(), key
        if key.endswith("patch_embedding.position_embedding.weight"):
            assert torch.equal(got[1:], expected[1:]), key  # the sin-cos table of `tiny_init`
            got, expected = got[:1], expected[:1]  # the cls token's row: normal(0, 0.02)
        if expected.numel() > 1 and expected.std() > 0:
            # two draws' spreads differ by about std / sqrt(numel): 3 of those, at least 20 %
            tolerance = max(0.2, 3 / expected.numel() ** 0.5)
            assert abs(got.std() - expected.std()) < tolerance * expected.std(), key
            assert abs(got.mean()) < 0.01, key
        else:
            assert torch.equal(got, expected), key


# --- save_pretrained -> load -----------------------------------------------------------------------------------
def test_save_then_load_is_bit_identical(tiny_model_dir: Path, tmp_path: Path):
    tokenizer, model = load(tiny_model_dir)
    with torch.no_grad():  # a model that is not the one on disk: saving must write *these* weights
        model.transformer.encoder.layers[0].mlp.dense_4h_to_h.weight.add_(0.5)
    out = save_pretrained(tmp_path / "saved", model, tokenizer)
    assert sorted(p.name for p in Path(out).iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    tokenizer2, model2 = load(out)
    assert _same_weights(model, model2)
    bookkeeping = {"transformers_version": None, "_name_or_path": None}  # where and by what it was read
    assert model2.config.to_dict() | bookkeeping == model.config.to_dict() | bookkeeping
    conversation = [{"role": "user", "content": "Where is OK?"}]
    assert tokenizer2.apply_chat_template(conversation, add_generation_prompt=True) == tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True
    )
    assert tokenizer2.image_size == tokenizer.image_size == 224
    assert (tiny_model_dir / "tokenizer.model").read_bytes() == (Path(out) / "tokenizer.model").read_bytes()
    generation = json.loads((Path(out) / "generation_config.json").read_text())
    assert generation["eos_token_id"] == model.config.eos_token_id


def test_save_in_bf16_keeps_the_dtype(tmp_path: Path):
    from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer

    model = init_model("tiny", seed=3, dtype="bfloat16")
    tokenizer = ChatGLM4Tokenizer(TINY_TOKENIZER_FILE, image_size=model.config.image_size)
    _, loaded = load(save_pretrained(tmp_path, model, tokenizer))
    assert _same_weights(model, loaded)


def test_official_layout_of_the_saved_config(tiny_model_dir: Path):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["ChatGLMForConditionalGeneration"] and config["model_type"] == "chatglm"
    assert config["vision_config"]["image_size"] == 224 and config["vision_config"]["num_positions"] == 257


def test_load_after_plain_model_save_pretrained_names_the_missing_file(tiny_model_dir: Path, tmp_path: Path):
    _, model = load(tiny_model_dir)
    model.save_pretrained(tmp_path)  # transformers: the model only, no tokenizer files
    with pytest.raises(CheckpointError, match=r"tokenizer\.model and tokenizer_config\.json missing") as info:
        load(tmp_path)
    assert "cogagent_nb.save_pretrained(dir, model, tokenizer)" in str(info.value)


def test_save_pretrained_refuses_a_peft_model(tiny_model_dir: Path, tmp_path: Path):
    from cogagent_nb.model.peft_recipes import add_lora

    tokenizer, model = load(tiny_model_dir)
    with pytest.raises(TypeError, match="save_adapter"):
        save_pretrained(tmp_path, add_lora(model), tokenizer)


def test_make_random_model_puts_special_ids_where_the_config_expects_them(tmp_path):
    """A real-size preset gets a stand-in tokenizer whose special ids equal the config's (151329... on the 9B);
    checked here on a tiny tower with a 3000-rank vocabulary, since a 9B does not fit a CI machine."""
    import cogagent_nb as cnb
    from cogagent_nb.model.configuration import CogAgentConfig, vocabulary_fields

    config = CogAgentConfig.from_preset("tiny", **vocabulary_fields(3000))
    out = cnb.make_random_model(tmp_path / "m", config, dtype="float32")
    tokenizer, model = cnb.load(out)
    assert tokenizer.pad_token_id == config.pad_token_id == 3000
    assert (tokenizer.boi_id, tokenizer.eoi_id) == (config.boi_token_id, config.eoi_token_id)
    assert model.config.padded_vocab_size == config.padded_vocab_size
    ids = tokenizer.encode_text("Click the OK button at 120, 340")
    assert ids and max(ids) < 1000  # text never reaches the 0xF8 filler ranks
