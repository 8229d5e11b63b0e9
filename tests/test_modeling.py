"""The native model: parity with the official code, the 9B parameter table, the splice, masks, loss,
padding, gradient checkpointing and dtypes (tiny preset on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cogagent_nb.model.configuration import CogAgentConfig
from cogagent_nb.model.modeling import (
    ChatGLMForConditionalGeneration,
    CogAgentForConditionalGeneration,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    build_attention_mask,
    enable_activation_checkpointing,
    splice_image,
)

from conftest import TINY, cache_of, make_prompt, pad_batch


@pytest.fixture(scope="module")
def tiny() -> CogAgentForConditionalGeneration:
    torch.manual_seed(0)
    return CogAgentForConditionalGeneration(CogAgentConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))


# ---- parity with the official implementation ---------------------------------------------------------
def _parity_model(parity_dir: Path) -> CogAgentForConditionalGeneration:
    config = CogAgentConfig.from_json_file(parity_dir / "config.json")
    model = CogAgentForConditionalGeneration(config).eval()
    state = load_file(parity_dir / "model.safetensors")
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys == ["transformer.rotary_pos_emb.inv_freq"]
    return model


def _rel_l2(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


def test_logits_and_vision_features_match_the_official_code(parity_dir: Path) -> None:
    model = _parity_model(parity_dir)
    cases = torch.load(parity_dir / "case.pt", weights_only=True)["cases"]
    assert len(cases) == 4
    for case in cases:
        with torch.no_grad():
            features = model.transformer.vision(case["images"])
            out = model(
                input_ids=case["input_ids"],
                images=case["images"],
                attention_mask=case["attention_mask"],
                position_ids=case["position_ids"],
                use_cache=False,
            )
        keep = case["logit_mask"]
        assert out.logits.shape == case["logits"].shape, case["name"]
        assert _rel_l2(out.logits[keep], case["logits"][keep]) <= 1e-5, case["name"]
        assert _rel_l2(features, case["vision_features"]) <= 1e-5, case["name"]
        spliced = splice_image(
            case["input_ids"],
            num_image_tokens=model.config.num_image_tokens,
            boi_token_id=model.config.boi_token_id,
            eoi_token_id=model.config.eoi_token_id,
            attention_mask=case["attention_mask"],
        )
        assert torch.equal(spliced.attention_mask, case["attention_mask_spliced"]), case["name"]


def test_parity_case_detects_the_other_rope_style(parity_dir: Path) -> None:
    """The comparison above can fail: the same weights with CogAgent's rotate-half RoPE disagree."""
    model = _parity_model(parity_dir)
    model.transformer.rotary_pos_emb.original_rope = False
    for layer in model.transformer.encoder.layers:
        layer.self_attention.original_rope = False
    case = torch.load(parity_dir / "case.pt", weights_only=True)["cases"][0]
    with torch.no_grad():
        logits = model(input_ids=case["input_ids"], images=case["images"], use_cache=False).logits
    assert _rel_l2(logits, case["logits"]) > 1e-2


# ---- the 9B parameter table (docs/MODEL_SPEC.md §2) ------------------------------------------------------------
def _reference_table() -> dict[str, tuple[int, ...]]:
    """Every checkpoint key and shape of cogagent-9b-20241220, written from the reference table."""
    table: dict[str, tuple[int, ...]] = {
        "transformer.embedding.word_embeddings.weight": (151552, 4096),
        "transformer.encoder.final_layernorm.weight": (4096,),
        "transformer.output_layer.weight": (151552, 4096),
    }
    for i in range(40):
        p = f"transformer.encoder.layers.{i}."
        table |= {
            p + "input_layernorm.weight": (4096,),
            p + "self_attention.query_key_value.weight": (4608, 4096),
            p + "self_attention.query_key_value.bias": (4608,),
            p + "self_attention.dense.weight": (4096, 4096),
            p + "post_attention_layernorm.weight": (4096,),
            p + "mlp.dense_h_to_4h.weight": (27392, 4096),
            p + "mlp.dense_4h_to_h.weight": (4096, 13696),
        }
    v = "transformer.vision."
    table |= {
        v + "patch_embedding.proj.weight": (1792, 3, 14, 14),
        v + "patch_embedding.proj.bias": (1792,),
        v + "patch_embedding.cls_embedding": (1, 1792),
        v + "patch_embedding.position_embedding.weight": (6401, 1792),
        v + "conv.weight": (4096, 1792, 2, 2),
        v + "conv.bias": (4096,),
        v + "linear_proj.linear_proj.weight": (4096, 4096),
        v + "linear_proj.norm1.weight": (4096,),
        v + "linear_proj.norm1.bias": (4096,),
        v + "linear_proj.gate_proj.weight": (13696, 4096),
        v + "linear_proj.dense_h_to_4h.weight": (13696, 4096),
        v + "linear_proj.dense_4h_to_h.weight": (4096, 13696),
        v + "boi": (1, 1, 4096),
        v + "eoi": (1, 1, 4096),
    }
    for j in range(63):
        p = f"{v}transformer.layers.{j}."
        table |= {
            p + "input_layernorm.weight": (1792,),
            p + "input_layernorm.bias": (1792,),
            p + "attention.query_key_value.weight": (5376, 1792),
            p + "attention.query_key_value.bias": (5376,),
            p + "attention.dense.weight": (1792, 1792),
            p + "attention.dense.bias": (1792,),
            p + "mlp.fc1.weight": (15360, 1792),
            p + "mlp.fc1.bias": (15360,),
            p + "mlp.fc2.weight": (1792, 15360),
            p + "mlp.fc2.bias": (1792,),
            p + "post_attention_layernorm.weight": (1792,),
            p + "post_attention_layernorm.bias": (1792,),
        }
    return table


@pytest.mark.parametrize("preset", ["cogagent-9b-20241220", "glm-4v-9b"])
def test_9b_parameters_match_the_reference_table(preset: str) -> None:
    with torch.device("meta"):
        model = CogAgentForConditionalGeneration(CogAgentConfig.from_preset(preset))
    ours = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert ours == _reference_table()  # names, shapes and which layers carry a bias
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.transformer.vision.parameters())
    assert total == 13_906_320_896
    assert vision == 4_506_369_536
    assert total - vision == 9_399_951_360


def test_official_class_name_is_an_alias() -> None:
    assert ChatGLMForConditionalGeneration is CogAgentForConditionalGeneration
    assert CogAgentConfig.from_preset("tiny").architectures == ["ChatGLMForConditionalGeneration"]


# ---- numerics of the parts -----------------------------------------------------------------------------
def test_rmsnorm_multiplies_the_weight_in_fp32_and_rounds_once() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = torch.randn(8, 64).to(torch.bfloat16)
    xf = x.float()
    expected = (norm.weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)
    llama_style = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert not torch.equal(norm(x), llama_style)  # the order matters in the last bit


def _rotate_by_hand(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, pairs: str) -> torch.Tensor:
    """Reference §3.3 written as loops: which dims pair up, angle = pos * 10000^(-2i/rotary_dim)."""
    out = x.clone()
    half = rotary_dim // 2
    for b in range(x.shape[0]):
        for t in range(x.shape[2]):
            for i in range(half):
                angle = positions[b, t].double() * 10000.0 ** (-2 * i / rotary_dim)
                c, s = torch.cos(angle), torch.sin(angle)
                a, z = (2 * i, 2 * i + 1) if pairs == "interleaved" else (i, i + half)
                xa, xz = x[b, :, t, a].double(), x[b, :, t, z].double()
                out[b, :, t, a] = (xa * c - xz * s).float()
                out[b, :, t, z] = (xz * c + xa * s).float()
    return out


@pytest.mark.parametrize(("original_rope", "pairs"), [(True, "interleaved"), (False, "rotate_half")])
def test_rope_pairs_and_pass_through(original_rope: bool, pairs: str) -> None:
    config = CogAgentConfig.from_preset("tiny", original_rope=original_rope)
    rope = RotaryEmbedding(config)
    x = torch.randn(2, 3, 5, config.kv_channels)  # (B, heads, L, D)
    positions = torch.tensor([[0, 1, 2, 2, 7], [3, 4, 4, 4, 100]])
    cos, sin = rope(positions, torch.float32)
    ours = apply_rotary(x, cos, sin, original_rope)
    expected = _rotate_by_hand(x, positions, config.rotary_dim, pairs)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[..., config.rotary_dim :], x[..., config.rotary_dim :])


def test_rope_table_dtype_follows_the_hub_per_style() -> None:
    positions = torch.arange(4)[None]
    original = RotaryEmbedding(CogAgentConfig.from_preset("tiny", original_rope=True))
    cogagent = RotaryEmbedding(CogAgentConfig.from_preset("tiny", original_rope=False))
    forced = RotaryEmbedding(CogAgentConfig.from_preset("tiny", original_rope=False, rope_table_dtype="model"))
    assert original(positions, torch.bfloat16)[0].dtype == torch.bfloat16
    assert cogagent(positions, torch.bfloat16)[0].dtype == torch.float32
    assert forced(positions, torch.bfloat16)[0].dtype == torch.bfloat16


def test_masks_without_padding_are_implicit_and_padded_rows_are_never_empty() -> None:
    assert build_attention_mask(None, 5, 0) == (None, True)
    assert build_attention_mask(torch.ones(2, 6, dtype=torch.long), 1, 5) == (None, False)
    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    mask, is_causal = build_attention_mask(padding, 5, 0)
    assert not is_causal and mask.shape == (2, 1, 5, 5)
    assert mask.any(dim=-1).all()  # no query row without a key: no NaN
    assert mask[0, 0, 3].tolist() == [False, False, True, True, False]  # causal x key padding
    assert mask[1, 0, 2].tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match="length 4 but the keys number 5"):
        build_attention_mask(padding[:, :4], 5, 0)


# ---- the splice --------------------------------------------------------------------------------------
def test_splice_worked_example_by_hand() -> None:
    """Reference §4.2 on a 1-image-token model (image 28, patch 14 -> 2x2 patches -> 1 token)."""
    config = CogAgentConfig.from_preset("tiny", vision_config={"image_size": 28, "num_positions": 5})
    assert config.num_image_tokens == 1
    n = 1
    # row 0: boi at 1; row 1: left padded by 2, boi at 3.
    ids = torch.tensor(
        [
            [TINY.gmask, TINY.boi, TINY.eos, TINY.eoi, 11, 12, 13],
            [TINY.eos, TINY.eos, TINY.gmask, TINY.boi, TINY.eos, TINY.eoi, 11],
        ]
    )
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, -100, 12, 13, -100], [-100, -100, -100, -100, -100, -100, 11]])
    embeds = torch.arange(14.0).view(2, 7, 1)  # text vector of token t in row r = 7r + t
    features = -torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).view(2, n + 2, 1)  # boi*, image, eoi*
    out = splice_image(
        ids, num_image_tokens=n, boi_token_id=TINY.boi, eoi_token_id=TINY.eoi,
        inputs_embeds=embeds, image_features=features, position_ids=position_ids, attention_mask=mask, labels=labels,
    )  # fmt: skip
    assert out.boi_positions.tolist() == [1, 3]
    assert out.inputs_embeds[..., 0].tolist() == [
        [0, -1, -2, -3, 4, 5, 6],  # g, boi*, image, eoi*, text 4.. (text boi/ph/eoi dropped)
        [7, 8, 9, -4, -5, -6, 13],
    ]
    assert out.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]
    assert out.labels.tolist() == [[-100, -100, -100, -100, 12, 13, -100], [-100, -100, -100, -100, -100, -100, 11]]


def test_splice_three_image_tokens_share_one_position() -> None:
    ids = torch.tensor([[TINY.gmask, TINY.sop, TINY.boi, TINY.eos, TINY.eoi, 20, 21]])
    labels = torch.tensor([[-100, -100, -100, -100, -100, 21, 22]])
    out = splice_image(
        ids, num_image_tokens=3, boi_token_id=TINY.boi, eoi_token_id=TINY.eoi,
        position_ids=torch.arange(7)[None], attention_mask=torch.ones(1, 7, dtype=torch.long), labels=labels,
    )  # fmt: skip
    #                      g  sop boi i  i  i  eoi t20 t21
    assert out.position_ids.tolist() == [[0, 1, 2, 3, 3, 3, 4, 5, 6]]
    assert out.labels.tolist() == [[-100, -100, -100, -100, -100, -100, -100, 21, 22]]
    assert out.attention_mask.tolist() == [[1] * 9]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ([TINY.gmask, TINY.sop, 5, 6, 7, 8, TINY.assistant], "row 1 of input_ids holds 0 <|begin_of_image|>"),
        (
            [TINY.boi, TINY.eos, TINY.eoi, TINY.boi, TINY.eos, TINY.eoi, TINY.assistant],
            "row 1 of input_ids holds 2 <|begin_of_image|>",
        ),
        ([TINY.gmask, TINY.boi, TINY.eos, 5, TINY.eoi, 6, TINY.assistant], "must come 2 after"),
    ],
)
def test_every_row_needs_exactly_one_image(tiny, images, row: list[int], message: str) -> None:
    ids = torch.tensor([make_prompt([5, 6], image_at=1)[:7], row])
    with pytest.raises(ValueError, match=message):
        tiny(input_ids=ids, images=images[:2])


def test_image_count_must_match_the_batch(tiny, images) -> None:
    ids = torch.tensor([make_prompt([5, 6])] * 2)
    with pytest.raises(ValueError, match=r"images holds 3 image\(s\) but input_ids has 2 row\(s\)"):
        tiny(input_ids=ids, images=images)
    with pytest.raises(ValueError, match="but images is None"):
        tiny(input_ids=ids)


# ---- forward, loss, padding --------------------------------------------------------------------------
def test_forward_backward_reaches_every_parameter(images) -> None:
    # the plain start: the tiny preset's own starts its vision layers as the identity (gains 0), so their
    # inner weights get gradients only from the second step on (tests/test_tiny_init.py checks that)
    torch.manual_seed(0)
    model = CogAgentForConditionalGeneration(
        CogAgentConfig.from_preset("tiny", vision_config={"readable_init": False})
    ).train()
    ids = torch.tensor([make_prompt(list(range(100, 130)), image_at=3)] * 2)
    labels = ids.clone()
    labels[:, :10] = -100
    out = model(input_ids=ids, images=images[:2], labels=labels, return_logits=True)
    n = model.config.num_image_tokens
    assert out.logits.shape == (2, ids.shape[1] + n - 1, model.config.padded_vocab_size)
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_loss_is_mean_cross_entropy_over_supervised_spliced_positions(tiny, images) -> None:
    ids = torch.tensor([make_prompt(list(range(200, 220)), image_at=2)])
    labels = torch.full_like(ids, -100)
    labels[0, -8:] = ids[0, -8:]
    with torch.no_grad():
        out = tiny(input_ids=ids, images=images[:1], labels=labels)
        changed = labels.clone()
        changed[0, 10] = 77  # only supervised positions count: a new supervised token changes the loss
        out_changed = tiny(input_ids=ids, images=images[:1], labels=changed)
        noise = labels.clone()
        noise[0, :5] = -100  # already ignored
        out_same = tiny(input_ids=ids, images=images[:1], labels=noise)
    n = tiny.config.num_image_tokens
    # By hand: the last 8 text tokens sit at spliced index i + n - 1; logits at index j predict j + 1.
    targets = ids[0, -8:]
    spliced_index = torch.arange(ids.shape[1] - 8, ids.shape[1]) + n - 1
    expected = F.cross_entropy(out.logits[0, spliced_index - 1].float(), targets)
    torch.testing.assert_close(out.loss, expected)
    assert out_same.loss == out.loss
    assert out_changed.loss != out.loss


def test_left_and_right_padding_give_the_same_logits_for_real_tokens(tiny, images) -> None:
    rows = [make_prompt(list(range(300, 340)), image_at=4), make_prompt(list(range(400, 412)), image_at=1)]
    n = tiny.config.num_image_tokens
    with torch.no_grad():
        alone = [
            tiny(input_ids=torch.tensor([row]), images=images[i : i + 1], use_cache=False).logits[0]
            for i, row in enumerate(rows)
        ]
        results = {}
        for side in ("left", "right"):
            logits = tiny(**pad_batch(rows, side), images=images[:2]).logits
            assert torch.isfinite(logits).all()  # fully padded query rows do not produce NaN
            results[side] = logits
    width = max(len(r) for r in rows) + n - 1
    for i, row in enumerate(rows):
        real = len(row) + n - 1
        left = results["left"][i, width - real :]
        right = results["right"][i, :real]
        torch.testing.assert_close(left, alone[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(right, alone[i], atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(images) -> None:
    torch.manual_seed(0)
    model = CogAgentForConditionalGeneration(CogAgentConfig.from_preset("tiny")).train()
    ids = torch.tensor([make_prompt(list(range(500, 540)), image_at=2)] * 2)

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = model(input_ids=ids, images=images[:2], labels=ids).loss
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    enable_activation_checkpointing(model)  # the transformers 5.24 rename, handled in one place
    assert all(layer.gradient_checkpointing for layer in model.transformer.encoder.layers)
    assert all(layer.gradient_checkpointing for layer in model.transformer.vision.transformer.layers)
    ckpt_loss, ckpt_grads = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_tracks_fp32(tiny, images, dtype: torch.dtype) -> None:
    ids = torch.tensor([make_prompt(list(range(600, 630)), image_at=2)])
    half = CogAgentForConditionalGeneration(tiny.config).eval()
    half.load_state_dict(tiny.state_dict())
    half.to(dtype)
    with torch.no_grad():
        reference = tiny(input_ids=ids, images=images[:1]).logits
        logits = half(input_ids=ids, images=images[:1], labels=ids)
    assert logits.logits.dtype == dtype and logits.loss.dtype == torch.float32
    assert _rel_l2(logits.logits.float(), reference) < 0.05


def test_random_init_is_small_normal_with_unit_norms() -> None:
    torch.manual_seed(0)
    model = CogAgentForConditionalGeneration(CogAgentConfig.from_preset("tiny"))
    std = model.transformer.encoder.layers[0].mlp.dense_h_to_4h.weight.std().item()
    assert 0.015 < std < 0.025
    assert torch.equal(model.transformer.encoder.final_layernorm.weight, torch.ones(128))
    assert model.transformer.vision.boi.abs().sum() > 0
    assert model.transformer.encoder.layers[0].self_attention.query_key_value.bias.abs().sum() == 0


def test_a_prefix_in_the_cache_equals_reading_it_as_text(tiny, images) -> None:
    """The path PEFT prefix tuning takes: the cache already holds P entries when the image prompt is read.

    Reading text A into a cache, then the image prompt B with positions P.. and a mask of P + L ones,
    must give the logits that one forward over A + B gives for B's part.
    """
    prefix = [TINY.gmask, TINY.sop, 9, 10, 11]
    prompt = make_prompt(list(range(600, 620)), image_at=2)
    n, p, length = tiny.config.num_image_tokens, len(prefix), len(prompt)
    with torch.no_grad():
        whole = tiny(input_ids=torch.tensor([prefix + prompt]), images=images[:1]).logits[0, p:]
        cache = cache_of(tiny(input_ids=torch.tensor([prefix]), use_cache=True))
        assert cache.get_seq_length() == p
        out = tiny(
            input_ids=torch.tensor([prompt]),
            images=images[:1],
            past_key_values=cache,
            position_ids=torch.arange(p, p + length)[None],
            attention_mask=torch.ones(1, p + length, dtype=torch.long),
            use_cache=True,
        )
    assert cache_of(out).get_seq_length() == p + length + n - 1
    torch.testing.assert_close(out.logits[0], whole, atol=1e-5, rtol=1e-4)
