"""Byte-level BPE ranks: the `tokenizer.model` file format, and learning new ranks from text.

GLM-4 (and so CogAgent) stores its tokenizer as a plain text file, one token per line:
``base64(token bytes) <space> rank``. The rank is the token id *and* the merge priority: tiktoken
encodes a pre-tokenized piece by repeatedly merging the adjacent pair whose concatenation has the lowest
rank. The special tokens (`<|endoftext|>`, `[gMASK]`, ...) are not in the file; the tokenizer appends
them after the last rank (see `cogagent_nb.data.tokenizer`).

The course cannot ship the real 151 329-rank file, so it learns a small one (`TINY_N_RANKS`) from the
demo dataset with `train_bpe`. The algorithm is the textbook one (Sennrich et al. 2016, byte-level as in
GPT-2): start from the 256 single bytes, then repeatedly merge the most frequent adjacent pair inside
pre-tokenized pieces. Pair counts are updated incrementally (only the words containing the merged pair
are touched) and the next pair comes from a lazy max-heap, so a few hundred KB train in seconds.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import regex

# The GLM-4 pre-tokenization regex (identical to tiktoken's cl100k_base): contractions, letter runs with
# one optional leading non-letter, numbers in groups of at most 3 digits, punctuation runs, newlines,
# whitespace. Every BPE merge happens inside one such piece, never across two.
GLM4_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The tiny tokenizer learns its merges with numbers cut into single digits, so it has no token holding
# two digits: every coordinate is spelled digit by digit ("559" = 5 5 9, "242" = 2 4 2), the same way
# wherever it occurs, and a tiny model learns one digit at a time instead of ~1000 number tokens split
# at random. At encoding time the GLM-4 regex above still applies; with no multi-digit rank, its
# 3-digit pieces fall apart into digits. (The real GLM-4 tokenizer keeps its 1-3 digit tokens.)
TINY_PAT_STR = GLM4_PAT_STR.replace(r"\p{N}{1,3}", r"\p{N}")

N_BYTE_TOKENS = 256
# The special tokens in their official order: id = number of BPE ranks + position in this tuple.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",  # end of text; also the padding token and the image placeholder
    "[MASK]",
    "[gMASK]",  # with <sop>, the prefix of every GLM-4 prompt
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)

# Ranks of the course's tiny tokenizer. The demo dataset is template-generated: with numbers cut into
# digits (TINY_PAT_STR) its text splits into only ~240 distinct pre-tokenized pieces, which support ~560
# merges seen at least twice. 768 ranks = 256 bytes + 512 merges, all of them seen at least twice.
TINY_N_RANKS = 768


class TokenizerFileError(ValueError):
    """A `tokenizer.model` file that does not follow the format; the message names file and line."""


# --- the file format ---------------------------------------------------------------------------------
def read_tokenizer_model(path: str | Path) -> dict[bytes, int]:
    """Read a `tokenizer.model` file into ``{token bytes: rank}``.

    The ranks must be exactly 0…N−1 (each once): the special-token ids are computed as N + offset, so a
    gap or a duplicate would silently shift every special id. Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    ranks: dict[bytes, int] = {}
    seen_ranks: dict[int, int] = {}  # rank -> line where it was defined
    with path.open("r", encoding="ascii") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            token, rank = _parse_line(line, path, line_no)
            if token in ranks:
                raise TokenizerFileError(f"{path}:{line_no}: token {token!r} appears twice")
            if rank in seen_ranks:
                raise TokenizerFileError(f"{path}:{line_no}: rank {rank} already used on line {seen_ranks[rank]}")
            ranks[token] = rank
            seen_ranks[rank] = line_no
    if not ranks:
        raise TokenizerFileError(f"{path}: no tokens")
    missing = len(ranks) - len(set(range(len(ranks))) & seen_ranks.keys())
    if missing:
        raise TokenizerFileError(
            f"{path}: ranks must be 0…{len(ranks) - 1} without gaps; {missing} rank(s) outside that range "
            f"(largest is {max(seen_ranks)})"
        )
    return ranks


def _parse_line(line: str, path: Path, line_no: int) -> tuple[bytes, int]:
    fields = line.split()
    if len(fields) != 2:
        raise TokenizerFileError(f"{path}:{line_no}: expected 'base64 rank', got {line.strip()!r}")
    try:
        token = base64.b64decode(fields[0], validate=True)
    except binascii.Error as error:
        raise TokenizerFileError(f"{path}:{line_no}: token is not valid base64 ({error})") from None
    if not token:
        raise TokenizerFileError(f"{path}:{line_no}: empty token")
    try:
        rank = int(fields[1])
    except ValueError:
        raise TokenizerFileError(f"{path}:{line_no}: rank {fields[1]!r} is not an integer") from None
    if rank < 0:
        raise TokenizerFileError(f"{path}:{line_no}: rank {rank} is negative")
    return token, rank


def write_tokenizer_model(path: str | Path, ranks: dict[bytes, int]) -> Path:
    """Write ``{token bytes: rank}`` as a `tokenizer.model` file, in rank order (byte-identical reruns)."""
    path = Path(path)
    expected = set(range(len(ranks)))
    if set(ranks.values()) != expected:
        raise ValueError(f"ranks must be exactly 0…{len(ranks) - 1}, each once")
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in sorted(ranks.items(), key=_by_rank)
    ]
    path.write_text("".join(lines), encoding="ascii")
    return path


def _by_rank(item: tuple[bytes, int]) -> int:
    return item[1]


# --- learning ranks ------------------------------------------------------------------------------------
class BPETrainingError(ValueError):
    """The corpus cannot support the requested number of ranks."""


def train_bpe(
    texts: Iterable[str],
    n_ranks: int,
    *,
    pat_str: str = GLM4_PAT_STR,
    min_pair_count: int = 2,
    progress: bool = False,
) -> dict[bytes, int]:
    """Learn byte-level BPE ranks: the 256 single bytes (ranks 0…255), then ``n_ranks − 256`` merges.

    Each step merges the most frequent adjacent pair of tokens inside pre-tokenized pieces. Ties break
    on the bytes of the two tokens (smallest first), so the result depends only on the texts, never on
    dict or set order. A pair seen fewer than `min_pair_count` times is not worth a rank; running out of
    such pairs raises `BPETrainingError` rather than returning a smaller vocabulary.
    """
    if n_ranks < N_BYTE_TOKENS:
        raise ValueError(f"n_ranks must be at least {N_BYTE_TOKENS} (the single bytes), got {n_ranks}")
    pieces = _count_pieces(texts, pat_str)
    state = _MergeState(pieces)
    ranks = {bytes([b]): b for b in range(N_BYTE_TOKENS)}
    n_merges = n_ranks - N_BYTE_TOKENS
    bar = _progress_bar(n_merges, progress)
    while len(ranks) < n_ranks:
        best = state.pop_best(min_pair_count)
        if best is None:
            bar.close()
            raise BPETrainingError(
                f"the corpus supports only {len(ranks) - N_BYTE_TOKENS} merges seen at least {min_pair_count} times "
                f"({sum(len(p) * c for p, c in pieces.items())} bytes, {len(pieces)} distinct pieces); "
                f"{n_ranks} ranks need {n_merges}: use more text, or at most {len(ranks)} ranks "
                f"(--n-ranks {len(ranks)})"
            )
        merged = state.merge(best)
        if merged not in ranks:  # two different splits can produce the same bytes: one rank only
            ranks[merged] = len(ranks)
            bar.update(1)
    bar.close()
    return ranks


def _count_pieces(texts: Iterable[str], pat_str: str) -> Counter[bytes]:
    pattern = regex.compile(pat_str)
    pieces: Counter[bytes] = Counter()
    for text in texts:
        pieces.update(piece.encode("utf-8") for piece in pattern.findall(text))
    return pieces


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="BPE merges", disable=not enabled)


class _MergeState:
    """Words (distinct pieces as token lists) with their counts, and the pair counts kept up to date."""

    def __init__(self, pieces: Counter[bytes]) -> None:
        ordered = sorted(pieces.items())  # deterministic word order
        self.words: list[list[bytes]] = [[bytes([b]) for b in piece] for piece, _ in ordered]
        self.freqs: list[int] = [count for _, count in ordered]
        self.pair_counts: dict[tuple[bytes, bytes], int] = defaultdict(int)
        self.pair_words: dict[tuple[bytes, bytes], set[int]] = defaultdict(set)
        for index, word in enumerate(self.words):
            self._add_pairs(index, word, +1)
        self.heap = [(-count, pair) for pair, count in self.pair_counts.items()]
        heapq.heapify(self.heap)

    def _add_pairs(self, index: int, word: list[bytes], sign: int) -> list[tuple[bytes, bytes]]:
        freq = self.freqs[index] * sign
        pairs = list(zip(word, word[1:]))
        for pair in pairs:
            self.pair_counts[pair] += freq
            if sign > 0:
                self.pair_words[pair].add(index)
        return pairs

    def pop_best(self, min_count: int) -> tuple[bytes, bytes] | None:
        """The most frequent pair (ties: smallest bytes), skipping heap entries whose count is stale."""
        while self.heap:
            neg_count, pair = heapq.heappop(self.heap)
            if self.pair_counts.get(pair, 0) == -neg_count:
                return pair if -neg_count >= min_count else None
        return None

    def merge(self, pair: tuple[bytes, bytes]) -> bytes:
        """Replace every occurrence of `pair` by one token; update only the words that contain it."""
        left, right = pair
        merged = left + right
        touched: set[tuple[bytes, bytes]] = set()
        for index in sorted(self.pair_words.pop(pair, ())):
            word = self.words[index]
            if not any(a == left and b == right for a, b in zip(word, word[1:])):
                continue  # stale: an earlier merge in this word already consumed the pair
            touched.update(self._add_pairs(index, word, -1))
            new_word = _merge_word(word, left, right, merged)
            self.words[index] = new_word
            touched.update(self._add_pairs(index, new_word, +1))
        self.pair_counts.pop(pair, None)
        for other in touched:
            count = self.pair_counts.get(other, 0)
            if count > 0 and other != pair:
                heapq.heappush(self.heap, (-count, other))
            elif count <= 0:
                self.pair_counts.pop(other, None)
        return merged


def _merge_word(word: list[bytes], left: bytes, right: bytes, merged: bytes) -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


# --- the tiny course tokenizer ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyTokenizerSummary:
    """What `make_tiny_tokenizer` wrote and how well the result compresses the training samples."""

    out_file: Path
    n_ranks: int
    n_samples: int
    corpus_bytes: int
    mean_prompt_tokens: float
    mean_answer_tokens: float
    mean_prompt_bytes: float
    mean_answer_bytes: float

    def __str__(self) -> str:
        return (
            f"wrote {self.out_file} ({self.n_ranks} ranks) from {self.n_samples} samples, {self.corpus_bytes} bytes of text\n"
            f"tokens per sample: prompt {self.mean_prompt_tokens:.1f} (from {self.mean_prompt_bytes:.0f} bytes), "
            f"answer {self.mean_answer_tokens:.1f} (from {self.mean_answer_bytes:.0f} bytes)"
        )


def conversation_texts(train_jsonl: str | Path) -> tuple[list[str], list[str]]:
    """The user prompts and the assistant answers of a CogAgent JSONL file, in file order."""
    train_jsonl = Path(train_jsonl)
    if not train_jsonl.is_file():
        raise FileNotFoundError(f"training file not found: {train_jsonl}")
    prompts: list[str] = []
    answers: list[str] = []
    with train_jsonl.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            for role, content in _messages(line, train_jsonl, line_no):
                if role == "user":
                    prompts.append(content)
                elif role == "assistant":
                    answers.append(content)
    return prompts, answers


def _messages(line: str, path: Path, line_no: int) -> list[tuple[str, str]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({error.msg})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list):
        raise ValueError(f"{path}:{line_no}: messages: expected a list of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"{path}:{line_no}: messages[{i}].content: expected a string")
        out.append((str(message.get("role")), message["content"]))
    return out


def make_tiny_tokenizer(
    data_dir: str | Path, out_file: str | Path, n_ranks: int = TINY_N_RANKS
) -> TinyTokenizerSummary:
    """Learn the course's tiny tokenizer from `data_dir/train.jsonl` and write it to `out_file`.

    It trains on the user prompts and assistant answers: the text the model reads and writes. The
    special tokens are not learned; the tokenizer appends them after the `n_ranks` ranks, exactly as
    for the real file, so one code path loads both.
    """
    prompts, answers = conversation_texts(Path(data_dir) / "train.jsonl")
    if not prompts or not answers:
        raise BPETrainingError(f"{Path(data_dir) / 'train.jsonl'}: no user/assistant text to learn from")
    ranks = train_bpe(prompts + answers, n_ranks, pat_str=TINY_PAT_STR, progress=True)
    out_file = write_tokenizer_model(out_file, ranks)
    import tiktoken

    encoding = tiktoken.Encoding(name="tiny", pat_str=GLM4_PAT_STR, mergeable_ranks=ranks, special_tokens={})
    prompt_tokens = [len(encoding.encode_ordinary(t)) for t in prompts]
    answer_tokens = [len(encoding.encode_ordinary(t)) for t in answers]
    prompt_bytes = [len(t.encode("utf-8")) for t in prompts]
    answer_bytes = [len(t.encode("utf-8")) for t in answers]
    return TinyTokenizerSummary(
        out_file=out_file,
        n_ranks=n_ranks,
        n_samples=len(answers),
        corpus_bytes=sum(prompt_bytes) + sum(answer_bytes),
        mean_prompt_tokens=_mean(prompt_tokens),
        mean_answer_tokens=_mean(answer_tokens),
        mean_prompt_bytes=_mean(prompt_bytes),
        mean_answer_bytes=_mean(answer_bytes),
    )


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0
