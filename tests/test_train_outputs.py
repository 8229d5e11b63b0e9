"""The official lora.yaml runs as it is (only max_steps/eval_steps/output_dir overridden) through
`cogagent-nb finetune`, evaluates by generation with the GUI metrics, and leaves outputs that are usable
at once: a loss curve, a summary line, an adapter that `cnb.load(base, adapter=)` reads and that
`cogagent-nb merge` folds into a complete official-format model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogagent_nb.train.config import load_config


@pytest.fixture(scope="module")
def official_lora_run(tiny_model_dir, tiny_train_data, repo_root, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("official-lora") / "output"
    command = [sys.executable, "-m", "cogagent_nb", "finetune", str(tiny_train_data), str(tiny_model_dir)]
    command += ["configs/lora.yaml", "no"]
    for override in ("training_args.max_steps=2", "training_args.eval_steps=2", f"training_args.output_dir={out}"):
        command += ["--set", override]
    command += ["--set", "training_args.generation_config.max_new_tokens=16"]
    done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_the_official_lora_file_trains_evaluates_and_summarises(official_lora_run):
    out, stdout = official_lora_run
    assert stdout.startswith("# resolved config (configs/lora.yaml)")
    summary = stdout.strip().splitlines()[-1]
    assert summary.startswith("finetune: 2 steps in ") and "final loss" in summary
    assert summary.endswith(f"LoRA adapter saved to {out / 'checkpoint-2'}")
    assert (out / "loss_curve.png").stat().st_size > 1000
    history = json.loads((out / "loss_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [2]  # logging_steps 10, plus the last step
    evals = [e for e in history if "eval_parse_rate" in e]
    assert evals and {"eval_type_accuracy", "eval_click_in_box", "eval_step_success"} <= set(evals[0])
    assert "test (dev.jsonl): test_n=4" in stdout  # test_file predicted once after training


def test_the_adapter_loads_with_cnb_load_and_merges_into_an_official_model(
    official_lora_run, tiny_model_dir, repo_root
):
    from cogagent_nb.model.loading import load

    out, _ = official_lora_run
    adapter = out / "checkpoint-2"
    tokenizer, adapted = load(tiny_model_dir, adapter=adapter)
    assert type(adapted).__name__ == "PeftModelForCausalLM"
    merged_dir = out / "merged"
    command = [sys.executable, "-m", "cogagent_nb", "merge", str(tiny_model_dir), str(out), str(merged_dir)]
    done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]  # the run folder: its newest adapter, as infer takes it
    assert f"merged {adapter} into" in done.stdout
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["architectures"] == ["ChatGLMForConditionalGeneration"] and config["model_type"] == "chatglm"
    assert (merged_dir / "tokenizer.model").is_file() and (merged_dir / "generation_config.json").is_file()
    merged_tokenizer, merged = load(merged_dir)
    ids = torch.tensor([[tokenizer.gmask_id, tokenizer.sop_id, tokenizer.user_id, 5, 6, 7, tokenizer.assistant_id]])
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
    assert merged_tokenizer.encode_text("Click OK") == tokenizer.encode_text("Click OK")
    base_logits = load(tiny_model_dir)[1](input_ids=ids).logits
    assert not torch.allclose(base_logits, merged(input_ids=ids).logits, atol=1e-5), "training changed nothing"


def test_merge_refuses_a_used_folder_and_leaves_nothing_half_written(
    official_lora_run, tiny_model_dir, repo_root, tmp_path, monkeypatch
):
    from cogagent_nb.train import export

    adapter = official_lora_run[0] / "checkpoint-2"
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    command = [sys.executable, "-m", "cogagent_nb", "merge", str(tiny_model_dir), str(adapter), str(tmp_path / "used")]
    done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert (
        done.stderr.strip()
        == f"cogagent-nb merge: error: {tmp_path / 'used'}: not empty; choose a new folder for the merged model"
    )

    def disk_full(base_dir, out_dir):
        raise OSError(28, "No space left on device")

    (tmp_path / ".tmp-merged-99999").mkdir()  # left by a merge that was killed (SIGKILL: no cleanup)
    monkeypatch.setattr(export, "copy_side_files", disk_full)  # fails after the weights were written
    with pytest.raises(OSError, match="No space left"):
        export.merge_lora(tiny_model_dir, adapter, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]  # no half model, no staging folder


def _rows(table) -> dict[str, tuple[int, int]]:
    return {part: (t, n) for part, t, n in table.rows}


def test_freeze_v_and_lora_scope_decide_what_trains(tiny_model_dir, repo_root):
    from cogagent_nb.model.peft_recipes import trainable_parameters_table
    from cogagent_nb.train.finetune import build_model

    sft = load_config(repo_root / "configs" / "tiny_sft.yaml")
    rows = _rows(trainable_parameters_table(build_model(tiny_model_dir, sft, echo=False)[1]))
    for part, (trainable, total) in rows.items():
        expected = 0 if part.startswith("vision") else total
        assert trainable == expected, f"freezeV=true, full fine-tuning: {part} has {trainable}/{total} trainable"
    lora = load_config(repo_root / "configs" / "tiny_lora.yaml", ["lora_scope=language"])
    rows = _rows(trainable_parameters_table(build_model(tiny_model_dir, lora, echo=False)[1]))
    assert "LoRA adapters, vision tower" not in rows and rows["LoRA adapters, language model"][0] > 0
    both = load_config(repo_root / "configs" / "tiny_lora.yaml", ["freezeV=true"])
    rows = _rows(trainable_parameters_table(build_model(tiny_model_dir, both, echo=False)[1]))
    assert rows["LoRA adapters, vision tower"][0] == 0, "freezeV after PEFT freezes the vision adapters too"


def test_prefix_tuning_trains_evaluates_and_loads(tiny_model_dir, tiny_train_data, repo_root, tmp_path):
    from cogagent_nb.model.loading import load
    from cogagent_nb.train.finetune import finetune
    from cogagent_nb.train.report import preview_answers

    result = finetune(
        tiny_train_data,
        tiny_model_dir,
        repo_root / "configs" / "tiny_lora.yaml",
        overrides=[
            "peft_config={peft_type: PREFIX_TUNING, task_type: CAUSAL_LM, num_virtual_tokens: 8}",
            "training_args.max_steps=2",
            "training_args.eval_strategy=steps",
            "training_args.eval_steps=2",
            "training_args.generation_config.max_new_tokens=4",
            "data_config.test_file=null",
            f"training_args.output_dir={tmp_path}",
        ],
    )
    assert result.summary().endswith(f"prefix-tuning adapter saved to {tmp_path / 'checkpoint-2'}")
    assert "eval_parse_rate" in result.eval_metrics
    tokenizer, model = load(tiny_model_dir, adapter=result.checkpoint)
    rows = preview_answers(model, tokenizer, tiny_train_data / "dev.jsonl", [0, 1], max_new_tokens=4)
    assert len(rows) == 2 and all(isinstance(r["model"], str) for r in rows)


def test_gradient_checkpointing_changes_memory_not_losses(tiny_model_dir, tiny_train_data, repo_root, tmp_path):
    from transformers import TrainerCallback

    from cogagent_nb.train.finetune import finetune

    seen = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            layers = model.get_base_model().transformer.encoder.layers
            seen.append(all(layer.gradient_checkpointing for layer in layers))

    runs = {}
    for flag in ("false", "true"):
        runs[flag] = finetune(
            tiny_train_data,
            tiny_model_dir,
            repo_root / "configs" / "tiny_lora.yaml",
            overrides=[
                "training_args.max_steps=2",
                f"training_args.gradient_checkpointing={flag}",  # dropout RNG is replayed in the recompute
                "training_args.save_strategy=no",
                "data_config.test_file=null",
                f"training_args.output_dir={tmp_path / flag}",
            ],
            callbacks=[Probe()],
        ).losses
    assert seen == [False, False, True, True], "the flag must switch checkpointing on in the decoder layers"
    steps = [[s for s, _ in runs[flag]] for flag in runs]
    assert steps == [[1, 2], [1, 2]]
    assert [loss for _, loss in runs["true"]] == pytest.approx([loss for _, loss in runs["false"]], rel=1e-6)


def test_bf16_weights_train_in_bf16(tiny_model_dir, tiny_train_data, repo_root, tmp_path):
    """dtype bfloat16 (what `auto` picks on a GPU): the weights stay bf16 through a step, no fp32 copy."""
    from transformers import TrainerCallback

    from cogagent_nb.train.finetune import finetune

    dtypes = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            dtypes.append({p.dtype for p in model.parameters()})
            dtypes.append({s.dtype for group in optimizer.state.values() for s in group.values() if s.dim() > 0})

    result = finetune(
        tiny_train_data,
        tiny_model_dir,
        repo_root / "configs" / "tiny_sft.yaml",
        overrides=[
            "dtype=bfloat16",
            "training_args.max_steps=1",
            "training_args.save_strategy=no",
            "data_config.test_file=null",
            f"training_args.output_dir={tmp_path}",
        ],
        callbacks=[Probe()],
    )
    assert dtypes == [{torch.bfloat16}, {torch.bfloat16}], dtypes
    assert result.final_loss is not None and 5 < result.final_loss < 9


def test_gui_metrics_count_each_eval_sample_once():
    """Distributed evaluation pads the last batch with repeated samples; the metrics must not count them twice."""
    from types import SimpleNamespace

    import numpy as np

    from cogagent_nb.train.trainer import compute_gui_metrics

    right = "Action: Open Mail.\nGrounded Operation: CLICK(box=[[10,10,50,50]], element_info='Mail')"
    wrong = "Action: Type.\nGrounded Operation: TYPE(box=[[600,600,700,700]], text='x', element_info='x')"
    trainer = SimpleNamespace(references={"val": [right, right]})
    texts = {1: right, 2: wrong}  # fake token ids 1 and 2 decode to these answers
    trainer.decode_predictions = lambda ids: [texts[int(row[0])] for row in np.asarray(ids)]
    prediction = SimpleNamespace(predictions=np.array([[1], [2], [1]]), label_ids=np.array([[0], [1], [0]]))
    metrics = compute_gui_metrics(trainer, "val")(prediction)
    assert metrics["n"] == 2 and metrics["type_accuracy"] == 0.5 and metrics["click_in_box"] == 0.5
