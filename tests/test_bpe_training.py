"""bpe_training: the tokenizer.model format, BPE learning, and the tiny course tokenizer."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken

from cogagent_nb.cli import main as cli_main
from cogagent_nb.data.bpe import (
    GLM4_PAT_STR,
    BPETrainingError,
    TokenizerFileError,
    make_tiny_tokenizer,
    read_tokenizer_model,
    train_bpe,
    write_tokenizer_model,
)
from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer, write_tokenizer_files

WORDS = (
    "click",
    "the",
    "settings",
    "button",
    "open",
    "menu",
    "Display",
    "tab",
    "CLICK(box=[[",
    "]]",
    "type",
    "search",
    "OK",
    "cancel",
    "window",
    "选择",
    "设置",
    "12",
    "345",
    "\n",
    " ",
    "'",
    "Status:",
    "Plan:",
)


SYLLABLES = ("ka", "lo", "mi", "set", "tin", "gs", "bu", "ton", "dis", "play", "win", "dow", "ré", "选", "择")


def _word(rng: random.Random) -> str:
    """A known GUI word, a made-up word of 1–4 syllables, or a number: varied but with repeats to merge."""
    kind = rng.random()
    if kind < 0.4:
        return rng.choice(WORDS)
    if kind < 0.85:
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
    return str(rng.randint(0, 999))


def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(_word(rng) for _ in range(rng.randint(5, 30))) for _ in range(n)]


# --- the file format -----------------------------------------------------------------------------------
def test_read_parity_file(parity_dir: Path) -> None:
    ranks = read_tokenizer_model(parity_dir / "tokenizer.model")
    assert len(ranks) == 557 and sorted(ranks.values()) == list(range(557))
    assert {token for token in ranks if len(token) == 1} == {bytes([b]) for b in range(256)}


def test_write_read_round_trip(parity_dir: Path, tmp_path: Path) -> None:
    ranks = read_tokenizer_model(parity_dir / "tokenizer.model")
    out = write_tokenizer_model(tmp_path / "t.model", ranks)
    assert read_tokenizer_model(out) == ranks
    assert out.read_text().splitlines()[0] == "ag== 0"  # rank order, the official line format


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("YQ== 0\nYg== x\n", r"t\.model:2: rank 'x' is not an integer"),
        ("YQ== 0\n!!! 1\n", r"t\.model:2: token is not valid base64"),
        ("YQ== 0\nYQ== 1\n", r"t\.model:2: token b'a' appears twice"),
        ("YQ== 0\nYg== 0\n", r"t\.model:2: rank 0 already used on line 1"),
        ("YQ== 0\nYg== 5\n", r"ranks must be 0…1 without gaps"),
        ("YQ== 0 extra\n", r"t\.model:1: expected 'base64 rank'"),
        ("", r"no tokens"),
    ],
)
def test_read_errors_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "t.model"
    path.write_text(content)
    with pytest.raises(TokenizerFileError, match=message):
        read_tokenizer_model(path)


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.model"):
        read_tokenizer_model(tmp_path / "nope.model")


# --- learning -------------------------------------------------------------------------------------------
def _naive_bpe(texts: list[str], n_ranks: int) -> dict[bytes, int]:
    """Recount every pair at every step: slow, obviously right, same tie-break (count, then bytes)."""
    pieces = Counter(p.encode() for t in texts for p in regex.findall(GLM4_PAT_STR, t))
    words = {piece: [bytes([b]) for b in piece] for piece in pieces}
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < n_ranks:
        counts: Counter[tuple[bytes, bytes]] = Counter()
        for piece, word in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] += pieces[piece]
        (left, right), _ = min(counts.items(), key=lambda item: (-item[1], item[0]))
        for piece, word in words.items():
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == (left, right):
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            words[piece] = merged
        ranks.setdefault(left + right, len(ranks))
    return ranks


def test_incremental_training_matches_naive_recount() -> None:
    texts = _corpus(60, seed=1)
    assert train_bpe(texts, 330) == _naive_bpe(texts, 330)


def test_training_is_deterministic_and_order_free() -> None:
    texts = _corpus(200, seed=2)
    first = train_bpe(texts, 400)
    assert train_bpe(list(texts), 400) == first
    assert train_bpe(list(reversed(texts)), 400) == first  # only counts matter
    assert sorted(first.values()) == list(range(400))
    assert all(bytes([b]) in first and first[bytes([b])] == b for b in range(256))


def test_learned_ranks_encode_and_compress() -> None:
    texts = _corpus(200, seed=3)
    ranks = train_bpe(texts, 400)
    encoding = tiktoken.Encoding(name="t", pat_str=GLM4_PAT_STR, mergeable_ranks=ranks, special_tokens={})
    text = texts[0]
    ids = encoding.encode_ordinary(text)
    assert encoding.decode(ids) == text
    assert len(ids) < len(text.encode()) / 3


def test_small_corpus_raises_clearly() -> None:
    with pytest.raises(BPETrainingError, match=r"supports only .* merges .* 2048 ranks need 1792: .*--n-ranks \d+\)"):
        train_bpe(["tiny text, tiny text"], 2048)
    with pytest.raises(ValueError, match="at least 256"):
        train_bpe(["x"], 100)


# --- the tiny tokenizer ---------------------------------------------------------------------------------------
def _write_dataset(data_dir: Path, texts: list[str]) -> None:
    data_dir.mkdir()
    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": t, "image": "a.png"}, {"role": "assistant", "content": t[::-1]}]}
        )
        for t in texts
    ]
    (data_dir / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_make_tiny_tokenizer_and_load(tmp_path: Path) -> None:
    _write_dataset(tmp_path / "data", _corpus(150, seed=4))
    summary = make_tiny_tokenizer(tmp_path / "data", tmp_path / "tiny.model", n_ranks=300)
    assert summary.n_samples == 150 and summary.n_ranks == 300
    assert 0 < summary.mean_prompt_tokens < summary.mean_prompt_bytes
    assert "tokens per sample" in str(summary)
    write_tokenizer_files(tmp_path / "model", tmp_path / "tiny.model", image_size=224)
    tok = ChatGLM4Tokenizer.from_pretrained(tmp_path / "model")
    assert (tok.vocab_size, tok.eos_id, tok.gmask_id) == (300, 300, 302)


def test_make_tiny_tokenizer_cli_is_reproducible(tmp_path: Path, capsys) -> None:
    _write_dataset(tmp_path / "data", _corpus(150, seed=5))
    for name in ("a.model", "b.model"):
        assert cli_main(["make-tiny-tokenizer", str(tmp_path / "data"), str(tmp_path / name), "--n-ranks", "300"]) == 0
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert "tokens per sample" in capsys.readouterr().out
    argv = ["make-tiny-tokenizer", str(tmp_path / "data"), str(tmp_path / "a.model"), "--n-ranks", "300"]
    assert cli_main(argv) == 2  # a model's tokenizer.model is not replaced by accident
    assert "a.model: exists (a model's tokenizer?); choose a new file or pass --overwrite" in capsys.readouterr().err
    assert cli_main([*argv, "--overwrite"]) == 0
    assert cli_main(["make-tiny-tokenizer", str(tmp_path / "missing"), str(tmp_path / "c.model")]) == 2
    assert cli_main(["make-tiny-tokenizer", str(tmp_path / "data"), str(tmp_path), "--n-ranks", "300"]) == 2
    assert "is a folder; OUT_FILE is the tokenizer.model file" in capsys.readouterr().err


def test_make_tiny_tokenizer_bad_jsonl(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}]}\n{"messages": 3}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: messages"):
        make_tiny_tokenizer(tmp_path, tmp_path / "t.model")


def test_committed_asset_is_reproducible_from_demo_data(demo_data_dir: Path, tmp_path: Path) -> None:
    """The asset must be what `make-tiny-tokenizer data/CogAgentData` writes today (else regenerate it)."""
    if not (demo_data_dir / "train.jsonl").is_file():
        pytest.skip(f"demo dataset not found at {demo_data_dir} (run `cogagent-nb make-demo-data`)")
    make_tiny_tokenizer(demo_data_dir, tmp_path / "tiny.model")
    assert (tmp_path / "tiny.model").read_bytes() == TINY_TOKENIZER_FILE.read_bytes(), (
        "cogagent_nb/data/assets/tiny_tokenizer.model is stale: run "
        "`cogagent-nb make-tiny-tokenizer data/CogAgentData cogagent_nb/data/assets/tiny_tokenizer.model --overwrite`"
    )
