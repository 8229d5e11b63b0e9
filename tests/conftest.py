"""Shared test fixtures.

The parity case (what the official implementation computes on a tiny official-format checkpoint) lives
in `../shared/reference/parity-case` beside the clone; `COGAGENT_NB_REFERENCE` may point elsewhere.
In CI its absence is an error, on a user's machine a skip that says why.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA_DIR = REPO_ROOT / "data" / "CogAgentData"


def _reference_dir() -> Path:
    env = os.environ.get("COGAGENT_NB_REFERENCE")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "reference" / "parity-case"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def demo_data_dir() -> Path:
    return DEMO_DATA_DIR


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The official implementation's reference outputs (see its README)."""
    path = _reference_dir()
    if not (path / "case.pt").exists():
        message = f"parity case not found at {path} (set COGAGENT_NB_REFERENCE)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny official-format CogAgent (seed 0), written once per test session."""
    from cogagent_nb.model.loading import make_tiny_model

    return Path(make_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0))


@pytest.fixture(scope="session")
def tiny_train_data(tmp_path_factory) -> Path:
    """A small synthetic dataset (6 episodes: 19 train, 4 dev, 4 test samples), written once per session."""
    from cogagent_nb.data.synthetic import make_demo_data

    out = tmp_path_factory.mktemp("tiny-train-data")
    make_demo_data(out, seed=7, episodes=6, progress=False)
    return out
