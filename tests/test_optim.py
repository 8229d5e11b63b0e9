"""BackwardFusedAdamW: torch's AdamW when states are fp32, and the same loss curve with bf16 states (tiny model)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from cogagent_nb.model.configuration import CogAgentConfig
from cogagent_nb.model.modeling import CogAgentForConditionalGeneration
from cogagent_nb.train.optim import BackwardFusedAdamW, stochastic_round_to_bf16


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour() -> None:
    x = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from bf16 1.0 to 1.0078125
    rounded = stochastic_round_to_bf16(x, generator=torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)  # round-to-nearest gives 1.0
    negative = stochastic_round_to_bf16(-x, generator=torch.Generator().manual_seed(1)).float()
    assert negative.mean().item() == pytest.approx(-(1.0 + 2**-10), abs=2e-5)


def _train(optimizer_kind: str, steps: int, dtype: torch.dtype = torch.float32) -> tuple[list[float], torch.nn.Module]:
    """Fit the tiny model to one fixed batch; returns the loss curve."""
    torch.manual_seed(0)
    config = CogAgentConfig.from_preset("tiny")
    model = CogAgentForConditionalGeneration(config).to(dtype).train()
    model.transformer.vision.requires_grad_(False)  # the full-SFT recipe: freezeV
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 700, (2, 20), generator=g)  # BPE ranks of the tiny tokenizer (768)
    ids[:, 3:6] = torch.tensor([config.boi_token_id, config.pad_token_id, config.eoi_token_id])
    size = config.vision_config.image_size
    inputs = {"input_ids": ids, "labels": ids, "images": torch.randn(2, 3, size, size, generator=g).to(dtype)}
    params = [p for p in model.parameters() if p.requires_grad]
    hyper = {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    if optimizer_kind == "torch":
        optimizer = torch.optim.AdamW(params, **hyper)
    else:
        state_dtype = torch.float32 if optimizer_kind == "fused-fp32" else torch.bfloat16
        optimizer = BackwardFusedAdamW(params, **hyper, state_dtype=state_dtype, stochastic_rounding=True)
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, model


def test_fp32_states_reproduce_torch_adamw() -> None:
    reference, ref_model = _train("torch", steps=4)
    fused, fused_model = _train("fused-fp32", steps=4)
    assert fused == pytest.approx(reference, rel=1e-5)
    # atol: a key bias gets a gradient of pure rounding noise (softmax ignores a shift of all scores),
    # which Adam scales up to +-lr per step, so the two orders of fp32 operations part there by ~1e-4.
    for (name, a), b in zip(ref_model.named_parameters(), fused_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-4, msg=name)


def test_gradients_never_outlive_their_update() -> None:
    _, model = _train("fused-bf16", steps=1)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_bf16_states_and_bf16_weights_follow_the_fp32_adamw_loss_curve() -> None:
    reference, _ = _train("torch", steps=25)
    states_bf16, _ = _train("fused-bf16", steps=25)
    everything_bf16, _ = _train("fused-bf16", steps=25, dtype=torch.bfloat16)
    assert reference[-1] < 0.5 * reference[0]  # the curve being compared actually moves
    for curve, tolerance in ((states_bf16, 0.02), (everything_bf16, 0.05)):
        gaps = [abs(a - b) / b for a, b in zip(curve, reference, strict=True)]
        assert max(gaps) < tolerance, (curve, reference)


def test_model_and_states_are_freed_without_removing_the_hooks() -> None:
    """Autograd keeps the hooks where the garbage collector cannot see them: they must not pin the model."""
    losses, model = _train("fused-bf16", steps=1)
    weight = weakref.ref(next(p for p in model.parameters() if p.requires_grad))
    del model
    gc.collect()
    assert weight() is None
