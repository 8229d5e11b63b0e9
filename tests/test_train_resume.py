"""Exact resume and atomic checkpoints, on real (tiny) training runs.

Exact: a run stopped after step 3 and resumed with RESUME=yes logs, at steps 4-6, the same losses bit for
bit as a run that never stopped (data order, dropout RNG, scheduler and optimizer restored), for LoRA
(dropout 0.1 makes the RNG matter) and full fine-tuning. Atomic: a process SIGKILLed in the middle of a
save leaves the previous checkpoint complete, RESUME=yes picks that one, and training then finishes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from cogagent_nb.train.callbacks import StopAfterSteps
from cogagent_nb.train.checkpoints import COMPLETE_MARKER, STAGING_PREFIX, list_checkpoints, resolve_resume

SIX_STEPS = ["training_args.max_steps=6", "training_args.save_steps=3", "data_config.test_file=null"]


@pytest.mark.parametrize("recipe", ["tiny_lora", "tiny_sft"])
def test_resumed_run_logs_the_same_losses_bit_for_bit(recipe, tiny_model_dir, tiny_train_data, repo_root, tmp_path):
    from cogagent_nb.train.finetune import finetune

    config = repo_root / "configs" / f"{recipe}.yaml"
    straight = finetune(
        tiny_train_data, tiny_model_dir, config, overrides=[*SIX_STEPS, f"training_args.output_dir={tmp_path / 'a'}"]
    )
    interrupted = [*SIX_STEPS, f"training_args.output_dir={tmp_path / 'b'}"]
    first = finetune(tiny_train_data, tiny_model_dir, config, overrides=interrupted, callbacks=[StopAfterSteps(3)])
    assert [s for s, _ in first.losses] == [1, 2, 3]
    second = finetune(tiny_train_data, tiny_model_dir, config, "yes", overrides=interrupted)
    assert [s for s, _ in second.losses] == [4, 5, 6], "resume must continue at step 4"
    assert first.losses + second.losses == straight.losses  # exact float equality, every step
    assert second.checkpoint == tmp_path / "b" / "checkpoint-6"


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(tiny_model_dir, tiny_train_data, repo_root, tmp_path):
    out = tmp_path / "run"
    base = [sys.executable, "finetune.py", str(tiny_train_data), str(tiny_model_dir), "configs/tiny_lora.yaml"]
    overrides = ["training_args.max_steps=4", "training_args.save_steps=2", "data_config.test_file=null"]
    overrides.append(f"training_args.output_dir={out}")
    args = [part for o in overrides for part in ("--set", o)]
    env = {**os.environ, "COGAGENT_NB_KILL_AT": "save:4"}  # SIGKILL after writing step 4, before publishing it
    killed = subprocess.run(base + args, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out / f"{STAGING_PREFIX}4").is_dir(), "the half-written save is in its staging folder"
    assert [step for step, _ in list_checkpoints(out)] == [2]
    listing = json.loads((out / "checkpoint-2" / COMPLETE_MARKER).read_text())
    for name, size in listing.items():  # the previous checkpoint is intact, file by file
        assert (out / "checkpoint-2" / name).stat().st_size == size, name
    assert resolve_resume("yes", out) == out / "checkpoint-2"
    with pytest.raises(ValueError, match=r"checkpoint-4 does not exist \(its save was interrupted\).*: 2"):
        resolve_resume(4, out)

    resumed = subprocess.run(base + ["yes", *args], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    assert [step for step, _ in list_checkpoints(out)] == [2, 4]
    assert not list(out.glob(f"{STAGING_PREFIX}*")), "stale staging folders are removed on the next run"


def test_a_checkpoint_resumes_only_the_kind_of_run_that_wrote_it(tmp_path):
    from cogagent_nb.train.checkpoints import ResumeError, check_resume_matches

    full, lora = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    full.mkdir()
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    check_resume_matches(full, None, "sft.yaml")
    check_resume_matches(lora, "LORA", "lora.yaml")
    with pytest.raises(
        ResumeError, match=r"checkpoint-2 was written by full fine-tuning, but lora.yaml trains with LoRA"
    ):
        check_resume_matches(full, "LORA", "lora.yaml")
    with pytest.raises(
        ResumeError, match=r"checkpoint-4 was written by LoRA, but sft.yaml trains with full fine-tuning"
    ):
        check_resume_matches(lora, None, "sft.yaml")


def test_resume_argument(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / COMPLETE_MARKER).write_text("{}")
    assert resolve_resume("yes", tmp_path) == tmp_path / "checkpoint-4"  # 6 is half written
    assert resolve_resume("2", tmp_path) == tmp_path / "checkpoint-2"
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("no", tmp_path) is None
    with pytest.raises(ValueError, match=r"checkpoint-3 does not exist; complete checkpoints in .*: 2, 4"):
        resolve_resume(3, tmp_path)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume("yes", tmp_path / "empty")
    with pytest.raises(ValueError, match="expected yes, no or a checkpoint number"):
        resolve_resume("latest", tmp_path)


def test_a_killed_re_save_leaves_a_checkpoint_to_resume_from(tmp_path):
    """A re-save of step N moves checkpoint-N to checkpoint-N.old, then publishes the new copy. Killed
    between the two, only .old is left: the next run gives it its name back. A leftover .old beside a
    published copy is deleted, and does not stop the next re-save of that step."""
    from cogagent_nb.train.checkpoints import publish, remove_stale_staging, restore_replaced

    def staged(step: int, text: str):
        folder = tmp_path / f"{STAGING_PREFIX}{step}"
        folder.mkdir()
        (folder / "weights.txt").write_text(text)
        return folder

    (tmp_path / "checkpoint-4.old").mkdir()  # killed after the first rename
    (tmp_path / "checkpoint-4.old" / COMPLETE_MARKER).write_text("{}")
    staged(4, "never published")
    remove_stale_staging(tmp_path)  # finetune settles both: the .old before RESUME, the staging after loading
    restore_replaced(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]
    assert resolve_resume("yes", tmp_path) == tmp_path / "checkpoint-4"

    (tmp_path / "checkpoint-4.old").mkdir()  # killed after the second rename, before the old copy went
    publish(staged(4, "second"), tmp_path / "checkpoint-4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / "weights.txt").read_text() == "second"


def test_the_best_checkpoint_is_recorded_where_it_was_published(tiny_model_dir, tiny_train_data, repo_root, tmp_path):
    """With metric_for_best_model, trainer_state.json names the published folder, not the staging one, so
    that save_total_limit keeps the best checkpoint after a resume too."""
    from cogagent_nb.train.finetune import finetune

    overrides = ["training_args.max_steps=2", "training_args.save_steps=1", "training_args.eval_strategy=steps"]
    overrides += ["training_args.eval_steps=1", "training_args.metric_for_best_model=parse_rate"]
    overrides += ["training_args.save_total_limit=1", "training_args.generation_config.max_new_tokens=2"]
    overrides += ["data_config.test_file=null", f"training_args.output_dir={tmp_path}"]
    finetune(tiny_train_data, tiny_model_dir, repo_root / "configs" / "tiny_lora.yaml", overrides=overrides)
    for _, folder in list_checkpoints(tmp_path):
        best = json.loads((folder / "trainer_state.json").read_text())["best_model_checkpoint"]
        assert best.startswith(f"{tmp_path}/checkpoint-") and STAGING_PREFIX not in best, best
        assert (tmp_path / best.rsplit("/", 1)[1]).is_dir(), "the best checkpoint survives save_total_limit"


def test_resume_yes_finds_a_checkpoint_whose_re_save_was_killed(tiny_model_dir, tiny_train_data, repo_root, tmp_path):
    """Only checkpoint-2.old is left (killed between publish's two renames): RESUME=yes resumes from step 2."""
    from cogagent_nb.train.finetune import finetune

    overrides = ["training_args.save_steps=2", "data_config.test_file=null", f"training_args.output_dir={tmp_path}"]
    config = repo_root / "configs" / "tiny_lora.yaml"
    finetune(tiny_train_data, tiny_model_dir, config, overrides=[*overrides, "training_args.max_steps=2"])
    (tmp_path / "checkpoint-2").rename(tmp_path / "checkpoint-2.old")
    resumed = finetune(
        tiny_train_data, tiny_model_dir, config, "yes", overrides=[*overrides, "training_args.max_steps=3"]
    )
    assert resumed.first_step == 2 and resumed.steps == 3
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 3] and not list(tmp_path.glob("*.old"))


def test_a_fresh_run_into_a_used_folder_is_warned_about(tmp_path, capsys):
    from cogagent_nb.train.finetune import _warn_about_earlier_checkpoints

    _warn_about_earlier_checkpoints(tmp_path / "new")
    (tmp_path / "checkpoint-4").mkdir()
    _warn_about_earlier_checkpoints(tmp_path)  # half written: not a checkpoint anyone resumes from
    assert capsys.readouterr().err == ""
    (tmp_path / "checkpoint-4" / COMPLETE_MARKER).write_text("{}")
    _warn_about_earlier_checkpoints(tmp_path)
    assert f"warning: {tmp_path} holds checkpoint-4 of an earlier run" in capsys.readouterr().err


def test_a_resume_at_max_steps_says_that_no_step_ran(tmp_path):
    from cogagent_nb.train.finetune import FinetuneResult

    done = FinetuneResult(tmp_path, None, 4, 4, 0.1, None, [], {}, {}, "LORA")
    assert done.summary().endswith("nothing saved (no step ran)")  # it said "save_strategy: no"


def test_a_missing_checkpoint_stops_the_command_before_the_model_loads(tiny_train_data, repo_root, tmp_path):
    command = [
        sys.executable,
        "finetune.py",
        str(tiny_train_data),
        str(tmp_path / "no-model"),
        "configs/tiny_lora.yaml",
    ]
    command += ["7", "--set", f"training_args.output_dir={tmp_path}"]
    done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "RESUME=7" in done.stderr and "complete checkpoints in" in done.stderr
    assert "no-model" not in done.stderr  # the model folder was never opened
