"""The tiny preset's start for training from scratch (`cogagent_nb.model.tiny_init`, issue 10)."""

from __future__ import annotations

import torch

import cogagent_nb as cnb
from cogagent_nb.model.configuration import CogAgentConfig
from cogagent_nb.model.loading import init_model, save_pretrained
from cogagent_nb.model.tiny_init import fan_in_language_model, smooth_positions


def _tiny(readable: bool = True):
    vision = {} if readable else {"readable_init": False}
    return init_model(CogAgentConfig.from_preset("tiny", vision_config=vision))


def test_smooth_positions_tell_every_patch_apart_and_their_lowest_frequency_is_monotonic() -> None:
    table = smooth_positions(8, 64, norm=8.0)
    assert table.shape == (64, 64)
    assert torch.allclose(table.norm(dim=1), torch.full((64,), 8.0))
    grid = table.view(8, 8, 64)
    # the lowest frequency's cosine (column 0: x, column 32: y) falls steadily across the grid
    assert (grid[:, 1:, 0] < grid[:, :-1, 0]).all() and (grid[1:, :, 32] < grid[:-1, :, 32]).all()
    distances = torch.cdist(table, table) + torch.eye(64) * 100
    assert distances.min() > 1.0  # no two patches share a position vector


def test_the_tiny_tower_starts_with_identity_layers_and_smooth_positions() -> None:
    tower = _tiny().transformer.vision
    positions = tower.patch_embedding.position_embedding.weight[1:]
    assert torch.allclose(positions, smooth_positions(16, positions.shape[1]))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        embedded = tower.patch_embedding(images)
        assert torch.equal(tower.transformer(embedded), embedded)  # both layers start as the identity


def test_where_an_image_vector_comes_from_is_linearly_readable_only_with_the_readable_start() -> None:
    """A linear map from an image vector (RMS-normalised, as the language model's first norm sees it) to
    its grid cell, fitted on 12 noise screens and scored on 4 others: that is how a language-model head
    reads a position. The plain start (normal 0.02 everywhere) scrambles it; that held issue 10 back."""
    torch.manual_seed(0)
    screens = torch.randn(16, 3, 224, 224) * 0.5
    gy, gx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    cells = torch.stack([gx.flatten(), gy.flatten()], 1)  # (64, 2), row-major like the image tokens

    def held_out_r2(model) -> float:
        with torch.no_grad():
            vectors = model.transformer.vision(screens)[:, 1:-1]  # (16, 64, H) without boi/eoi
        vectors = vectors / vectors.pow(2).mean(-1, keepdim=True).sqrt()
        features = torch.cat([vectors, torch.ones(*vectors.shape[:2], 1)], dim=-1)
        fit = torch.linalg.lstsq(features[:12].reshape(-1, features.shape[-1]), cells.repeat(12, 1)).solution
        error = (features[12:] @ fit - cells).pow(2).sum()
        return float(1 - error / (cells - cells.mean(0)).pow(2).sum() / 4)

    assert held_out_r2(_tiny()) > 0.8
    assert held_out_r2(_tiny(readable=False)) < 0.5


def test_identity_start_layers_learn_from_the_second_step_on() -> None:
    """Gains at 0 stop the gradient into a vision layer's attention and MLP at the first step only."""
    model = _tiny().train()
    layer = model.transformer.vision.transformer.layers[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.tensor([[model.config.boi_token_id, 0, model.config.eoi_token_id] + list(range(100, 110))] * 2)
    batch = {"input_ids": ids, "images": torch.randn(2, 3, 224, 224), "labels": ids.clone()}
    grads = []
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        grads.append(layer.attention.query_key_value.weight.grad.abs().sum().item())
        assert layer.input_layernorm.weight.grad.abs().sum() > 0  # the gain itself always learns
        optimizer.step()
    assert grads[0] == 0 and grads[1] > 0


def test_loaded_weights_are_not_reinitialised(tmp_path) -> None:
    """Loading a trained tiny model keeps its weights: the readable start only applies to fresh ones."""
    tokenizer, model = cnb.load(cnb.make_tiny_model(tmp_path / "tiny", seed=3))
    with torch.no_grad():
        model.transformer.vision.transformer.layers[0].input_layernorm.weight.fill_(0.5)
        model.transformer.vision.conv.weight.fill_(0.25)
    trained = save_pretrained(tmp_path / "trained", model, tokenizer)
    _, again = cnb.load(trained)
    assert torch.all(again.transformer.vision.transformer.layers[0].input_layernorm.weight == 0.5)
    assert torch.all(again.transformer.vision.conv.weight == 0.25)


def test_the_9b_presets_have_no_readable_start() -> None:
    for name in ("cogagent-9b-20241220", "glm-4v-9b"):
        vision = CogAgentConfig.from_preset(name).vision_config
        assert "readable_init" not in vision.extra and vision.scaling_factor == 8


def test_fan_in_language_model_redraws_only_the_decoder_layers_at_fan_in_scale() -> None:
    """The alternative start of `bench_readout.py --lm-init fan-in`: decoder matrices at 1/sqrt(fan-in)."""
    model = _tiny()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fan_in_language_model(model, seed=1)
    for name, p in model.named_parameters():
        redrawn = name.startswith("transformer.encoder.layers.") and name.endswith(".weight") and p.dim() == 2
        if redrawn:
            expected = p.shape[1] ** -0.5  # fan-in: 128 for attention and h->4h, 256 for 4h->h
            assert abs(p.std().item() - expected) < 0.1 * expected, (name, p.std().item(), expected)
            assert abs(before[name].std().item() - 0.02) < 0.002, name  # it was the preset's 0.02
        else:
            assert torch.equal(p, before[name]), f"{name} changed"
    again = fan_in_language_model(_tiny(), seed=1)
    layer = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    assert torch.equal(dict(again.named_parameters())[layer], dict(model.named_parameters())[layer])


def test_fan_in_language_model_leaves_loaded_weights_alone(tmp_path) -> None:
    _, model = cnb.load(cnb.make_tiny_model(tmp_path / "tiny", seed=3))
    weight = model.transformer.encoder.layers[0].self_attention.query_key_value.weight
    before = weight.detach().clone()
    fan_in_language_model(model)
    assert torch.equal(weight, before)
