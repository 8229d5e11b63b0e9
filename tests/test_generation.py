"""Generation with a transformers Cache: the vision tower runs once, decode steps feed one token with
RoPE position L + t at cache index L + n - 1 + t, and cached greedy decoding equals uncached."""

from __future__ import annotations

import pytest
import torch

from cogagent_nb.model.modeling import CogAgentForConditionalGeneration

from conftest import TINY, cache_of, greedy_test_model, make_prompt, pad_batch


@pytest.fixture(scope="module")
def model() -> CogAgentForConditionalGeneration:
    return greedy_test_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))


ROWS = [make_prompt(list(range(700, 730)), image_at=3), make_prompt(list(range(600, 611)), image_at=1)]


def _greedy(model, inputs: dict, images: torch.Tensor, use_cache: bool, new: int = 8) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **inputs, images=images, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=use_cache
        )


@pytest.mark.slow
def test_cached_greedy_generation_equals_uncached(model, images) -> None:
    inputs = pad_batch(ROWS, "left")
    cached = _greedy(model, inputs, images, use_cache=True)
    uncached = _greedy(model, inputs, images, use_cache=False)
    assert cached.shape == (2, inputs["input_ids"].shape[1] + 8)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, -8:].tolist())) > 1  # a real sequence, not one repeated token


def test_padded_batch_generates_what_each_sample_generates_alone(model, images) -> None:
    batch = _greedy(model, pad_batch(ROWS, "left"), images, use_cache=True)
    for i, row in enumerate(ROWS):
        alone = _greedy(model, pad_batch([row], "left"), images[i : i + 1], use_cache=True)
        assert batch[i, -8:].tolist() == alone[0, -8:].tolist()


def test_vision_runs_once_and_decode_feeds_one_token_at_the_right_position(model, images) -> None:
    inputs = pad_batch(ROWS[:1], "left")
    length = inputs["input_ids"].shape[1]
    n = model.config.num_image_tokens
    vision_calls, fed_lengths, rope_positions = [], [], []
    hooks = [
        model.transformer.vision.register_forward_hook(lambda m, a, o: vision_calls.append(o.shape)),
        model.transformer.embedding.register_forward_pre_hook(lambda m, a: fed_lengths.append(a[0].shape[1])),
        model.transformer.rotary_pos_emb.register_forward_pre_hook(lambda m, a: rope_positions.append(a[0].clone())),
    ]
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs, images=images[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False,
                return_dict_in_generate=True,
            )  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    assert len(vision_calls) == 1
    assert fed_lengths == [length, 1, 1, 1, 1]
    # prefill: the spliced positions end at L - 1; decode step t (t = 0, 1, ...) has RoPE position L + t
    assert rope_positions[0].shape[1] == length + n - 1 and rope_positions[0][0, -1].item() == length - 1
    assert [p.item() for p in rope_positions[1:]] == [length, length + 1, length + 2, length + 3]
    # ... while its cache index is L + n - 1 + t: after 4 decode steps the cache holds L + n - 1 + 4 entries
    assert cache_of(out).get_seq_length() == length + n - 1 + 4


def test_forward_with_a_cache_checks_its_inputs(model, images) -> None:
    inputs = pad_batch(ROWS[:1], "left")
    with torch.no_grad():
        prefill = model(**inputs, images=images[:1], use_cache=True)
        next_id = prefill.logits[:, -1:].argmax(-1)
        with pytest.raises(ValueError, match="position_ids are required"):
            model(input_ids=next_id, cache=cache_of(prefill))
        with pytest.raises(ValueError, match="after the image splice"):
            model(
                input_ids=next_id, cache=cache_of(prefill), position_ids=torch.tensor([[99]]),
                attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long),
            )  # fmt: skip


def test_text_only_generation_works_without_images(model) -> None:
    ids = torch.tensor([[TINY.gmask, TINY.sop, TINY.user, 5, 6, 7, TINY.assistant]])
    cached = _greedy(model, {"input_ids": ids}, None, use_cache=True, new=5)
    uncached = _greedy(model, {"input_ids": ids}, None, use_cache=False, new=5)
    assert torch.equal(cached, uncached)
