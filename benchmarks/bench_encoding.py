"""How fast conversations become training samples, on one CPU core, images included.

    .venv/bin/python benchmarks/bench_encoding.py                  # demo train split, tiny tokenizer
    .venv/bin/python benchmarks/bench_encoding.py --tokenizer-dir tests/fixtures/parity-case

Encodes every conversation of a split with `encode_conversation` (BPE, mask, image load + CLIP
transform) under `torch.set_num_threads(1)`, prints a table and writes JSON (default
`.bench/encoding.json`). The image part (read, resize, normalise) is also timed alone, so that the table
says where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cogagent_nb.data.encoding import encode_conversation
from cogagent_nb.data.images import image_to_tensor, load_image
from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer, write_tokenizer_files
from cogagent_nb.data.validation import load_split
from cogagent_nb.viz.loss_mask import mask_counts

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_tokenizer(tokenizer_dir: Path | None, image_size: int) -> tuple[ChatGLM4Tokenizer, str]:
    """The given tokenizer folder, or the course's tiny tokenizer written to a temporary folder."""
    if tokenizer_dir is not None:
        return ChatGLM4Tokenizer.from_pretrained(str(tokenizer_dir)), str(tokenizer_dir)
    if not TINY_TOKENIZER_FILE.exists():
        raise SystemExit(f"{TINY_TOKENIZER_FILE} not found; pass --tokenizer-dir")
    folder = write_tokenizer_files(tempfile.mkdtemp(prefix="bench_tok_"), TINY_TOKENIZER_FILE, image_size=image_size)
    return ChatGLM4Tokenizer.from_pretrained(str(folder)), f"tiny ({TINY_TOKENIZER_FILE.name})"


def time_split(conversations: list[dict], tokenizer, data_dir: Path, num_image_tokens: int, repeats: int):
    """Best-of-`repeats` wall time of encoding the whole split, and each sample's mask counts.

    Samples are dropped as soon as they are counted: keeping 361 full-size images (15 MB each) alive
    would measure the memory allocator, not the encoding.
    """
    times, counts = [], []
    for attempt in range(repeats):
        counts = []
        start = time.perf_counter()
        for i, conversation in enumerate(tqdm(conversations, desc=f"encode pass {attempt + 1}/{repeats}", leave=False)):
            sample = encode_conversation(
                conversation, tokenizer, num_image_tokens=num_image_tokens, image_root=data_dir, name=f"sample {i}"
            )
            counts.append(mask_counts(sample))
        times.append(time.perf_counter() - start)
    return min(times), counts


def time_images(conversations: list[dict], data_dir: Path, size: int, repeats: int) -> float:
    """Best-of-`repeats` wall time of the image part alone (read PNG, resize bicubic, normalise)."""
    paths = [data_dir / m["image"] for c in conversations for m in c["messages"] if m.get("image")]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            image_to_tensor(load_image(path), size)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data" / "CogAgentData")
    parser.add_argument("--split", default="train")
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="default: the tiny tokenizer")
    parser.add_argument("--image-size", type=int, default=224, help="for the tiny tokenizer (tiny preset: 224)")
    parser.add_argument("--num-image-tokens", type=int, default=64, help="tiny preset 64, full size 1600")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".bench" / "encoding.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    tokenizer, tokenizer_name = load_tokenizer(args.tokenizer_dir, args.image_size)
    conversations = load_split(args.data_dir, args.split)
    seconds, counts = time_split(conversations, tokenizer, args.data_dir, args.num_image_tokens, args.repeats)
    image_seconds = time_images(conversations, args.data_dir, tokenizer.image_size, args.repeats)
    result = {
        "split": f"{args.data_dir.name}/{args.split}",
        "samples": len(counts),
        "tokenizer": tokenizer_name,
        "image_size": tokenizer.image_size,
        "num_image_tokens": args.num_image_tokens,
        "threads": torch.get_num_threads(),
        "seconds": round(seconds, 4),
        "samples_per_s": round(len(counts) / seconds, 1),
        "ms_per_sample": round(1000 * seconds / len(counts), 3),
        "image_only_ms_per_sample": round(1000 * image_seconds / len(counts), 3),  # timed apart: noisy share
        "ids_per_sample": round(statistics.mean(c["ids"] for c in counts), 1),
        "prompt_text_tokens_per_sample": round(statistics.mean(c["prompt"] for c in counts), 1),
        "supervised_tokens_per_sample": round(statistics.mean(c["supervised"] for c in counts), 1),
        "model_length_per_sample": round(statistics.mean(c["total"] for c in counts), 1),
        "max_model_length": max(c["total"] for c in counts),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    width = max(map(len, result))
    for key, value in result.items():
        if key != "machine":
            print(f"{key:<{width}}  {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
