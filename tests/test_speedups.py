"""The memory and speed measures of `modeling.SPEEDUPS` compute what the plain path computes (fp32, tiny model).

Each measure is switched off and on around the same inputs and the same weights; the GPU benchmark
(`benchmarks/bench_gpu.py --parity`) repeats the LoRA comparison in bf16 on the real size.
"""

from __future__ import annotations

import pytest
import torch

from cogagent_nb.model import modeling
from cogagent_nb.model.configuration import CogAgentConfig
from cogagent_nb.model.modeling import (
    CogAgentForConditionalGeneration,
    causal_lm_loss,
    selective_checkpointing,
    supervised_lm_loss,
)

ALL_OFF = {"supervised_loss": False, "frozen_vision_no_grad": False, "expand_kv_with_mask": False}


@pytest.fixture(scope="module")
def config() -> CogAgentConfig:
    return CogAgentConfig.from_preset("tiny")


def batch(config: CogAgentConfig, rows: int = 2, text: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random text around one boi/placeholder/eoi triple per row; the last 6 ids supervised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 700, (rows, text), generator=g)  # BPE ranks of the tiny tokenizer (768)
    ids[:, 3:6] = torch.tensor([config.boi_token_id, config.pad_token_id, config.eoi_token_id])
    labels = torch.full_like(ids, -100)
    labels[:, -6:] = ids[:, -6:]
    size = config.vision_config.image_size
    return {"input_ids": ids, "labels": labels, "images": torch.randn(rows, 3, size, size, generator=g)}


def loss_and_grads(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def test_supervised_loss_equals_the_full_logits_loss_in_value_and_gradient() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 40, 16, requires_grad=True)
    head = torch.nn.Linear(16, 300, bias=False)
    labels = torch.randint(0, 300, (2, 40))
    labels[:, :25] = -100
    full = causal_lm_loss(head(hidden), labels)
    (full_grad,) = torch.autograd.grad(full, hidden)
    chunked = supervised_lm_loss(hidden, labels, head, chunk_rows=7)  # 30 rows -> 5 chunks, the last short
    (chunked_grad,) = torch.autograd.grad(chunked, hidden)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(chunked_grad, full_grad)


def test_training_step_matches_the_plain_path_and_skips_the_logits(config: CogAgentConfig) -> None:
    torch.manual_seed(0)
    model = CogAgentForConditionalGeneration(config).train()
    inputs = batch(config)
    with modeling.SPEEDUPS.switched(**ALL_OFF):
        plain_loss, plain_grads = loss_and_grads(model, inputs)
    with modeling.SPEEDUPS.switched(expand_kv_with_mask=True):  # every measure on
        fast_loss, fast_grads = loss_and_grads(model, inputs)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain_grads.keys() == fast_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, msg=name)
    assert model(**inputs).logits is None  # a training step does not build (B, L, V) logits
    with torch.no_grad():
        assert model(**inputs).logits is not None  # evaluation keeps them


def test_a_frozen_vision_tower_keeps_no_graph_and_gives_the_same_gradients(config: CogAgentConfig) -> None:
    torch.manual_seed(0)
    model = CogAgentForConditionalGeneration(config).train()
    model.transformer.vision.requires_grad_(False)
    inputs = batch(config)
    with modeling.SPEEDUPS.switched(frozen_vision_no_grad=False):
        plain_loss, plain_grads = loss_and_grads(model, inputs)
    seen: list[bool] = []
    hook = model.transformer.vision.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    fast_loss, fast_grads = loss_and_grads(model, inputs)
    hook.remove()
    assert seen == [False]
    assert fast_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, msg=name)


def test_expanded_kv_with_a_padding_mask_equals_enable_gqa(config: CogAgentConfig) -> None:
    torch.manual_seed(0)
    model = CogAgentForConditionalGeneration(config).eval()
    inputs = batch(config)
    mask = torch.ones_like(inputs["input_ids"])
    mask[1, :4] = 0  # left padding in front of row 1's prompt (the image sits after it)
    inputs["input_ids"][1, :3] = config.pad_token_id
    with torch.no_grad():
        with modeling.SPEEDUPS.switched(expand_kv_with_mask=False):
            grouped = model(**inputs, attention_mask=mask).logits
        with modeling.SPEEDUPS.switched(expand_kv_with_mask=True):
            expanded = model(**inputs, attention_mask=mask).logits
    torch.testing.assert_close(expanded, grouped)


def test_selective_checkpointing_gives_the_same_loss_and_gradients(config: CogAgentConfig) -> None:
    torch.manual_seed(0)
    model = CogAgentForConditionalGeneration(config).train()
    inputs = batch(config)
    plain_loss, plain_grads = loss_and_grads(model, inputs)
    selective_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.transformer.vision.transformer.layers)
    ckpt_loss, ckpt_grads = loss_and_grads(model, inputs)
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)


def test_switched_restores_the_switches_and_rejects_unknown_names() -> None:
    before = modeling.SPEEDUPS.supervised_loss
    with modeling.SPEEDUPS.switched(supervised_loss=not before):
        assert modeling.SPEEDUPS.supervised_loss is (not before)
    assert modeling.SPEEDUPS.supervised_loss is before
    with pytest.raises(AttributeError, match="supervised_los"):
        with modeling.SPEEDUPS.switched(supervised_los=False):
            pass
