"""Generation survives whatever a model emits: image marker ids are suppressed by default, and a marker
that does get generated (suppression off) is plain output, because the splice runs once, at prefill."""

from __future__ import annotations

import pytest
import torch
from transformers.generation import LogitsProcessor

from cogagent_nb.model.configuration import CogAgentConfig
from cogagent_nb.model.modeling import CogAgentForConditionalGeneration

EOS, GMASK, SOP, USER, ASSISTANT, BOI, EOI = 768, 770, 772, 775, 776, 778, 779
PROMPT = [GMASK, SOP, USER, 700, BOI, EOS, EOI, *range(701, 720), ASSISTANT]


class ForceAt(LogitsProcessor):
    """Make `token` the only choice at the given decode steps (0 = first generated token)."""

    def __init__(self, prompt_length: int, plan: dict[int, int]) -> None:
        self.prompt_length, self.plan = prompt_length, plan

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        if step in self.plan:
            scores = torch.full_like(scores, -1e9)
            scores[:, self.plan[step]] = 0.0
        return scores


class Favour(LogitsProcessor):
    """Add a large bonus to some ids at every step: an 'untrained model' that loves image markers."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.ids] += 1e4
        return scores


@pytest.fixture(scope="module")
def model() -> CogAgentForConditionalGeneration:
    torch.manual_seed(0)
    return CogAgentForConditionalGeneration(CogAgentConfig.from_preset("tiny", initializer_range=0.2)).eval()


def _inputs(rows: int = 2) -> dict[str, torch.Tensor]:
    """`rows` prompts; odd rows lack one text token and are left-padded. Padding is what makes decode steps
    rebuild the attention mask, where a generated marker used to break the image splice."""
    short = [EOS, *PROMPT[:3], *PROMPT[4:]]  # one pad, then the prompt without the text token before boi
    ids = torch.tensor([PROMPT if i % 2 == 0 else short for i in range(rows)])
    mask = torch.ones_like(ids)
    mask[1::2, 0] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    images = torch.randn(rows, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "images": images}


def test_generated_markers_do_not_crash_the_next_step(model) -> None:
    inputs = _inputs()
    force = ForceAt(len(PROMPT), {0: BOI, 1: EOI, 2: EOI})
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
            logits_processor=[force], suppress_image_markers=False,
        )  # fmt: skip
    new = out[:, len(PROMPT) :]
    assert new[:, :3].tolist() == [[BOI, EOI, EOI]] * 2  # the markers really were generated ...
    assert new.shape == (2, 6)  # ... and three more steps ran after them


def test_tokens_after_a_generated_marker_match_a_fresh_prefill(model) -> None:
    """The step after a generated boi sees each prompt's image once, exactly as one uncached forward does."""
    from cogagent_nb.model.modeling import splice_image

    inputs = _inputs()
    force = ForceAt(len(PROMPT), {0: BOI})
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
            logits_processor=[force], suppress_image_markers=False,
        )  # fmt: skip
        # Reference: one uncached forward over prompt + boi, splicing only the prompt's image.
        ids = out[:, :-1]
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        positions = torch.cat([inputs["position_ids"], inputs["position_ids"][:, -1:] + 1], dim=1)
        spliced = splice_image(
            ids, num_image_tokens=model.config.num_image_tokens, boi_token_id=BOI, eoi_token_id=EOI,
            inputs_embeds=model.transformer.embedding(ids), image_features=model.transformer.vision(inputs["images"]),
            position_ids=positions, attention_mask=mask, boi_positions=(ids == BOI).int().argmax(1),
        )  # fmt: skip
        hidden = model._run_decoder_stack(spliced.inputs_embeds, spliced.position_ids, spliced.attention_mask, 0, None)
        expected = model.transformer.output_layer(hidden[:, -1]).argmax(-1)  # (B,)
    assert out[:, -1].tolist() == expected.tolist()


def test_markers_are_suppressed_by_default(model) -> None:
    inputs = _inputs()
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, logits_processor=[Favour([BOI, EOI])]
        )
        sampled = model.generate(
            **inputs, max_new_tokens=5, min_new_tokens=5, do_sample=True, logits_processor=[Favour([BOI, EOI])]
        )
        unsuppressed = model.generate(
            **inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
            logits_processor=[Favour([BOI, EOI])], suppress_image_markers=False,
        )  # fmt: skip
    for generated in (out, sampled):
        new = generated[:, len(PROMPT) :]
        assert not torch.isin(new, torch.tensor([BOI, EOI])).any(), new
    assert torch.isin(unsuppressed[:, len(PROMPT) :], torch.tensor([BOI, EOI])).all()  # the bonus does bite


def test_the_image_is_spliced_once_per_generate_call(model, monkeypatch) -> None:
    calls = []
    original = CogAgentForConditionalGeneration._splice_images

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CogAgentForConditionalGeneration, "_splice_images", counting)
    with torch.no_grad():
        model.generate(**_inputs(), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert len(calls) == 1
