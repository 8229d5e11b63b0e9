"""Inference: the official prompt, stop tokens from the tokenizer, batched = one by one, answers parsed into
actions and pixels, pictures, and `cogagent-nb infer`."""

from __future__ import annotations

import json

import pytest
import torch
from infer_helpers import ScriptedModel
from PIL import Image

import cogagent_nb as cnb
from cogagent_nb.cli import main
from cogagent_nb.data.prompts import build_prompt
from cogagent_nb.infer.generate import (
    Generated,
    _decoded,
    generate_answers,
    generation_kwargs,
    load_for_inference,
    predict,
    predict_batch,
)
from cogagent_nb.viz.predictions import HIT_RGB, MISS_RGB, TARGET_RGB, draw_prediction, prediction_image

ANSWER = (
    "Action: Click the 'Mail' icon.\n"
    "Grounded Operation: CLICK(box=[[100,200,300,400]], element_type='icon', element_info='Mail')\n<<一般操作>>"
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_for_inference(tiny_model_dir)


@pytest.fixture(scope="module")
def screens(demo_data_dir):
    return sorted((demo_data_dir / "images").glob("demo_0000[0-2]_*.png"))[:4]


def test_stop_ids_and_padding_come_from_the_tokenizer(tiny) -> None:
    tokenizer, _ = tiny
    kwargs = generation_kwargs(tokenizer)
    assert kwargs["eos_token_id"] == [tokenizer.eos_id, tokenizer.user_id, tokenizer.observation_id]
    assert kwargs["pad_token_id"] == tokenizer.pad_token_id and kwargs["do_sample"] is False
    assert generation_kwargs(tokenizer, do_sample=True, temperature=0.7)["temperature"] == 0.7


def test_decoding_stops_at_the_first_stop_id(tiny) -> None:
    tokenizer, _ = tiny
    text_ids = tokenizer.encode_text("Action: go")
    stop = {tokenizer.eos_id, tokenizer.user_id, tokenizer.observation_id}
    cut = _decoded(tokenizer, text_ids + [tokenizer.user_id] + tokenizer.encode_text(" junk"), stop)
    assert cut == Generated("Action: go", len(text_ids) + 1, True)
    running = _decoded(tokenizer, text_ids, stop)
    assert running.stopped is False and running.new_tokens == len(text_ids)


def test_batched_generation_equals_one_by_one(tiny, screens) -> None:
    """Left padding: prompts of different lengths in one batch give the answers they give alone (greedy)."""
    tokenizer, model = tiny
    prompts = [
        build_prompt("Open Mail", "Mac", "Action-Operation", ()),
        build_prompt("Open Settings, go to Network and set the DNS server", "WIN", "Status-Plan-Action-Operation",
                     [("CLICK(box=[[1,2,30,40]], element_info='Settings')", "Click Settings.")]),
        build_prompt("Search for cheap flights", "Mobile", "Action-Operation-Sensitive", ()),
    ]  # fmt: skip
    images = screens[:3]
    batched = generate_answers(model, tokenizer, images, prompts, batch_size=3, max_new_tokens=10)
    alone = [generate_answers(model, tokenizer, [i], [p], max_new_tokens=10)[0] for i, p in zip(images, prompts)]
    assert batched == alone
    assert len({g.text for g in batched}) > 1  # the random model really writes different things per sample


def test_predict_parses_the_answer_and_converts_the_box_to_pixels(tiny, screens) -> None:
    tokenizer, _ = tiny
    model = ScriptedModel(tokenizer, lambda prompt: ANSWER)
    image = Image.open(screens[0])
    prediction = predict(model, tokenizer, image, "Open Mail", platform="Mac", history=[("END()", "Done.")])
    width, height = image.size
    assert model.prompts == [build_prompt("Open Mail", "Mac", "Action-Operation-Sensitive", [("END()", "Done.")])]
    assert prediction.operation.name == "CLICK" and prediction.box == (100, 200, 300, 400)
    assert prediction.box_pixels == (round(0.1 * width), round(0.2 * height), round(0.3 * width), round(0.4 * height))
    assert prediction.click == (round(0.2 * width), round(0.3 * height))
    assert prediction.stopped and prediction.error is None
    record = prediction.to_dict()
    assert record["action"] == "CLICK" and record["click"] == list(prediction.click)
    assert json.loads(json.dumps(record)) == record


def test_unparsable_answers_are_kept_with_their_error(tiny, screens) -> None:
    tokenizer, _ = tiny
    model = ScriptedModel(tokenizer, lambda prompt: "Action: click\nGrounded Operation: CLICK(box=[[1,2,3]])")
    prediction = predict(model, tokenizer, screens[0], "Open Mail")
    assert prediction.answer is None and prediction.box_pixels is None and prediction.click is None
    assert "four integers" in prediction.error
    assert "not parsed" in str(prediction)


def test_predict_batch_keeps_per_sample_settings(tiny, screens) -> None:
    tokenizer, _ = tiny
    model = ScriptedModel(tokenizer, lambda prompt: ANSWER)
    out = predict_batch(model, tokenizer, screens[:2], ["a", "b"], platform=["Mac", "Mobile"], batch_size=1)
    assert [p.platform for p in out] == ["Mac", "Mobile"] and [p.task for p in out] == ["a", "b"]
    assert "(Platform: Mobile)" in model.prompts[1]
    with pytest.raises(ValueError, match="1 platforms for 2 tasks"):
        predict_batch(model, tokenizer, screens[:2], ["a", "b"], platform=["Mac"])  # zip dropped sample 2
    with pytest.raises(ValueError, match="3 histories for 2 tasks"):
        predict_batch(model, tokenizer, screens[:2], ["a", "b"], history=[[], [], []])


def test_drawing_colours_hits_and_misses() -> None:
    image = Image.new("RGB", (200, 100), "white")
    hit = draw_prediction(image, (100, 100, 300, 500), target=(50, 50, 400, 600))
    miss = draw_prediction(image, (700, 700, 900, 900), target=(50, 50, 400, 600))
    assert TARGET_RGB in {c for _, c in hit.getcolors(1 << 16)}
    assert HIT_RGB in {c for _, c in hit.getcolors(1 << 16)} and MISS_RGB not in {c for _, c in hit.getcolors(1 << 16)}
    assert MISS_RGB in {c for _, c in miss.getcolors(1 << 16)}
    assert image.getcolors() == [(200 * 100, (255, 255, 255))]  # the input is not drawn on


def test_prediction_image_needs_the_screenshot(tiny, screens) -> None:
    tokenizer, _ = tiny
    prediction = predict(ScriptedModel(tokenizer, lambda p: ANSWER), tokenizer, screens[0], "x")
    assert prediction_image(prediction).size == Image.open(screens[0]).size


def test_cli_infer_prints_draws_and_writes_json(tiny_model_dir, screens, tmp_path, capsys) -> None:
    out, record = tmp_path / "drawn.png", tmp_path / "result.json"
    code = main([
        "infer", str(tiny_model_dir), "--image", str(screens[0]), "--task", "Open Mail", "--platform", "Mac",
        "--history", "CLICK(box=[[1,2,3,4]], element_info='x') || Click x.", "--max-new-tokens", "6",
        "--out", str(out), "--json", str(record),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "0. CLICK(box=[[1,2,3,4]], element_info='x')\tClick x." in printed and "new tokens" in printed
    assert Image.open(out).size == Image.open(screens[0]).size
    assert json.loads(record.read_text())["history"] == [["CLICK(box=[[1,2,3,4]], element_info='x')", "Click x."]]


def test_cli_infer_errors_name_the_file(tiny_model_dir, screens, tmp_path, capsys) -> None:
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert main(["infer", str(no_tokenizer), "--image", str(screens[0]), "--task", "x"]) == 2
    assert f"{no_tokenizer / 'tokenizer.model'}: missing" in capsys.readouterr().err
    assert main(["infer", str(tiny_model_dir), "--image", str(tmp_path / "nope.png"), "--task", "x"]) == 2
    assert f"{tmp_path / 'nope.png'}: no such image" in capsys.readouterr().err
    assert main(["infer", str(tiny_model_dir), "--image", str(screens[0]), "--task", "x", "--merge"]) == 2
    assert "--merge needs an adapter" in capsys.readouterr().err
    assert main(["infer", str(tiny_model_dir), "--image", str(screens[0]), "--task", "x", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: is a folder; give a file name ending in .png" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the prompt would say (Platform: win), which the model never saw
        main(["infer", str(tiny_model_dir), "--image", str(screens[0]), "--task", "x", "--platform", "win"])
    assert "argument --platform: invalid choice: 'win'" in capsys.readouterr().err


def test_cli_infer_draws_into_the_working_folder_not_the_dataset(tiny_model_dir, screens, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["infer", str(tiny_model_dir), "--image", str(screens[0]), "--task", "x", "--max-new-tokens", "2"]) == 0
    assert (tmp_path / f"{screens[0].stem}_prediction.png").is_file()
    assert not (screens[0].parent / f"{screens[0].stem}_prediction.png").exists()


def test_base_model_plus_lora_adapter_in_one_call(tiny_model_dir, screens, tmp_path) -> None:
    """An adapter saved from the tiny model loads on top of the base; merged or not, it answers the same."""
    pytest.importorskip("peft")
    from cogagent_nb.model.loading import load
    from cogagent_nb.model.peft_recipes import add_lora, save_adapter

    _, base = load(tiny_model_dir)
    peft_model = add_lora(base)
    with torch.no_grad():  # make the adapter do something: LoRA's B starts at zero
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    adapter = save_adapter(peft_model, tmp_path / "adapter")
    tokenizer, plain = load_for_inference(tiny_model_dir)
    _, adapted = load_for_inference(tiny_model_dir, adapter=adapter)
    _, merged = load_for_inference(tiny_model_dir, adapter=adapter, merge=True)
    prompt = [build_prompt("Open Mail", "Mac", "Action-Operation", ())]
    texts = [
        generate_answers(m, tokenizer, screens[:1], prompt, max_new_tokens=8)[0].text for m in (plain, adapted, merged)
    ]
    assert texts[1] == texts[2] and texts[0] != texts[1]
    assert type(merged).__name__ == "CogAgentForConditionalGeneration"

    wide = tmp_path / "wide"  # another base: the same preset, 96 wide instead of 128
    config = json.loads((tiny_model_dir / "config.json").read_text())
    cnb.save_pretrained(wide, cnb.init_model(cnb.CogAgentConfig.from_dict({**config, "hidden_size": 96})), tokenizer)
    with pytest.raises(
        ValueError, match=r"adapter: this adapter was trained on a model of another shape .*first difference"
    ):
        load_for_inference(wide, adapter=adapter)


def test_finetune_outputs_are_found_by_kind(tiny_model_dir, tmp_path) -> None:
    """An output_dir's newest checkpoint-N is used; an adapter wins over a full model; nothing is an error."""
    from cogagent_nb.infer.generate import InferenceInputError, find_finetuned, load_finetuned

    run = tmp_path / "run"
    for step in (5, 40, 100):
        (run / f"checkpoint-{step}").mkdir(parents=True)
    (run / "checkpoint-5" / "adapter_config.json").write_text("{}")
    (run / "checkpoint-40" / "adapter_config.json").write_text("{}")
    assert find_finetuned(run) == run / "checkpoint-40"  # checkpoint-100 holds nothing usable
    assert find_finetuned(tiny_model_dir) == tiny_model_dir  # a full model folder
    _, model = load_finetuned("unused-base", tiny_model_dir)
    assert type(model).__name__ == "CogAgentForConditionalGeneration"
    with pytest.raises(InferenceInputError, match=r"empty: holds no adapter_config.json or config.json"):
        load_finetuned(tiny_model_dir, tmp_path / "empty")


def test_sampling_is_an_option_and_repeats_with_a_seed(tiny, screens) -> None:
    tokenizer, model = tiny
    prompt = [build_prompt("Open Mail", "Mac", "Action-Operation", ())]
    sampled = [
        generate_answers(
            model, tokenizer, screens[:1], prompt, max_new_tokens=12, do_sample=True, temperature=1.5, seed=s
        )[0]
        for s in (1, 1, 2)
    ]
    greedy = generate_answers(model, tokenizer, screens[:1], prompt, max_new_tokens=12)[0]
    assert sampled[0] == sampled[1]  # same seed, same answer
    assert len({sampled[0].text, sampled[2].text, greedy.text}) > 1  # sampling really samples
