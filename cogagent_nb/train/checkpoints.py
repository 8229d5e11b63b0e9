"""Checkpoints that are either complete or absent, and the RESUME argument of the official command line.

The Trainer writes `output_dir/checkpoint-N/` file by file (weights, optimizer, scheduler, RNG states,
trainer_state.json). A process killed half way leaves a folder that *looks* like a checkpoint, and the
official script's `yes` (newest `checkpoint-*` by number) would resume from it and crash or, worse,
resume from a model without its optimizer. Here a checkpoint is published atomically:

1. every process writes into `output_dir/.tmp-checkpoint-N/` (staging, ignored by everything);
2. rank 0 writes `COMPLETE` (the file list with sizes), fsyncs every file and the folder;
3. rank 0 renames the folder to `checkpoint-N` (one `rename(2)`, atomic on POSIX file systems) and
   fsyncs `output_dir`; only then are older checkpoints rotated away (save_total_limit).

A checkpoint folder counts as complete when it has `COMPLETE`, or, for folders written by the plain
Transformers Trainer or the official script, `trainer_state.json` (which the Trainer writes last).

RESUME (the fourth argument of finetune.py): `yes` = the newest complete checkpoint, a number N =
`checkpoint-N`, `no` or absent = from scratch. A checkpoint that does not exist is an error listing
those that do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

PREFIX = "checkpoint-"
STAGING_PREFIX = ".tmp-checkpoint-"
COMPLETE_MARKER = "COMPLETE"
REPLACED_SUFFIX = ".old"  # checkpoint-N.old: a step being saved again moves its older copy here first
_CHECKPOINT = re.compile(rf"^{PREFIX}(\d+)$")


class ResumeError(ValueError):
    """RESUME names a checkpoint that is not there (or is not complete)."""


def is_complete(folder: Path) -> bool:
    """A published checkpoint: our marker, or the Trainer's last-written file for foreign checkpoints."""
    return (folder / COMPLETE_MARKER).is_file() or (folder / "trainer_state.json").is_file()


def list_checkpoints(output_dir: str | Path, *, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and (is_complete(child) or not complete_only):
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume(resume: str | int | None, output_dir: str | Path) -> Path | None:
    """Turn the RESUME argument into a checkpoint folder (or None = train from scratch)."""
    if resume is None:
        return None
    text = str(resume).strip().lower()
    if text in ("", "no", "false"):
        return None
    checkpoints = list_checkpoints(output_dir)
    existing = ", ".join(str(step) for step, _ in checkpoints) or "none"
    if text in ("yes", "true"):
        if not checkpoints:
            raise ResumeError(f"RESUME=yes: no complete checkpoint in {output_dir} (existing: {existing})")
        return checkpoints[-1][1]
    if not text.isdigit():
        raise ResumeError(f"RESUME={resume!r}: expected yes, no or a checkpoint number")
    by_step = dict(checkpoints)
    if int(text) not in by_step:
        half = [p.name for s, p in list_checkpoints(output_dir, complete_only=False) if s == int(text)]
        interrupted = staging_dir(output_dir, int(text)).exists()
        why = " (it is incomplete)" if half else " (its save was interrupted)" if interrupted else ""
        raise ResumeError(
            f"RESUME={resume}: {Path(output_dir) / (PREFIX + text)} does not exist{why}; "
            f"complete checkpoints in {output_dir}: {existing}"
        )
    return by_step[int(text)]


def check_resume_matches(checkpoint: Path, peft_type: str | None, config_source: str) -> None:
    """A checkpoint resumes only the kind of run that wrote it: a LoRA or prefix-tuning adapter, or a full
    model. Otherwise the optimizer state does not fit the parameters, and torch says so only as "loaded
    state dict contains a parameter group that doesn't match the size of optimizer's group"."""
    adapter_config = checkpoint / "adapter_config.json"
    written = (
        json.loads(adapter_config.read_text(encoding="utf-8")).get("peft_type") if adapter_config.is_file() else None
    )
    if written != peft_type:
        kinds = {None: "full fine-tuning", "LORA": "LoRA", "PREFIX_TUNING": "prefix tuning"}
        raise ResumeError(
            f"RESUME: {checkpoint} was written by {kinds.get(written, written)}, but {config_source} trains with "
            f"{kinds.get(peft_type, peft_type)}; resume with the config that wrote it, or start a new output_dir"
        )


def staging_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{STAGING_PREFIX}{step}"


def remove_stale_staging(output_dir: str | Path) -> list[Path]:
    """Delete staging folders left by a killed run (they were never published). Rank 0 only. (The older
    copies that a killed re-save left are settled earlier, before RESUME is resolved: `restore_replaced`.)"""
    output_dir = Path(output_dir)
    stale = sorted(output_dir.glob(f"{STAGING_PREFIX}*")) if output_dir.is_dir() else []
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def restore_replaced(output_dir: str | Path) -> None:
    """`checkpoint-N.old` exists only if a re-save of step N was killed inside `publish`: alone, it is the
    last complete copy of step N and gets its name back; beside a new `checkpoint-N`, it is deleted.

    Run before RESUME is resolved, so that `yes` or `N` finds the restored checkpoint. Every rank may run
    it at once (there is no process group yet): a rename that another rank made first is not an error.
    """
    output_dir = Path(output_dir)
    for old in sorted(output_dir.glob(f"checkpoint-*{REPLACED_SUFFIX}")) if output_dir.is_dir() else []:
        final = old.with_name(old.name.removesuffix(REPLACED_SUFFIX))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            continue
        try:
            os.replace(old, final)
        except FileNotFoundError:  # another rank restored it a moment ago
            pass


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: Path, final: Path) -> Path:
    """Mark `staging` complete, flush it to disk, and rename it to `final` (replacing an older `final`)."""
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    listing = {str(p.relative_to(staging)): p.stat().st_size for p in files}
    marker = staging / COMPLETE_MARKER
    marker.write_text(json.dumps(listing, indent=1) + "\n", encoding="utf-8")
    for path in [*files, marker]:
        _fsync(path)
    for folder in sorted({p.parent for p in files} | {staging}, key=lambda p: -len(p.parts)):
        _fsync(folder)
    if final.exists():  # re-saving the same step after a resume: the old one goes only now
        old = final.with_name(final.name + REPLACED_SUFFIX)
        shutil.rmtree(old, ignore_errors=True)  # left by a killed re-save (`restore_replaced`)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync(final.parent)
    return final


def fault_injection(point: str, step: int) -> None:
    """Testing hook: `COGAGENT_NB_KILL_AT=save:N` SIGKILLs this process at `point` of step N's save.

    The atomic-checkpoint test uses it to kill a real training process in the middle of a save, after
    the weights were written and before the checkpoint was published. Unset, it does nothing.
    """
    wanted = os.environ.get("COGAGENT_NB_KILL_AT")
    if wanted and wanted == f"{point}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
