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
