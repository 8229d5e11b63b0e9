"""Loading: the tiny model directory, `load()` (safetensors, shards, pickle refusal, key checks, dtypes,
offline hub ids, remote-code opt-in), and the Auto classes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cogagent_nb import cli
from cogagent_nb.model.loading import (
    CheckpointError,
    load,
    make_tiny_model,
    register_auto_classes,
    resolve_dtype,
    resolve_model_dir,
)

from conftest import logits_of

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(tiny_model_dir)


def copy_dir(src: Path, dst: Path, names=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if names is None or path.name in names:
            shutil.copy(path, dst / path.name)
    return dst


def image_batch(tokenizer, model, n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """n samples of ids with one image triple each (ids taken from the tokenizer), random pixels."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 500, (n, 9), generator=g)
    triple = torch.tensor([tokenizer.boi_id, tokenizer.eos_id, tokenizer.eoi_id]).expand(n, 3)
    ids = torch.cat([torch.tensor([tokenizer.gmask_id, tokenizer.sop_id]).expand(n, 2), triple, text], dim=1)
    size = model.config.image_size
    return {"input_ids": ids, "images": torch.randn(n, 3, size, size, generator=g), "labels": ids.clone()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the tiny model directory ------------------------------------------------------------------------------
def test_tiny_model_dir_has_the_official_files(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", *TOKENIZER_FILES, "generation_config.json"} <= names
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "chatglm"
    assert config["architectures"] == ["ChatGLMForConditionalGeneration"]
    assert "vision_config" in config and "num_layers" in config and "padded_vocab_size" in config
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]
    assert generation["pad_token_id"] == config["pad_token_id"]
    assert generation.get("do_sample", False) is False


def test_tiny_weights_use_the_official_key_names(tiny_model_dir, tiny):
    _, model = tiny
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    # the real files carry the rotary inv_freq buffer; the tiny one does too, and loading ignores it
    assert "transformer.rotary_pos_emb.inv_freq" in keys
    assert keys - {"transformer.rotary_pos_emb.inv_freq"} == set(model.state_dict())
    assert "transformer.vision.transformer.layers.0.attention.query_key_value.weight" in keys
    assert "transformer.encoder.layers.1.self_attention.query_key_value.bias" in keys


def test_make_tiny_model_is_deterministic_per_seed(tiny_model_dir, tmp_path):
    again = Path(make_tiny_model(tmp_path / "again", seed=0))
    for path in tiny_model_dir.iterdir():
        assert sha256(path) == sha256(again / path.name), path.name
    other = Path(make_tiny_model(tmp_path / "other", seed=1))
    assert sha256(other / "model.safetensors") != sha256(again / "model.safetensors")


def test_cli_make_tiny_model(tmp_path, capsys, tiny_model_dir):
    assert cli.main(["make-tiny-model", str(tmp_path / "cli"), "--seed", "0"]) == 0
    assert str(tmp_path / "cli") in capsys.readouterr().out
    assert sha256(tmp_path / "cli" / "model.safetensors") == sha256(tiny_model_dir / "model.safetensors")
    trained = sha256(tmp_path / "cli" / "model.safetensors")  # stands for a trained or merged model
    assert cli.main(["make-tiny-model", str(tmp_path / "cli"), "--seed", "1"]) == 2
    assert "cli: not empty; choose a new folder, or pass --overwrite" in capsys.readouterr().err
    assert sha256(tmp_path / "cli" / "model.safetensors") == trained
    assert cli.main(["make-tiny-model", str(tmp_path / "cli"), "--seed", "1", "--overwrite"]) == 0
    assert sha256(tmp_path / "cli" / "model.safetensors") != trained


def test_cli_make_random_model_tiny_takes_its_dtype_and_names_a_wrong_preset(tmp_path, capsys):
    assert cli.main(["make-random-model", str(tmp_path / "half"), "--preset", "tiny", "--dtype", "float16"]) == 0
    _, model = load(tmp_path / "half")
    assert model.dtype == torch.float16  # was written as fp32 whatever --dtype said
    assert cli.main(["make-random-model", str(tmp_path / "x"), "--preset", "bogus"]) == 2
    assert "preset 'bogus': unknown; choose one of cogagent-9b-20241220" in capsys.readouterr().err


# --- load() -------------------------------------------------------------------------------------------------
def test_load_gives_the_file_weights_in_eval_mode(tiny_model_dir, tiny):
    tokenizer, model = tiny
    assert not model.training
    assert type(tokenizer).__name__ == "ChatGLM4Tokenizer"
    assert model.generation_config.do_sample is False  # generation_config.json was read
    assert list(model.generation_config.eos_token_id) == list(model.config.eos_token_id)
    stored = load_file(tiny_model_dir / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, stored[name]), name


def test_the_loading_bar_shows_only_for_big_checkpoints(tiny_model_dir, capfd, monkeypatch):
    from transformers.utils import logging as hf_logging

    from cogagent_nb.model import loading

    assert hf_logging.is_progress_bar_enabled()
    load(tiny_model_dir)
    assert "Loading weights" not in capfd.readouterr().err, "a few MB load in milliseconds: no bar"
    assert hf_logging.is_progress_bar_enabled(), "the user's setting is back after the load"
    monkeypatch.setattr(loading, "LOADING_BAR_BYTES", 1)  # as if the tiny files were the 9B's
    load(tiny_model_dir)
    assert "Loading weights" in capfd.readouterr().err


def test_save_load_round_trip_is_bit_identical(tiny, tiny_model_dir, tmp_path):
    tokenizer, model = tiny
    batch = image_batch(tokenizer, model)
    out = copy_dir(tiny_model_dir, tmp_path / "saved", TOKENIZER_FILES)
    model.save_pretrained(out)
    _, again = load(out)
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(logits_of(model, batch), logits_of(again, batch))


def test_sharded_checkpoint_with_index_loads(tiny, tiny_model_dir, tmp_path):
    tokenizer, model = tiny
    out = copy_dir(tiny_model_dir, tmp_path / "sharded", TOKENIZER_FILES)
    model.save_pretrained(out, max_shard_size="1MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    _, again = load(out)
    batch = image_batch(tokenizer, model, seed=1)
    assert torch.equal(logits_of(model, batch), logits_of(again, batch))

    (out / sorted(shards)[0]).unlink()
    with pytest.raises(CheckpointError, match="shards that are not there"):
        load(out)


def test_pickle_weights_are_refused_unless_allowed(tiny, tiny_model_dir, tmp_path):
    tokenizer, model = tiny
    out = copy_dir(tiny_model_dir, tmp_path / "pickled", ("config.json", *TOKENIZER_FILES))
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        load(out)
    _, again = load(out, allow_pickle=True)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_missing_and_unexpected_keys_are_listed(tiny_model_dir, tmp_path):
    out = copy_dir(tiny_model_dir, tmp_path / "broken")
    tensors = load_file(out / "model.safetensors")
    del tensors["transformer.vision.boi"]
    tensors["transformer.encoder.layers.7.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load(out)
    message = str(err.value)
    assert "transformer.vision.boi" in message and "missing" in message
    assert "transformer.encoder.layers.7.mlp.extra.weight" in message and "unexpected" in message
    assert "inv_freq" not in message  # the one documented exception


def test_shape_mismatch_is_an_error(tiny_model_dir, tmp_path):
    out = copy_dir(tiny_model_dir, tmp_path / "mismatch")
    tensors = load_file(out / "model.safetensors")
    tensors["transformer.vision.eoi"] = torch.zeros(1, 1, 3)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"shape mismatch.*transformer\.vision\.eoi: checkpoint \(1, 1, 3\)"):
        load(out)


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        ({"model_type": "llama"}, "model_type: 'llama'"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures: .*LlamaForCausalLM.* not implemented"),
    ],
)
def test_unimplemented_architecture_fails_loudly(tiny_model_dir, tmp_path, edit, pattern):
    out = copy_dir(tiny_model_dir, tmp_path / "other-arch")
    config = json.loads((out / "config.json").read_text())
    config.update(edit)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=pattern):
        load(out)


def test_text_only_chatglm_config_is_refused(tiny_model_dir, tmp_path):
    out = copy_dir(tiny_model_dir, tmp_path / "text-only")
    config = json.loads((out / "config.json").read_text())
    del config["vision_config"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vision_config: missing"):
        load(out)


def test_broken_config_json_names_file_and_line(tiny_model_dir, tmp_path):
    out = copy_dir(tiny_model_dir, tmp_path / "bad-json")
    (out / "config.json").write_text('{\n  "model_type": "chatglm",\n  oops\n}')
    with pytest.raises(CheckpointError, match=r"config\.json:3: invalid JSON"):
        load(out)


def test_dtype_strings(tiny_model_dir):
    assert resolve_dtype(None) == "auto" and resolve_dtype("auto") == "auto"
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("torch.float16") is torch.float16
    with pytest.raises(ValueError, match="dtype 'int8'"):
        resolve_dtype("int8")
    _, model = load(tiny_model_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _, model = load(tiny_model_dir, dtype="auto", device_map="cpu")
    assert model.dtype == torch.float32  # the tiny files are fp32
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_hub_id_is_not_downloaded_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not a local directory and HF_HUB_OFFLINE"):
        load("THUDM/cogagent-9b-20241220")
    with pytest.raises(CheckpointError, match="no such directory"):
        load("/nonexistent/dir/for/sure")


def test_a_mistyped_local_path_is_never_a_download(tmp_path, monkeypatch, tiny_model_dir):
    """`models/cogagent-9b` beside a local `models/` is a typo; online it must not reach the Hub."""
    import huggingface_hub

    from cogagent_nb.model.peft_recipes import load_adapter

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, **kw: fetched.append(name) or "hub")
    with pytest.raises(CheckpointError, match="no such directory .*models/ is a local folder"):
        load("models/cogagent-9b")
    resolve_model_dir("THUDM/cogagent-9b-20241220")  # a real-looking id with no such local folder: fetched
    assert fetched == ["THUDM/cogagent-9b-20241220"]

    _, model = load(tiny_model_dir)
    with pytest.raises(CheckpointError, match="runs/adapter/adapter_config.json: missing"):
        load_adapter(model, "runs/adapter")  # PEFT would read a missing folder as a hub id


def test_trust_remote_code_hands_off_to_the_checkpoint_code(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="auto_map"):
        load(tiny_model_dir, trust_remote_code=True)  # nothing remote to trust

    out = copy_dir(tiny_model_dir, tmp_path / "remote")
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    (out / "config.json").write_text(json.dumps(config))
    calls = {}

    class Recorder:
        def __init__(self, kind):
            self.kind = kind

        def __call__(self, path, **kwargs):
            calls[self.kind] = (Path(path), kwargs)
            return torch.nn.Linear(1, 1) if self.kind == "model" else "tokenizer"

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", Recorder("model"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", Recorder("tokenizer"))
    tokenizer, model = load(out, trust_remote_code=True, dtype="bf16")
    assert calls["model"][0] == out and calls["model"][1]["trust_remote_code"] is True
    assert calls["model"][1]["dtype"] is torch.bfloat16
    assert calls["tokenizer"][1]["trust_remote_code"] is True
    assert not model.training


# --- Auto classes -------------------------------------------------------------------------------------------
def test_auto_classes_load_an_official_directory(tiny, tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    register_auto_classes()
    register_auto_classes()  # idempotent
    tokenizer, model = tiny
    # An official directory points at its remote code; without trust_remote_code ours must be used.
    out = copy_dir(tiny_model_dir, tmp_path / "with-auto-map")
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    }
    (out / "config.json").write_text(json.dumps(config))
    batch = image_batch(tokenizer, model, seed=2)
    expected = logits_of(model, batch)
    for directory in (tiny_model_dir, out):
        assert type(AutoConfig.from_pretrained(directory)).__name__ == "CogAgentConfig"
        for auto in (AutoModelForCausalLM, AutoModel):
            loaded = auto.from_pretrained(directory).eval()
            assert type(loaded).__name__ == "CogAgentForConditionalGeneration"
            assert torch.equal(logits_of(loaded, batch), expected)
        auto_tokenizer = AutoTokenizer.from_pretrained(directory)
        assert type(auto_tokenizer).__name__ == "ChatGLM4Tokenizer"
        assert auto_tokenizer.boi_id == tokenizer.boi_id


def test_tiny_config_matches_the_tiny_tokenizer(tiny):
    tokenizer, model = tiny
    config = model.config
    assert config.pad_token_id == tokenizer.pad_token_id == tokenizer.eos_id
    assert (config.boi_token_id, config.eoi_token_id) == (tokenizer.boi_id, tokenizer.eoi_id)
    assert set(config.eos_token_id) == {tokenizer.eos_id, tokenizer.user_id, tokenizer.observation_id}
    assert len(tokenizer) <= config.padded_vocab_size < len(tokenizer) + 64


def test_load_reads_the_official_reference_checkpoint(parity_dir):
    """The parity case was written by the official tooling: every key but inv_freq maps onto a parameter,
    and the inv_freq we write into tiny files equals the one the official files store."""

    tokenizer, model = load(parity_dir)
    stored = load_file(parity_dir / "model.safetensors")
    inv_freq = stored.pop("transformer.rotary_pos_emb.inv_freq")
    assert stored.keys() == model.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())
    torch.testing.assert_close(model.config.rotary_inv_freq(), inv_freq)
    assert tokenizer.boi_id == model.config.boi_token_id
