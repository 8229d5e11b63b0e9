"""ChatGLM4Tokenizer: parity with the official tokenizer, the HF behaviours user code relies on, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cogagent_nb.data.bpe import read_tokenizer_model
from cogagent_nb.data.tokenizer import (
    SPECIAL_TOKENS,
    TINY_N_RANKS,
    TINY_TOKENIZER_FILE,
    ChatGLM4Tokenizer,
    write_tokenizer_files,
)


# --- parity with the official tokenizer ----------------------------------------------------------------
def test_parity_template_cases(
    parity_tokenizer: ChatGLM4Tokenizer, parity_template_checks: list[dict], parity_dir: Path
) -> None:
    """All 16 official apply_chat_template outputs: ids, mask, positions exactly; images to 1e-5."""
    checks = parity_template_checks
    images = torch.load(parity_dir / "template_images.pt", weights_only=True)
    assert len(checks) == 16
    for check in checks:
        out = parity_tokenizer.apply_chat_template(
            check["conversations"],
            add_generation_prompt=check["add_generation_prompt"],
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            image_root=parity_dir,
        )
        for key, expected in check["expected"].items():
            assert out[key].tolist() == expected, f"{check['name']}: {key}"
        if check["name"] in images:
            assert out["images"].shape == images[check["name"]].shape, check["name"]
            torch.testing.assert_close(out["images"], images[check["name"]], atol=1e-5, rtol=0)
        else:
            assert "images" not in out, check["name"]


def test_parity_special_ids(parity_tokenizer: ChatGLM4Tokenizer) -> None:
    assert parity_tokenizer.vocab_size == 557 and len(parity_tokenizer) == 571
    assert [parity_tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(557, 571))
    assert (parity_tokenizer.eos_id, parity_tokenizer.pad_token_id, parity_tokenizer.eos_token_id) == (557, 557, 557)
    assert (
        parity_tokenizer.gmask_id,
        parity_tokenizer.sop_id,
        parity_tokenizer.system_id,
        parity_tokenizer.user_id,
        parity_tokenizer.assistant_id,
        parity_tokenizer.observation_id,
    ) == (
        559,
        561,
        563,
        564,
        565,
        566,
    )
    assert (parity_tokenizer.boi_id, parity_tokenizer.eoi_id) == (567, 568)
    assert parity_tokenizer.eos_token_ids_for_generation == [557, 564, 566]
    assert parity_tokenizer.image_size == 112 and parity_tokenizer.padding_side == "left"


# --- the Hugging Face text path ------------------------------------------------------------------------
def test_call_splits_special_strings_and_prepends_prefix(parity_tokenizer: ChatGLM4Tokenizer) -> None:
    ids = parity_tokenizer("hi <|user|> there")["input_ids"]
    assert ids[:2] == [parity_tokenizer.gmask_id, parity_tokenizer.sop_id]
    assert ids[2:] == parity_tokenizer.encode_text("hi ") + [parity_tokenizer.user_id] + parity_tokenizer.encode_text(
        " there"
    )
    assert parity_tokenizer("hi", add_special_tokens=False)["input_ids"] == parity_tokenizer.encode_text("hi")


def test_encode_text_keeps_special_strings_as_text(parity_tokenizer: ChatGLM4Tokenizer) -> None:
    ids = parity_tokenizer.encode_text("<|user|>[gMASK]")
    assert not set(ids) & set(parity_tokenizer.all_special_ids)
    assert parity_tokenizer.decode(ids) == "<|user|>[gMASK]"


def test_rendered_string_retokenizes_to_template_ids(parity_tokenizer: ChatGLM4Tokenizer) -> None:
    """tokenize=False renders text that the HF path turns back into the same ids (no special text in content)."""
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "where?"},
        {"role": "assistant", "content": "here"},
        {"role": "user", "content": "and now"},
    ]
    text = parity_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert text == "[gMASK]<sop><|system|>\nBe brief.<|user|>\nwhere?<|assistant|>\nhere<|user|>\nand now<|assistant|>"
    assert parity_tokenizer(text, add_special_tokens=False)["input_ids"] == parity_tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True
    )


def test_decode_skip_special_tokens(parity_tokenizer: ChatGLM4Tokenizer) -> None:
    ids = parity_tokenizer.apply_chat_template([{"role": "user", "content": "ça va? 👍"}], add_generation_prompt=True)
    assert parity_tokenizer.decode(ids, skip_special_tokens=True) == "\nça va? 👍"
    assert parity_tokenizer.decode(ids) == "[gMASK]<sop><|user|>\nça va? 👍<|assistant|>"
    assert parity_tokenizer.decode(torch.tensor(ids), skip_special_tokens=True) == "\nça va? 👍"


def test_ids_beyond_vocabulary_decode_to_nothing(parity_tokenizer: ChatGLM4Tokenizer) -> None:
    """The model's embedding rows past len(tokenizer) can be sampled by an untrained model."""
    assert parity_tokenizer.decode(parity_tokenizer.encode_text("ab") + [len(parity_tokenizer) + 5]) == "ab"


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_round_trip_arbitrary_unicode(parity_tokenizer: ChatGLM4Tokenizer, text: str) -> None:
    assert parity_tokenizer.decode(parity_tokenizer.encode_text(text)) == text
    if not any(special in text for special in SPECIAL_TOKENS):
        assert parity_tokenizer.decode(parity_tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_batch_call_pads_left_with_positions(parity_tokenizer: ChatGLM4Tokenizer) -> None:
    batch = parity_tokenizer(["a", "a longer text"], padding=True, return_tensors="pt")
    short = len(parity_tokenizer.encode_text("a")) + 2
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"][0, : width - short].eq(parity_tokenizer.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [0] * (width - short) + [1] * short
    assert batch["position_ids"][0].tolist() == [0] * (width - short) + list(range(short))
    assert batch["position_ids"][1].tolist() == list(range(width))


# --- the chat template: shapes and options -------------------------------------------------------------
def test_template_return_forms(parity_tokenizer: ChatGLM4Tokenizer, parity_dir: Path) -> None:
    conv = [{"role": "user", "content": "x", "image": str(parity_dir / "img0.png")}]
    flat = parity_tokenizer.apply_chat_template(conv, add_generation_prompt=True)
    assert flat == [
        parity_tokenizer.gmask_id,
        parity_tokenizer.sop_id,
        parity_tokenizer.user_id,
        *parity_tokenizer.encode_text("\n"),
        parity_tokenizer.boi_id,
        parity_tokenizer.eos_id,
        parity_tokenizer.eoi_id,
        *parity_tokenizer.encode_text("x"),
        parity_tokenizer.assistant_id,
    ]
    assert parity_tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt").tolist() == [
        flat
    ]
    single = parity_tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_dict=True)
    assert single["input_ids"] == flat and single["images"].shape == (3, 112, 112)
    batched = parity_tokenizer.apply_chat_template([conv, conv], return_dict=True, return_tensors="pt")
    assert batched["images"].shape == (2, 3, 112, 112)
    pil = parity_tokenizer.apply_chat_template(
        [{"role": "user", "content": "x", "image": Image.open(parity_dir / "img0.png")}],
        return_dict=True,
        return_tensors="pt",
    )
    torch.testing.assert_close(pil["images"], batched["images"][:1])
    assert parity_tokenizer.apply_chat_template({"messages": conv}, add_generation_prompt=True) == flat


def test_template_relative_image_paths_use_cwd(
    parity_tokenizer: ChatGLM4Tokenizer, parity_dir: Path, monkeypatch
) -> None:
    monkeypatch.chdir(parity_dir)
    out = parity_tokenizer.apply_chat_template(
        [{"role": "user", "content": "x", "image": "img1.png"}], return_dict=True
    )
    assert out["images"].shape == (3, 112, 112)


def test_template_metadata_goes_before_newline(parity_tokenizer: ChatGLM4Tokenizer) -> None:
    ids = parity_tokenizer.apply_chat_template([{"role": "user", "content": "c", "metadata": "m"}])
    assert ids == [
        parity_tokenizer.gmask_id,
        parity_tokenizer.sop_id,
        parity_tokenizer.user_id,
        *parity_tokenizer.encode_text("m\n"),
        *parity_tokenizer.encode_text("c"),
    ]


# --- errors --------------------------------------------------------------------------------------------
def test_two_images_raise(parity_tokenizer: ChatGLM4Tokenizer, parity_dir: Path) -> None:
    conv = [
        {"role": "user", "content": "a", "image": parity_dir / "img0.png"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c", "image": parity_dir / "img1.png"},
    ]
    with pytest.raises(ValueError, match="message 2 carries a second image"):
        parity_tokenizer.apply_chat_template(conv)
    with pytest.raises(ValueError, match="second image"):
        parity_tokenizer.apply_chat_template(conv, tokenize=False)


def test_missing_image_names_the_path(parity_tokenizer: ChatGLM4Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothere\.png"):
        parity_tokenizer.apply_chat_template(
            [{"role": "user", "content": "a", "image": "nothere.png"}], image_root=tmp_path
        )


def test_unsupported_inputs_raise_clearly(parity_tokenizer: ChatGLM4Tokenizer, parity_dir: Path) -> None:
    with pytest.raises(NotImplementedError, match="tools"):
        parity_tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tools=[{"name": "f"}])
    with pytest.raises(NotImplementedError, match="tools"):
        parity_tokenizer.apply_chat_template([{"role": "system", "content": "", "tools": [{"name": "f"}]}])
    with pytest.raises(ValueError, match="role 'bot'"):
        parity_tokenizer.apply_chat_template([{"role": "bot", "content": "a"}])
    with pytest.raises(ValueError, match="does not truncate"):
        parity_tokenizer.apply_chat_template([{"role": "user", "content": "a"}], truncation=True, max_length=3)
    mixed = [[{"role": "user", "content": "a", "image": parity_dir / "img0.png"}], [{"role": "user", "content": "b"}]]
    with pytest.raises(ValueError, match=r"conversation\(s\) \[1\]"):
        parity_tokenizer.apply_chat_template(mixed, return_dict=True)


def test_config_with_wrong_special_ids_is_rejected(parity_dir: Path, tmp_path: Path) -> None:
    write_tokenizer_files(tmp_path, parity_dir / "tokenizer.model", image_size=112)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["600"] = config["added_tokens_decoder"].pop("557")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="id 600 is '<\\|endoftext\\|>'"):
        ChatGLM4Tokenizer.from_pretrained(tmp_path)


# --- files: save/load, the official layout, the tiny tokenizer ---------------------------------------------
def test_save_pretrained_round_trip(parity_tokenizer: ChatGLM4Tokenizer, tmp_path: Path) -> None:
    parity_tokenizer.save_pretrained(tmp_path)
    again = ChatGLM4Tokenizer.from_pretrained(tmp_path)
    assert read_tokenizer_model(tmp_path / "tokenizer.model") == read_tokenizer_model(parity_tokenizer.vocab_file)
    assert again.image_size == parity_tokenizer.image_size and again.padding_side == "left"
    text = "Task: click OK <|user|> 你好"
    assert again(text)["input_ids"] == parity_tokenizer(text)["input_ids"]


def test_write_tokenizer_files_official_layout(parity_dir: Path, tmp_path: Path) -> None:
    write_tokenizer_files(tmp_path, parity_dir / "tokenizer.model", image_size=224)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    official = json.loads((parity_dir / "tokenizer_config.json").read_text())
    assert "auto_map" not in config and config["tokenizer_class"] == "ChatGLM4Tokenizer"
    assert config["image_size"] == 224
    assert {k: v for k, v in config.items() if k != "image_size"} == {
        k: v for k, v in official.items() if k != "image_size"
    }
    assert ChatGLM4Tokenizer.from_pretrained(tmp_path).image_size == 224


def test_tiny_tokenizer_loads_through_the_same_path(tmp_path: Path) -> None:
    assert TINY_TOKENIZER_FILE.is_file(), f"missing asset {TINY_TOKENIZER_FILE} (run `cogagent-nb make-tiny-tokenizer`)"
    write_tokenizer_files(tmp_path, TINY_TOKENIZER_FILE, image_size=224)
    tiny = ChatGLM4Tokenizer.from_pretrained(tmp_path)
    n = TINY_N_RANKS
    assert tiny.vocab_size == n and len(tiny) == n + 14
    assert (tiny.eos_id, tiny.gmask_id, tiny.user_id, tiny.assistant_id) == (n, n + 2, n + 7, n + 8)
    assert tiny.image_size == 224
    text = "Task: Open the settings page\n(Platform: WIN)\nCLICK(box=[[20,140,180,190]], element_info='OK')"
    assert tiny.decode(tiny.encode_text(text)) == text
    assert len(tiny.encode_text(text)) < len(text.encode("utf-8")) / 2, "the tiny tokenizer should compress GUI text"


# --- the real tokenizer, when a user supplies it ----------------------------------------------------------------
REAL_DIR = os.environ.get("COGAGENT_NB_REAL_TOKENIZER")


@pytest.mark.skipif(
    not REAL_DIR, reason="set COGAGENT_NB_REAL_TOKENIZER to a folder with the real tokenizer.model (never downloaded)"
)
def test_real_tokenizer_vectors(tmp_path: Path) -> None:
    """The §5.3 test vectors of the 151 329-rank file (glm-4-9b-chat / glm-4v / cogagent-9b)."""
    write_tokenizer_files(tmp_path, Path(REAL_DIR) / "tokenizer.model", image_size=1120)
    real = ChatGLM4Tokenizer.from_pretrained(tmp_path)
    assert real.vocab_size == 151329 and real.eos_id == 151329 and real.pad_token_id == 151329
    assert real.eos_token_ids_for_generation == [151329, 151336, 151338]
    assert real("<|user|>\nhello<|assistant|>")["input_ids"] == [151331, 151333, 151336, 198, 14978, 151337]
    assert real.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True) == [
        151331,
        151333,
        151336,
        198,
        14978,
        151337,
    ]
    assert real.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True) == [
        151331,
        151333,
        151336,
        198,
        109377,
        151337,
    ]
    image = Image.new("RGB", (64, 48), (200, 10, 10))
    out = real.apply_chat_template(
        [{"role": "user", "content": "描述这张图片", "image": image}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert out["input_ids"].tolist() == [
        [151331, 151333, 151336, 198, 151339, 151329, 151340, 100395, 108627, 100736, 151337]
    ]
    assert out["images"].shape == (1, 3, 1120, 1120)
