"""Shared test fixtures and helpers, written once for every test file.

- The parity case (what the official implementation computes on a tiny official-format checkpoint) is
  committed in `tests/fixtures/parity-case` (its README says what it is and how it was made);
  `COGAGENT_NB_REFERENCE` may point at another copy. A missing case is an error, never a skip.
- The tiny model's special ids (`TINY`), a prompt maker and a padder build model inputs by hand;
  test files import them with `from conftest import TINY, make_prompt, pad_batch`.
- Markers: `gpu` tests need CUDA and are skipped with a reason without it (`make test-gpu` runs them);
  `slow` tests take more than a few seconds on a 2-core CPU and still run in `make test`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from cogagent_nb.data.bpe import SPECIAL_TOKENS, TINY_N_RANKS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA_DIR = REPO_ROOT / "data" / "CogAgentData"
PARITY_CASE_DIR = Path(__file__).resolve().parent / "fixtures" / "parity-case"


# --- markers ------------------------------------------------------------------------------------------------
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests, with the reason, where torch sees no CUDA device."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False); run `make test-gpu`")
    for item in gpu_items:
        item.add_marker(skip)


# --- the tiny model's special ids and hand-built inputs --------------------------------------------------
@dataclass(frozen=True)
class TinyIds:
    """Special-token ids of the course's tiny tokenizer: its `TINY_N_RANKS` ranks, then `SPECIAL_TOKENS`."""

    eos: int
    gmask: int
    sop: int
    user: int
    assistant: int
    boi: int
    eoi: int


def _tiny_ids() -> TinyIds:
    ids = {token: TINY_N_RANKS + i for i, token in enumerate(SPECIAL_TOKENS)}
    return TinyIds(
        eos=ids["<|endoftext|>"],
        gmask=ids["[gMASK]"],
        sop=ids["<sop>"],
        user=ids["<|user|>"],
        assistant=ids["<|assistant|>"],
        boi=ids["<|begin_of_image|>"],
        eoi=ids["<|end_of_image|>"],
    )


TINY = _tiny_ids()


def greedy_test_model():
    """A random tiny model (seed 0) for generation tests, in eval mode.

    A larger init spread than the preset's makes its greedy choices well separated and non-repetitive.
    """
    import torch

    from cogagent_nb.model.configuration import CogAgentConfig
    from cogagent_nb.model.modeling import CogAgentForConditionalGeneration

    torch.manual_seed(0)
    config = CogAgentConfig.from_preset("tiny", initializer_range=0.2)
    return CogAgentForConditionalGeneration(config).eval()


def make_prompt(text: list[int], image_at: int = 1) -> list[int]:
    """[gMASK]<sop><|user|> + text[:image_at] + boi placeholder eoi + text[image_at:] + <|assistant|>."""
    return [
        TINY.gmask,
        TINY.sop,
        TINY.user,
        *text[:image_at],
        TINY.boi,
        TINY.eos,
        TINY.eoi,
        *text[image_at:],
        TINY.assistant,
    ]


def pad_batch(rows: list[list[int]], side: str = "left") -> dict:
    """Pad like the tokenizer: pad id eos, mask 0 and position 0 for pads, positions 0..n-1 for real tokens.

    Left padding is what `apply_chat_template` returns for a batch (and what generation needs).
    """
    import torch

    width = max(len(r) for r in rows)
    ids, mask, pos = [], [], []
    for row in rows:
        pad, real = width - len(row), len(row)
        if side == "left":
            ids.append([TINY.eos] * pad + row), mask.append([0] * pad + [1] * real)
            pos.append([0] * pad + list(range(real)))
        elif side == "right":
            ids.append(row + [TINY.eos] * pad), mask.append([1] * real + [0] * pad)
            pos.append(list(range(real)) + [0] * pad)
        else:
            raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "position_ids": torch.tensor(pos)}


def logits_of(model, batch: dict):
    """The model's logits for a batch, without autograd."""
    import torch

    with torch.no_grad():
        return model(**batch).logits


def cache_of(output):
    """The KV cache a forward or `generate` output carries (`.cache` from transformers 5.24, before that
    `.past_key_values`; `cogagent_nb.model.modeling.CACHE_FIELD` names it)."""
    from cogagent_nb.model.modeling import CACHE_FIELD

    return getattr(output, CACHE_FIELD)


# --- directories --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def demo_data_dir() -> Path:
    return DEMO_DATA_DIR


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The official implementation's reference outputs (see tests/fixtures/parity-case/README.md)."""
    path = Path(os.environ.get("COGAGENT_NB_REFERENCE") or PARITY_CASE_DIR)
    if not (path / "case.pt").exists():
        pytest.fail(
            f"parity case not found at {path}: it is committed in {PARITY_CASE_DIR}; COGAGENT_NB_REFERENCE overrides"
        )
    return path


@pytest.fixture(scope="session")
def parity_tokenizer(parity_dir: Path):
    """The parity case's official-format tokenizer, read by this package's ChatGLM4Tokenizer."""
    from cogagent_nb.data.tokenizer import ChatGLM4Tokenizer

    return ChatGLM4Tokenizer.from_pretrained(str(parity_dir))


@pytest.fixture(scope="session")
def parity_template_checks(parity_dir: Path) -> list[dict]:
    """The 16 official `apply_chat_template` outputs recorded in the parity case."""
    return json.loads((parity_dir / "template_cases.json").read_text(encoding="utf-8"))["checks"]


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


@pytest.fixture
def restore_environ():
    """Put os.environ back after the test. `prepare_distributed` writes RANK, MASTER_PORT,
    TORCH_EXTENSIONS_DIR ... on purpose; left behind, later tests would believe they run inside a
    launcher (and use a stale port)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
