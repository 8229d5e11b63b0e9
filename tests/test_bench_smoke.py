"""The GPU benchmark runs end to end on the tiny model on CPU, so that it cannot rot between GPU runs."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_gpu


def test_bench_gpu_runs_every_kind_of_case_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    cases = "lora-before,lora,full_sft_one_gpu,qlora,inference"
    argv = ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--cases", cases, "--seq-len", "80"]
    argv += ["--new-tokens", "2", "--decode-batches", "1", "--parity", "--attention", "--padding", "--out", str(out)]
    assert bench_gpu.main(argv) == 0
    report = json.loads(out.read_text())
    assert list(report["cases"]) == cases.split(",")
    assert "skipped" in report["cases"]["qlora"]  # bitsandbytes 4-bit needs CUDA
    for name in ("lora-before", "lora", "full_sft_one_gpu"):
        case = report["cases"][name]
        assert case["step_s"] > 0 and case["mfu"] > 0 and len(case["losses"]) == 1, name
    assert report["cases"]["full_sft_one_gpu"]["optimizer"].startswith("BackwardFusedAdamW")
    inference = report["cases"]["inference"]
    for key in ("decode_ms_per_step_bs1", "decode_ms_per_step_bs1_generate"):  # static decoder, generate
        assert inference[key] is not None, key  # CPU timings too noisy to bound
    assert inference["decode_same_ids_bs1"] == 1.0  # fp32: both paths choose the same ids
    assert report["gqa_mask_attention"]["expanded_kv_s"] > 0
    padding = report["padding"]
    assert padding["samples"] > 300 and padding["waste_grouped"] < padding["waste_data_order"]
    assert padding["subset_s_data_order"] > 0 and padding["subset_s_grouped"] > 0
    assert report["parity"]["passed"]  # fp32: the optimised LoRA step equals the plain one


def test_flop_formula_reproduces_issue_9s_official_lora_step() -> None:
    """222.6 TFLOP for the official LoRA step at 2048 spliced tokens (issue 9)."""
    from cogagent_nb.model.configuration import CogAgentConfig

    config = CogAgentConfig.from_preset("cogagent-9b-20241220")
    assert round(bench_gpu.model_flops("lora", config, 2048, 1) / 1e12, 1) == 222.6


def test_bench_readout_runs_each_task_and_writes_json(tmp_path: Path) -> None:
    from benchmarks import bench_readout

    cases = (("rectangle", "whole-smooth", "preset"), ("labelled", "digits", "fan-in"), ("gui", "digits", "preset"))
    for task, numbers, lm_init in cases:
        out = tmp_path / f"{task}.json"
        argv = ["--task", task, "--numbers", numbers, "--lm-init", lm_init, "--steps", "2", "--evals", "1,2"]
        argv += ["--eval-samples", "2", "--vision-lr-scale", "0.3" if task == "labelled" else "1.0"]
        report = bench_readout.main(argv + ["--batch-size", "2", "--first-digit-weight", "3", "--json", str(out)])
        assert json.loads(out.read_text())["rows"] == report["rows"]
        assert [row["step"] for row in report["rows"]] == [1, 2], task
        for row in report["rows"]:
            assert 0.0 <= row["click_in_box"] <= 1.0 and row["loss"] > 0, (task, row)


def test_bench_learning_runs_and_writes_the_table_and_the_targets(tmp_path: Path) -> None:
    from benchmarks import bench_learning

    out = tmp_path / "learning.json"
    argv = ["--max-steps", "2", "--batch-size", "2", "--eval-episodes", "2", "--untrained-episodes", "1"]
    argv += ["--baseline-episodes", "4", "--lm-init", "fan-in", "--vision-lr-scale", "0.5"]
    report = bench_learning.main(argv + ["--json", str(out)])
    written = json.loads(out.read_text())
    assert written["results"] == report["results"] and written["training"]["steps"] == 2
    assert set(report["results"]) == {"untrained", "most common box", "text-only guess", "blank image", "trained"}
    assert set(written["by_target"]) == {"trained", "blank image"} and written["by_target"]["trained"]
    assert written["args"]["lm_init"] == "fan-in" and written["args"]["vision_lr_scale"] == 0.5  # arguments recorded


def test_bench_readout_up_weights_exactly_the_first_digit_of_each_number() -> None:
    """weight w adds (w - 1) x the first digits' summed cross-entropy / supervised tokens to the mean loss."""
    import random

    import torch

    from benchmarks import bench_readout as br
    from cogagent_nb.data.bpe import read_tokenizer_model
    from cogagent_nb.data.encoding import TrainingCollator, encode_conversation
    from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer
    from cogagent_nb.model.configuration import CogAgentConfig, vocabulary_fields
    from cogagent_nb.model.loading import init_model

    tokenizer = ChatGLM4Tokenizer(TINY_TOKENIZER_FILE, image_size=br.SIZE)
    config = CogAgentConfig.from_preset("tiny", **vocabulary_fields(len(read_tokenizer_model(TINY_TOKENIZER_FILE))))
    model = init_model(config, seed=0).float()
    sample = br.rectangle_conversation(random.Random(5), "rectangle", 1)
    batch = TrainingCollator(tokenizer)(
        [encode_conversation(sample["messages"], tokenizer, num_image_tokens=config.num_image_tokens, name="s")]
    )
    first_digits = br.FirstDigits(tokenizer, "cpu")
    targets = batch["labels"][:, 1:]
    first = first_digits(targets)
    box = sample["messages"][1]["content"].split("[[")[1].split("]]")[0].split(",")
    assert [tokenizer.decode([i]) for i in targets[first].tolist()] == [number[0] for number in box]

    only_first = torch.full_like(batch["labels"], -100)
    only_first[:, 1:][first] = targets[first]
    with torch.no_grad():
        plain = br.weighted_loss(model, batch, first_digits, 1.0)
        first_mean = model(**{**batch, "labels": only_first}).loss
        weighted = br.weighted_loss(model, batch, first_digits, 4.0)
    share = first.sum() / (targets != -100).sum()
    torch.testing.assert_close(weighted, plain + 3.0 * first_mean * share)


def test_bench_readout_lets_every_reference_answer_finish() -> None:
    """The generation budget covers the longest answer of the samples scored, in every task."""
    from benchmarks import bench_readout as br
    from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer

    tokenizer = ChatGLM4Tokenizer(TINY_TOKENIZER_FILE, image_size=br.SIZE)
    for task in ("rectangle", "labelled", "gui", "episodes"):
        source = br.conversations(task, 3, seed=11)
        references = [next(source)["messages"][1]["content"] for _ in range(24)]
        longest = max(len(tokenizer.encode_text(answer)) for answer in references)
        assert br.answer_budget(tokenizer, references) == longest + 16, task
    assert longest > 60  # the episodes' longer formats, which a fixed 60 cut short


def test_bench_readout_refuses_wrong_arguments_by_name(capsys) -> None:
    import pytest

    from benchmarks import bench_readout

    for argv, words in (
        (["--steps", "10", "--evals", "5,20"], "--evals 20 is after the last step"),
        (["--evals", "3,x"], "expected step numbers"),
        (["--evals", "0,3"], "steps count from 1"),
        (["--objects", "9"], "1 to 6 rectangles"),
        (["--vision-lr-scale", "-0.3"], "--vision-lr-scale -0.3: expected 0"),
    ):
        with pytest.raises(SystemExit):
            bench_readout.parse_args(argv)
        assert words in capsys.readouterr().err, argv


def test_bench_learning_refuses_a_negative_vision_rate(capsys) -> None:
    import pytest

    from benchmarks import bench_learning

    with pytest.raises(SystemExit):
        bench_learning.parse_args(["--vision-lr-scale", "-1"])
    assert "--vision-lr-scale -1.0: expected 0" in capsys.readouterr().err
