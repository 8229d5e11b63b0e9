"""Run the course: every notebook through papermill, executed copies into one run folder.

`make course` calls this with the tiny CPU defaults. The same entry point takes papermill parameters
for full-size runs, e.g.

    python -m cogagent_nb.course --out runs/gpu notebooks/03_*.ipynb -p model_dir /models/cogagent-9b
    python -m cogagent_nb.course --out runs/gpu notebooks/*.ipynb -f params.yaml

Notebooks execute with their own folder as working directory, exactly as under nbval and JupyterLab,
so relative paths such as `../data/CogAgentData` mean the same everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml


@dataclass
class NotebookRun:
    """What happened to one notebook of the course."""

    notebook: str
    output: str
    seconds: float
    ok: bool
    error: str = ""


def run_notebook(notebook: Path, out_dir: Path, parameters: dict) -> NotebookRun:
    """Execute one notebook with papermill; a failure is recorded, not raised, so later lessons still run."""
    import papermill as pm

    output = out_dir / notebook.name
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(notebook),
            str(output),
            parameters=parameters,
            cwd=str(notebook.parent),
            kernel_name="python3",
            progress_bar=False,
        )
        ok, error = True, ""
    except Exception as exc:  # papermill raises PapermillExecutionError with the failing cell
        ok, error = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return NotebookRun(str(notebook), str(output), round(time.perf_counter() - start, 1), ok, error)


def run_course(notebooks: list[Path], out_dir: Path, parameters: dict | None = None) -> list[NotebookRun]:
    """Run the notebooks in order, print a summary table and write `summary.json` beside the outputs."""
    from tqdm.auto import tqdm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for notebook in tqdm(notebooks, desc="course", unit="notebook"):
        runs.append(run_notebook(notebook, out_dir, parameters or {}))
    print(format_summary(runs))
    (out_dir / "summary.json").write_text(json.dumps([asdict(r) for r in runs], indent=2))
    return runs


def format_summary(runs: list[NotebookRun]) -> str:
    """A plain-text table: one line per notebook with its time and status."""
    width = max((len(Path(r.notebook).name) for r in runs), default=8)
    lines = [f"{'notebook':<{width}}  {'seconds':>7}  status"]
    for r in runs:
        status = "ok" if r.ok else f"FAILED  {r.error}"
        lines.append(f"{Path(r.notebook).name:<{width}}  {r.seconds:>7.1f}  {status}")
    return "\n".join(lines)


def _parse_parameters(pairs: list[list[str]], files: list[Path]) -> dict:
    """Merge `-f params.yaml` files and `-p name value` pairs (values parsed as YAML, like papermill)."""
    params: dict = {}
    for file in files:
        params.update(yaml.safe_load(file.read_text()) or {})
    for name, value in pairs:
        params[name] = yaml.safe_load(value)
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the cogagent-notebooks course through papermill.")
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the executed notebooks")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    parser.add_argument("-f", "--parameters-file", action="append", default=[], type=Path)
    args = parser.parse_args(argv)
    runs = run_course(args.notebooks, args.out, _parse_parameters(args.parameter, args.parameters_file))
    failed = [r for r in runs if not r.ok]
    print(f"executed notebooks in {args.out}: {len(runs) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
