"""`evaluate` and `cogagent-nb evaluate`: the right prompt for each sample, the metrics, the groups, the
grounding variants (blank / shuffled screenshots), the report files, and errors that name the file."""

from __future__ import annotations

import contextlib
import json

import pytest
from infer_helpers import ScriptedModel
from PIL import Image

from cogagent_nb.cli import main
from cogagent_nb.infer.evaluate import blank_like, evaluate, model_images, read_eval_samples
from cogagent_nb.infer.generate import load_for_inference
from cogagent_nb.viz.predictions import plot_confusion, plot_scores, show_box_predictions


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_for_inference(tiny_model_dir)[0]


@pytest.fixture(scope="module")
def test_file(demo_data_dir):
    return demo_data_dir / "test.jsonl"


def _references(test_file) -> dict[str, str]:
    return {s.prompt: s.reference for s in read_eval_samples(test_file)}


def test_an_oracle_scores_everything_right(tokenizer, test_file) -> None:
    references = _references(test_file)
    model = ScriptedModel(tokenizer, lambda prompt: references[prompt])
    report = evaluate(model, tokenizer, test_file, limit=12, batch_size=5, progress=False)
    assert len(report.rows) == 12 and len(model.prompts) == 12
    summary = report.summary
    assert summary["parse_rate"] == summary["step_success"] == summary["click_in_box"] == 1.0
    assert set(report.by_platform) <= {"Mac", "WIN", "Mobile"} and sum(g["n"] for g in report.by_format.values()) == 12
    assert all(ref == next(iter(row)) for ref, row in report.confusion.items())  # only the diagonal


def test_a_model_that_always_clicks_the_corner(tokenizer, test_file, tmp_path) -> None:
    corner = "Action: Click.\nGrounded Operation: CLICK(box=[[0,0,10,10]], element_info='corner')"
    report = evaluate(ScriptedModel(tokenizer, lambda p: corner), tokenizer, test_file, limit=10, progress=False)
    references = [json.loads(line) for line in test_file.read_text().splitlines()[:10]]
    n_click = sum("Grounded Operation: CLICK(" in r["messages"][1]["content"] for r in references)
    assert report.summary["parse_rate"] == 1.0 and report.summary["click_in_box"] == 0.0
    assert report.confusion.get("CLICK", {}).get("CLICK", 0) == n_click
    assert report.summary["type_accuracy"] == pytest.approx(n_click / 10)
    saved = json.loads(report.write_json(tmp_path / "r.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(report.summary)) and len(saved["samples"]) == 10
    for figure in (show_box_predictions(report).figure, plot_scores(report), plot_confusion(report.confusion).figure):
        figure.savefig(tmp_path / "f.png")


def test_blank_and_shuffled_screenshots(test_file) -> None:
    samples = read_eval_samples(test_file, limit=4)
    true = model_images(samples, "screenshots")
    blank = model_images(samples, "blank")
    shuffled = model_images(samples, "shuffled")
    assert [b.size for b in blank] == [t.size for t in true]
    assert all(len(b.getcolors()) == 1 for b in blank)
    assert [s.tobytes() for s in shuffled] == [t.tobytes() for t in true[2:] + true[:2]]
    image = Image.new("RGB", (4, 2), (10, 20, 30))
    image.putpixel((0, 0), (90, 100, 110))
    assert blank_like(image).getpixel((3, 1)) == (20, 30, 40)


def test_the_model_sees_the_chosen_images(tokenizer, test_file) -> None:
    references = _references(test_file)
    model = ScriptedModel(tokenizer, lambda prompt: references[prompt])
    evaluate(model, tokenizer, test_file, limit=2, images="blank", progress=False)
    assert all(float(image.flatten(1).std(dim=1).max()) < 1e-5 for image in model.images)  # flat per channel


def test_cli_evaluate_writes_json_and_figure(tiny_model_dir, test_file, tmp_path, capsys) -> None:
    out = tmp_path / "report.json"
    code = main([
        "evaluate", str(tiny_model_dir), str(test_file), "--limit", "3", "--batch-size", "2",
        "--max-new-tokens", "4", "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "click_in_box" in printed and "reference \\ predicted" in printed
    assert json.loads(out.read_text())["summary"]["n"] == 3
    assert Image.open(out.with_suffix(".png")).size[0] > 100


def test_cli_evaluate_errors_name_the_file(tiny_model_dir, test_file, tmp_path, capsys) -> None:
    missing = tmp_path / "missing.jsonl"
    assert main(["evaluate", str(tiny_model_dir), str(missing)]) == 2
    assert f"{missing}: no such data file" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_model_dir), str(test_file.parent)]) == 2
    assert f"{test_file.parent}: is a folder; give one of its .jsonl files" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(test_file.read_text().splitlines()[0] + '\n{"messages": [}\n')
    assert main(["evaluate", str(tiny_model_dir), str(broken)]) == 2
    assert f"{broken}:2: json: invalid JSON" in capsys.readouterr().err
    no_tokenizer = tmp_path / "model"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    assert main(["evaluate", str(no_tokenizer), str(test_file), "--limit", "1"]) == 2
    assert f"{no_tokenizer / 'tokenizer.model'}: missing" in capsys.readouterr().err


def test_reference_without_operation_is_a_data_error(test_file, tmp_path) -> None:
    record = json.loads(test_file.read_text().splitlines()[0])
    record["messages"][1]["content"] = "Action: nothing to do."
    bad = tmp_path / "no-op.jsonl"
    bad.write_text(json.dumps(record) + "\n")
    (tmp_path / "images").symlink_to(test_file.parent / "images")
    with pytest.raises(ValueError, match=rf"{bad}:1: messages\[1\].content: .*no 'Grounded Operation:' line"):
        read_eval_samples(bad)


def test_samples_keep_their_file_line_and_a_foreign_prompt_is_named(test_file, tmp_path) -> None:
    lines = test_file.read_text().splitlines()
    (tmp_path / "images").symlink_to(test_file.parent / "images")
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_text(lines[0] + "\n\n" + lines[1] + "\n")  # a blank line 2 (the validator warns, skips it)
    assert [s.line for s in read_eval_samples(spaced)] == [1, 3]
    assert [s.line for s in read_eval_samples(spaced, limit=1)] == [1]
    with pytest.raises(ValueError, match="limit 0: expected a number of samples of at least 1"):
        read_eval_samples(spaced, limit=0)
    record = json.loads(lines[0])
    record["messages"][0]["content"] = "Please open the settings."  # trains, but names no platform or format
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"{foreign}:1: messages\[0\].content: .*official prompt"):
        read_eval_samples(foreign)


def test_cli_evaluate_refuses_unwritable_outputs_and_unreadable_images_before_generating(
    tiny_model_dir, test_file, tmp_path, capsys, monkeypatch
) -> None:
    (tmp_path / "r.json").write_text("{}")  # a file where a folder should be
    for argv, words in (
        (["--json", str(tmp_path)], "is a folder; give a file name ending in .json"),
        (["--json", str(tmp_path / "r.json" / "x.json"), "--limit", "1"], "a file stands where its folder should be"),
        (["--figure", str(tmp_path / "f.txt")], "--figure"),
        (["--batch-size", "0"], "argument --batch-size: 0 must be at least 1"),
    ):
        with pytest.raises(SystemExit) if argv[0] == "--batch-size" else contextlib.nullcontext():
            assert main(["evaluate", str(tiny_model_dir), str(test_file), *argv]) == 2
        assert words in capsys.readouterr().err, argv
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "fake.png").write_text("not a png")
    record = json.loads(test_file.read_text().splitlines()[0])
    record["messages"][0]["image"] = "images/fake.png"
    fake = tmp_path / "fake.jsonl"
    fake.write_text(json.dumps(record) + "\n")
    fetched = []
    monkeypatch.setattr("cogagent_nb.cli._load_model", lambda args: fetched.append(args) or pytest.fail("loaded"))
    assert main(["evaluate", str(tiny_model_dir), str(fake)]) == 2  # before the model loads
    field = f"{fake}:1: messages[0].image: {tmp_path / 'images' / 'fake.png'} is not a readable image"
    assert field in capsys.readouterr().err and fetched == []


def test_cli_evaluate_makes_the_folder_of_its_json(tiny_model_dir, test_file, tmp_path) -> None:
    out = tmp_path / "runs" / "eval.json"  # README's `--json runs/eval.json`, where runs/ does not exist yet
    assert (
        main(
            [
                "evaluate",
                str(tiny_model_dir),
                str(test_file),
                "--limit",
                "1",
                "--max-new-tokens",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["summary"]["n"] == 1


def test_baselines_guess_boxes_without_the_screenshot(test_file, tmp_path) -> None:
    from cogagent_nb.infer.evaluate import baseline_report

    one = tmp_path / "one.jsonl"
    lines = test_file.read_text().splitlines()
    boxed = next(line for line in lines if "box=" in json.loads(line)["messages"][1]["content"])
    one.write_text(boxed + "\n")
    (tmp_path / "images").symlink_to(test_file.parent / "images")
    for kind in ("most_common_box", "text_only"):  # trained on the sample itself: the guess is its own box
        assert baseline_report(one, one, kind).summary["click_in_box"] == 1.0
    train = test_file.parent / "train.jsonl"
    text_only = baseline_report(train, test_file, "text_only").summary
    common = baseline_report(train, test_file, "most_common_box").summary
    assert text_only["type_accuracy"] == 1.0 and text_only["n_with_box"] == common["n_with_box"] > 0
    assert 0.0 < common["click_in_box"] < text_only["click_in_box"] < 1.0  # the label says a lot on the demo set
    with pytest.raises(ValueError, match="kind must be one of"):
        baseline_report(train, test_file, "random")
