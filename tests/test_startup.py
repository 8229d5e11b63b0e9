"""The data path stays light: `cogagent-nb validate` and `cogagent-nb --help` import neither torch nor
transformers (each costs seconds at start-up), so a data check starts at once on any laptop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "transformers", "peft", "accelerate")

# Runs in a fresh interpreter: whatever this test process has imported must not hide an import.
PROBE = """
import contextlib, io, json, sys
import cogagent_nb, cogagent_nb.cli
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
        cogagent_nb.cli.main(["--help"])
    except SystemExit:
        pass
    status = cogagent_nb.cli.main(["validate", sys.argv[1]])
    cogagent_nb.validate_paths  # the flat API name resolves without the model stage
heavy = [name for name in sys.argv[2].split(",") if name in sys.modules]
print(json.dumps({"status": status, "heavy": heavy, "output": out.getvalue()}))
"""


def test_validate_and_help_import_no_torch_or_transformers(demo_data_dir: Path, repo_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(demo_data_dir / "train.jsonl"), ",".join(HEAVY)],
        capture_output=True,
        text=True,
        cwd=repo_root,
        check=True,
    )
    report = json.loads(result.stdout.splitlines()[-1])
    assert "usage: cogagent-nb" in report["output"]
    assert "1 file(s) checked: 0 error(s)" in report["output"], report["output"]  # validate really ran
    assert report["status"] == 0
    assert report["heavy"] == [], f"importing these made the data path slow: {report['heavy']}"


def test_importing_the_model_stage_registers_the_auto_classes(repo_root: Path) -> None:
    """`import cogagent_nb` registers nothing (it imports nothing); `import cogagent_nb.model` registers
    model type "chatglm", which is what README's "Loading a model" promises."""
    probe = (
        "import sys, cogagent_nb\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "before = 'chatglm' in CONFIG_MAPPING\n"
        "import cogagent_nb.model\n"
        "from transformers import AutoConfig\n"
        "print(before, type(AutoConfig.for_model('chatglm')).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=repo_root, check=True)
    assert result.stdout.split() == ["False", "CogAgentConfig"]
