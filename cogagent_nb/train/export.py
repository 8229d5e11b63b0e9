"""`cogagent-nb merge BASE ADAPTER OUT`: fold a LoRA adapter into its base model and write a complete
official-format directory, which `cnb.load`, vLLM or the official scripts read like the original.

LoRA adds (alpha / r) · B A to each adapted weight; merging computes W + (alpha / r) · B A once, so the
merged model runs at the base model's speed with no PEFT installed. Prefix tuning has nothing to fold
(its prefix is a KV cache, not a weight delta): it stays an adapter, loaded with `cnb.load(base, adapter=)`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin")
WRITTEN_HERE = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def merge_lora(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: str = "5GB",
) -> Path:
    """Load base + adapter, merge, and write `out_dir` (config.json with the official architecture name,
    safetensors weights, the base's tokenizer and generation files). Returns `out_dir`.

    The files are written through `staged_folder`, so an interrupted merge (a full disk, Ctrl-C) leaves
    nothing that looks like a model.
    """
    import json

    from cogagent_nb.infer.generate import find_adapter
    from cogagent_nb.model.loading import load, write_official_config
    from cogagent_nb.model.peft_recipes import merge_adapter

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    adapter_dir = find_adapter(adapter_dir) or Path(adapter_dir)  # a finetune output_dir: its newest adapter
    adapter_config = adapter_dir / "adapter_config.json"
    if not adapter_config.is_file():
        raise FileNotFoundError(
            f"{adapter_config}: missing; ADAPTER must be a LoRA checkpoint folder, or a finetune output_dir holding one"
        )
    peft_type = json.loads(adapter_config.read_text(encoding="utf-8")).get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"{adapter_config}: peft_type: {peft_type!r} cannot be merged (only LORA adds a weight delta); "
            "load it with cnb.load(base, adapter=...) instead"
        )
    refuse_used_folder(out_dir, remedy="choose a new folder for the merged model")  # before the minutes of loading
    _, model = load(base_dir, adapter=adapter_dir)
    merged = merge_adapter(model)
    with staged_folder(out_dir) as staging:
        merged.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        write_official_config(merged.config, staging)
        copy_side_files(base_dir, staging)
    return out_dir


def refuse_used_folder(out_dir: Path, *, overwrite: bool = False, remedy: str = "choose a new folder") -> None:
    """A new model goes into a new (or empty) folder: never over another model's files, unless `overwrite`
    (the `make-*` commands' flag). A file where the folder should be is refused either way."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: is a file; give a folder for the model")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: not empty; {remedy}")


@contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """Write a model folder whole or not at all: into a hidden sibling that is renamed to `out_dir` at the
    end, so that a full disk or a kill leaves nothing that looks like a model and nothing that blocks a
    retry. Staging folders that a killed run left beside `out_dir` are removed first."""
    refuse_used_folder(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".tmp-{out_dir.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    try:
        yield staging
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def copy_side_files(base_dir: Path, out_dir: Path) -> list[str]:
    """Copy everything of the base folder that is not weights or config.json: tokenizer files,
    generation_config.json, the checkpoint's own code (so its auto_map keeps working)."""
    copied = []
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name not in WRITTEN_HERE:
            shutil.copy2(path, out_dir / path.name)
            copied.append(path.name)
    return copied
