"""How the tiny preset's vision tower starts when it is trained from scratch (issue 10).

The 9B is never initialised at random: its weights come from the checkpoint. The course's tiny model
is, and a random EVA2-CLIP tower hides *where* things are from the language model for thousands of
steps (docs/BENCHMARKS.md, "Learning"). Three choices fix that, each measured there:

- patch positions as a 2-D sin-cos table instead of independent random vectors, so that a position
  can be read from a vector by a smooth function rather than learnt patch by patch;
- the post-norm layers start as the identity (their sublayer-norm gains at 0), so they do not blur
  those positions before they have learnt anything;
- the 2x2 conv and the GLU adapter drawn at std 1/sqrt(fan-in) instead of 0.02, so the signal
  reaches the language model instead of shrinking at every matrix.

The config switches it on with the project key `readable_init` in `vision_config` (kept in `extra`;
`configuration.TINY_VISION` sets it). `CogAgentPreTrainedModel._init_weights` calls `init_tower`;
weights read from a checkpoint are marked as loaded and left alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

POSITION_NORM = 8.0
"""Norm of each patch position vector: about the norm of a patch's content at the start, so a vector
says *where* as clearly as *what*."""


def smooth_positions(grid: int, width: int, norm: float = POSITION_NORM) -> torch.Tensor:
    """A (grid * grid, width) table of 2-D sin-cos positions, row-major like the patches.

    width / 4 frequencies per axis, multiples of the lowest, which is half a period across the grid: the
    low frequencies change slowly and monotonically (coarse position is a smooth function of the vector),
    the high ones tell neighbouring patches apart.
    """
    if width % 4:
        raise ValueError(f"smooth 2-D positions need a width divisible by 4, got {width}")
    gy, gx = torch.meshgrid(torch.arange(float(grid)), torch.arange(float(grid)), indexing="ij")
    x, y = gx.flatten()[:, None], gy.flatten()[:, None]
    freq = (torch.arange(width // 4) + 1) * math.pi / (2 * grid)
    table = torch.cat([(x * freq).cos(), (x * freq).sin(), (y * freq).cos(), (y * freq).sin()], dim=1)
    return table * norm / table.norm(dim=1, keepdim=True)


def _loaded(weight: torch.Tensor) -> bool:
    return bool(getattr(weight, "_is_hf_initialized", False))


@torch.no_grad()
def init_tower(tower: nn.Module) -> None:
    """Re-initialise an `EVA2CLIPModel` (after its default init) so that positions reach its output."""
    positions = tower.patch_embedding.position_embedding.weight  # (1 + grid^2, width): cls first
    if not _loaded(positions):
        grid = round((positions.shape[0] - 1) ** 0.5)
        positions[1:] = smooth_positions(grid, positions.shape[1]).to(positions)
    for layer in tower.transformer.layers:  # x + LN(sublayer(x)): a gain of 0 makes the layer the identity
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not _loaded(norm.weight):
                norm.weight.zero_()
    adapter = tower.linear_proj
    for module in (tower.conv, adapter.linear_proj, adapter.dense_h_to_4h, adapter.gate_proj, adapter.dense_4h_to_h):
        if not _loaded(module.weight):
            module.weight.normal_(0.0, module.weight[0].numel() ** -0.5)


@torch.no_grad()
def fan_in_language_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw the language model's layer matrices at std 1/sqrt(fan-in) instead of `initializer_range`.

    Not the preset's start: an alternative that `benchmarks/bench_readout.py --lm-init fan-in` and
    `bench_learning.py --lm-init fan-in` measure. At 0.02 the tiny decoder's attention starts almost
    uniform (logits ~0.05 apart), and at peak lr 1e-3 telling screen elements apart by their look ("click
    the blue one") stays near chance for 96k samples; at fan-in scale one draw of four learnt it (81%),
    the others stayed at 3-26%. What does learn it in every draw measured is the rate: at 3e-4 the preset's
    0.02 start reaches 45-68% after 77k samples in three seeds out of three, and this start 70%
    (docs/BENCHMARKS.md, "Sixth session" and "Seventh session"). So the preset keeps 0.02.

    Only the decoder layers' weight matrices change (attention, dense, MLP); embeddings, the output layer,
    biases, norms and the vision tower keep their values. Weights read from a checkpoint are left alone.
    The draws follow `seed` alone (one generator on the weights' device), so a run is repeatable.
    Returns `model`, for chaining.
    """
    generator = None
    for layer in model.transformer.encoder.layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear) and not _loaded(module.weight):
                if generator is None:
                    generator = torch.Generator(device=module.weight.device).manual_seed(seed)
                module.weight.normal_(0.0, module.weight.shape[1] ** -0.5, generator=generator)
    return model
