"""What every benchmark's JSON starts with: which code ran, where, when and with what arguments.

BENCHMARKS.md records each figure with machine, command, date and commit; these helpers put the same
facts into the JSON the scripts write, so a result file can be traced without its log.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The short commit of the checkout ("unknown" outside git, e.g. a device copy of the tree).

    Read it before the run starts: the tree may change while a long benchmark runs."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(device: str | None = None) -> str:
    """CPU architecture, core count and load average (a shared machine runs slower), plus the GPU's name."""
    text = f"{platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    if str(device).startswith("cuda"):
        import torch

        text += f", {torch.cuda.get_device_name()}"
    return text


def header(benchmark: str, commit: str, args: argparse.Namespace) -> dict[str, Any]:
    """The first keys of a result file: benchmark, date (UTC), commit, machine and the arguments."""
    return {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": machine(getattr(args, "device", None)),
        "args": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
    }


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    """Write `report` to `path` (folders made as needed); nothing when no path was asked for."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
