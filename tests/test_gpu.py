"""The real model's widths on a real accelerator: a CogAgent-9B with one layer per tower.

Every matrix has its 9B shape (vocabulary 151 552, hidden 4096, 32 query / 2 KV heads, FFN 13 696; EVA2-CLIP
hidden 1792, FFN 15 360, 1120x1120 images, 1600 image tokens), only the two stacks are cut to one layer
each: a batch of two 1120x1120 samples peaks at ~12 GiB and a step takes seconds (measured on an H200 with
torch 2.11 and transformers 5.17). It shows what the tiny CPU model cannot: the bf16 CUDA kernels (SDPA with
GQA, the 6401-token vision attention) at full width, and gradients reaching every 9B-shaped parameter.
Run with `make test-gpu`; `make test` skips it without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from cogagent_nb.model.configuration import CogAgentConfig
from cogagent_nb.model.modeling import CogAgentForConditionalGeneration

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def nine_b_one_layer_per_tower() -> CogAgentConfig:
    """The cogagent-9b-20241220 preset with `num_layers` 1 and vision `num_hidden_layers` 1."""
    fields = CogAgentConfig.from_preset("cogagent-9b-20241220").to_dict()
    fields["num_layers"] = 1
    fields["vision_config"]["num_hidden_layers"] = 1
    return CogAgentConfig.from_dict(fields)


def test_9b_width_forward_and_backward_on_cuda_in_bf16() -> None:
    config = nine_b_one_layer_per_tower()
    assert (config.hidden_size, config.padded_vocab_size, config.num_image_tokens) == (4096, 151552, 1600)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CogAgentForConditionalGeneration(config).to(torch.bfloat16).train()
    size = config.vision_config.image_size
    text = torch.randint(0, 150000, (2, 24), generator=torch.Generator().manual_seed(0))
    specials = [config.boi_token_id, config.pad_token_id, config.eoi_token_id]
    ids = torch.cat([text[:, :4], torch.tensor([specials] * 2), text[:, 4:]], dim=1).cuda()  # (2, 27)
    images = torch.randn(2, 3, size, size, device="cuda", dtype=torch.bfloat16)

    torch.cuda.reset_peak_memory_stats()
    out = model(input_ids=ids, images=images, labels=ids, use_cache=False)
    out.loss.backward()

    spliced = ids.shape[1] + config.num_image_tokens - 1
    assert out.logits.shape == (2, spliced, config.padded_vocab_size)
    assert out.logits.dtype == torch.bfloat16
    # a small random init spreads probability widely: the loss is within a few nats of ln(vocabulary) = 11.9
    assert abs(out.loss.item() - math.log(config.padded_vocab_size)) < 3.0, out.loss.item()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == [], f"no finite gradient for {no_grad}"
    zero = [name for name, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert zero == [], f"gradient is zero for {zero}"
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    assert peak_gib < 40, f"peak memory {peak_gib:.1f} GiB for one layer per tower"
