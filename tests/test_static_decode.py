"""The static KV-cache greedy decoder (`infer/static_decode.py`) emits the token ids `model.generate` emits:
batch of one, left-padded batches with images, rows that stop early, runs that hit max_new_tokens, LoRA;
`generate_answers` answers the same with the switch on and off. On CPU the step runs eagerly; the `gpu`
test checks that the CUDA-graph replay equals the eager step."""

from __future__ import annotations

import copy

import pytest
import torch

from cogagent_nb.infer.static_decode import greedy_generate, static_decoder_for
from cogagent_nb.model import modeling
from cogagent_nb.model.modeling import CogAgentForConditionalGeneration

from conftest import TINY, greedy_test_model, make_prompt, pad_batch

NEW = 12
STOPS = [TINY.eos, TINY.user]
# Three prompts of different lengths, the image at a different index in each: left padding differs per row.
ROWS = [
    make_prompt(list(range(700, 730)), image_at=3),
    make_prompt(list(range(600, 611)), image_at=1),
    make_prompt(list(range(650, 670)), image_at=5),
]


@pytest.fixture(scope="module")
def model() -> CogAgentForConditionalGeneration:
    return greedy_test_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(3))


def generate_ids(model, inputs: dict, images: torch.Tensor, stops: list[int], new: int = NEW) -> torch.Tensor:
    """The new ids of the path the static decoder replaces: `model.generate`, greedy."""
    with torch.no_grad():
        out = model.generate(
            **inputs, images=images, max_new_tokens=new, do_sample=False, eos_token_id=stops, pad_token_id=TINY.eos
        )
    return out[:, inputs["input_ids"].shape[1] :]


def static_ids(model, inputs: dict, images: torch.Tensor, stops: list[int], new: int = NEW, **options) -> torch.Tensor:
    return greedy_generate(
        model, **inputs, images=images, max_new_tokens=new, stop_ids=stops, pad_token_id=TINY.eos, **options
    )


def test_batch_of_one_matches_generate(model, images) -> None:
    inputs = pad_batch(ROWS[:1])
    expected = generate_ids(model, inputs, images[:1], STOPS)
    got = static_ids(model, inputs, images[:1], STOPS)
    assert got.tolist() == expected.tolist()
    assert expected.shape == (1, NEW) and len(set(expected[0].tolist())) > 3  # a real sequence


def test_forward_runs_once_the_steps_use_the_modules(model, images) -> None:
    """Prefill is the one call of `forward` (and of the vision tower); decode steps call the modules."""
    calls = {"forward": 0, "vision": 0, "encoder": 0}
    hooks = [
        module.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, module in (
            ("forward", model),
            ("vision", model.transformer.vision),
            ("encoder", model.transformer.encoder),
        )
    ]
    try:
        static_ids(model, pad_batch(ROWS[:1]), images[:1], [TINY.user], new=5)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"forward": 1, "vision": 1, "encoder": 5}


def test_text_only_batch_matches_generate(model) -> None:
    rows = [[TINY.gmask, TINY.sop, TINY.user, *range(700, 720), TINY.assistant], [TINY.gmask, TINY.sop, TINY.user, 600]]
    inputs = pad_batch(rows)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=STOPS, pad_token_id=TINY.eos)
    assert static_ids(model, inputs, None, STOPS).tolist() == out[:, inputs["input_ids"].shape[1] :].tolist()


def test_left_padded_batch_with_images_matches_generate(model, images) -> None:
    inputs = pad_batch(ROWS)
    expected = generate_ids(model, inputs, images, STOPS)
    assert static_ids(model, inputs, images, STOPS).tolist() == expected.tolist()
    assert len({tuple(row) for row in expected.tolist()}) == 3  # each row writes its own answer
    # without position_ids the decoder derives the tokenizer's positions from the mask
    derived = {k: v for k, v in inputs.items() if k != "position_ids"}
    assert static_ids(model, derived, images, STOPS).tolist() == expected.tolist()


def test_a_row_that_stops_early_emits_pad_while_the_others_continue(model, images) -> None:
    inputs = pad_batch(ROWS)
    free = generate_ids(model, inputs, images, [TINY.user]).tolist()  # TINY.user: never emitted here
    assert TINY.user not in sum(free, [])
    # a stop id that row 0 emits early and row 1 never emits
    stop = next(t for t in free[0][1:6] if t not in free[1] and t != TINY.eos)
    expected = generate_ids(model, inputs, images, [stop])
    got = static_ids(model, inputs, images, [stop])
    assert got.tolist() == expected.tolist()
    end = free[0].index(stop)
    assert got.shape == (3, NEW) and got[0, end].item() == stop
    assert set(got[0, end + 1 :].tolist()) == {TINY.eos}  # finished: pad
    assert got[1].tolist() == free[1]  # row 1 runs on


@pytest.mark.parametrize("check_every", [1, 8])
def test_output_ends_when_the_last_row_stops(model, images, check_every) -> None:
    """Every row stops before max_new_tokens: the output is as wide as `generate`'s, whenever `done` is read."""
    inputs = pad_batch(ROWS)
    free = generate_ids(model, inputs, images, [TINY.user]).tolist()
    stops = [free[0][2], free[1][4], free[2][3]]
    expected = generate_ids(model, inputs, images, stops)
    got = static_ids(model, inputs, images, stops, check_every=check_every)
    assert got.tolist() == expected.tolist()
    assert got.shape[1] < NEW


def test_max_new_tokens_without_a_stop(model, images) -> None:
    inputs = pad_batch(ROWS[1:])
    expected = generate_ids(model, inputs, images[1:], [TINY.user], new=17)
    got = static_ids(model, inputs, images[1:], [TINY.user], new=17)
    assert got.shape == (2, 17) and TINY.user not in got.flatten().tolist()
    assert got.tolist() == expected.tolist()
    assert static_ids(model, inputs, images[1:], [TINY.user], new=1).tolist() == expected[:, :1].tolist()


def test_image_markers_are_never_chosen(model, images) -> None:
    """A head that ranks <|begin_of_image|> first: both paths pass it over (`ImageMarkerSuppressor`)."""
    inputs = pad_batch(ROWS[:2])
    first = generate_ids(model, inputs, images[:2], STOPS)[0, 0].item()
    biased = copy.deepcopy(model)
    with torch.no_grad():  # the boi row doubles the row of row 0's first choice: boi now wins there
        biased.transformer.output_layer.weight[TINY.boi] = 2 * biased.transformer.output_layer.weight[first]
    assert static_ids(biased, inputs, images[:2], STOPS, suppress_ids=())[0, 0].item() == TINY.boi
    expected = generate_ids(biased, inputs, images[:2], STOPS)
    got = static_ids(biased, inputs, images[:2], STOPS)
    assert got.tolist() == expected.tolist() and TINY.boi not in got.flatten().tolist()


def test_lora_model_decodes_as_generate_does(model, images) -> None:
    pytest.importorskip("peft")
    from cogagent_nb.model.peft_recipes import add_lora

    peft_model = add_lora(copy.deepcopy(model)).eval()
    with torch.no_grad():  # make the adapter do something: LoRA's B starts at zero
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    assert static_decoder_for(peft_model) is peft_model.get_base_model()
    inputs = pad_batch(ROWS)
    expected = generate_ids(peft_model, inputs, images, STOPS)
    assert static_ids(peft_model, inputs, images, STOPS).tolist() == expected.tolist()
    with peft_model.disable_adapter():
        assert static_ids(peft_model, inputs, images, STOPS).tolist() != expected.tolist()  # LoRA was used


def test_models_the_decoder_cannot_serve_go_through_generate(model, monkeypatch) -> None:
    pytest.importorskip("peft")
    from cogagent_nb.model.peft_recipes import add_prefix_tuning

    assert static_decoder_for(model) is model
    assert static_decoder_for(add_prefix_tuning(copy.deepcopy(model), num_virtual_tokens=4)) is None
    assert static_decoder_for(torch.nn.Linear(2, 2)) is None
    monkeypatch.setattr(modeling.SPEEDUPS, "static_decode", False)
    assert static_decoder_for(model) is None


def test_generate_answers_is_unchanged_by_the_switch(tiny_model_dir, demo_data_dir, monkeypatch) -> None:
    from cogagent_nb.data.prompts import build_prompt
    from cogagent_nb.infer.generate import generate_answers, load_for_inference

    tokenizer, tiny = load_for_inference(tiny_model_dir)
    screens = sorted((demo_data_dir / "images").glob("demo_0000[0-2]_*.png"))[:3]
    prompts = [
        build_prompt("Open Mail", "Mac", "Action-Operation", ()),
        build_prompt("Open Settings and set the DNS server", "WIN", "Status-Plan-Action-Operation", ()),
        build_prompt("Search for cheap flights", "Mobile", "Action-Operation-Sensitive", ()),
    ]

    def answers() -> list:
        return generate_answers(tiny, tokenizer, screens, prompts, batch_size=2, max_new_tokens=10)

    with monkeypatch.context() as patch:  # on (the default): model.generate must not be called
        patch.setattr(tiny, "generate", lambda *a, **k: pytest.fail("greedy decoding called model.generate"))
        static = answers()
    monkeypatch.setattr(modeling.SPEEDUPS, "static_decode", False)
    assert answers() == static
    assert all(g.new_tokens == 10 for g in static) and len({g.text for g in static}) > 1


@pytest.mark.gpu
def test_cuda_graph_replay_equals_the_eager_step(model, images) -> None:
    cuda = copy.deepcopy(model).cuda()
    inputs = {k: v.cuda() for k, v in pad_batch(ROWS).items()}
    eager = static_ids(cuda, inputs, images.cuda(), STOPS, use_graph=False)
    graphed = static_ids(cuda, inputs, images.cuda(), STOPS, use_graph=True)
    assert graphed.tolist() == eager.tolist()
    assert graphed.tolist() == generate_ids(cuda, inputs, images.cuda(), STOPS).tolist()


@pytest.mark.slow
def test_compiled_step_decodes_as_the_eager_step(model, images) -> None:
    """`compile_step=True` (torch.compile of the step, opt-in) changes speed, not tokens (fp32, CPU here)."""
    inputs = pad_batch(ROWS)
    compiled = static_ids(model, inputs, images, STOPS, use_graph=False, compile_step=True)
    assert compiled.tolist() == static_ids(model, inputs, images, STOPS, use_graph=False).tolist()


@pytest.mark.gpu
def test_compiled_step_in_a_cuda_graph_decodes_as_generate(model, images) -> None:
    cuda = copy.deepcopy(model).cuda()
    inputs = {k: v.cuda() for k, v in pad_batch(ROWS).items()}
    graphed = static_ids(cuda, inputs, images.cuda(), STOPS, use_graph=True, compile_step=True)
    assert graphed.tolist() == generate_ids(cuda, inputs, images.cuda(), STOPS).tolist()
