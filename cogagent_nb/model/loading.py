"""Building, saving and loading CogAgent models, and registering them with the Auto classes.

The jobs that live here, all about getting weights into and out of `CogAgentForConditionalGeneration`:

- `register_auto_classes()` teaches `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and `AutoTokenizer` the
  official model type `"chatglm"` (transformers 5 does not ship it), so an official-format directory loads
  without `trust_remote_code` once `cogagent_nb` is imported. The official `config.json` of
  THUDM/cogagent-9b-20241220 carries an `auto_map` pointing at its own remote code; transformers resolves
  `trust_remote_code=None` to "use the local class" when one is registered, so the checkpoint's code is only
  run when a user asks for it (`load(..., trust_remote_code=True)`).
- `load(model_dir)` is the one entry point of the course: safetensors only (single file or sharded with
  `model.safetensors.index.json`), every missing or unexpected weight is an error (the rotary `inv_freq`
  buffer that GLM-4 checkpoints carry is the one documented exception), and nothing is downloaded while
  `HF_HUB_OFFLINE` is set.
- `init_model(config_or_preset, seed=)` builds a randomly initialised model (the course's tiny model, or a
  9B preset with random weights for a memory or speed measurement).
- `save_pretrained(out_dir, model, tokenizer)` writes everything `load` needs: config.json, the weights
  under the official key names, generation_config.json, tokenizer.model and tokenizer_config.json.
- `make_tiny_model(out_dir, seed=)` is `init_model("tiny")` saved that way: the model every CPU notebook
  and test trains.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from cogagent_nb.data.tokenizer import ChatGLM4Tokenizer
    from cogagent_nb.model.configuration import CogAgentConfig
    from cogagent_nb.model.modeling import CogAgentForConditionalGeneration

MODEL_TYPE = "chatglm"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# `architectures` values of checkpoints this package implements: the official CogAgent and GLM-4V files, and
# what `save_pretrained` writes for our own class.
IMPLEMENTED_ARCHITECTURES = frozenset(
    {"ChatGLMForConditionalGeneration", "ChatGLMModel", "CogAgentForConditionalGeneration"}
)

# transformers' "Loading weights" bar is shown from this size on: the 9B's 28 GB take a while to read, a tiny
# model's few MB load in milliseconds and the bar would only clutter a lesson's output.
LOADING_BAR_BYTES = 1 << 30

# Checkpoint keys that carry no information for this implementation: GLM-4 files store the rotary inverse
# frequencies as a persistent buffer, but the official forward recomputes them (GLM-4 `modeling_chatglm.py`, `RotaryEmbedding`).
IGNORED_CHECKPOINT_KEYS = re.compile(r"(^|\.)rotary_pos_emb\.inv_freq$")

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


class CheckpointError(ValueError):
    """A model directory that this package cannot (or will not) load; the message names the file."""


# --- Auto classes -------------------------------------------------------------------------------------------
_REGISTERED = False


def register_auto_classes() -> None:
    """Register CogAgent with transformers' Auto classes under the official model type "chatglm".

    Idempotent (a second call does nothing). Raises if another library already registered a *different*
    class for "chatglm", because then `AutoModelForCausalLM` would silently build someone else's model.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from cogagent_nb.data.tokenizer import ChatGLM4Tokenizer
    from cogagent_nb.model.configuration import CogAgentConfig
    from cogagent_nb.model.modeling import CogAgentForConditionalGeneration

    if MODEL_TYPE in CONFIG_MAPPING and CONFIG_MAPPING[MODEL_TYPE] is not CogAgentConfig:
        raise RuntimeError(
            f"transformers already maps model_type {MODEL_TYPE!r} to {CONFIG_MAPPING[MODEL_TYPE].__name__}; "
            "refusing to replace it with CogAgentConfig"
        )
    AutoConfig.register(MODEL_TYPE, CogAgentConfig, exist_ok=True)
    # The official auto_map sends both AutoModel and AutoModelForCausalLM to the generation class.
    AutoModel.register(CogAgentConfig, CogAgentForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(CogAgentConfig, CogAgentForConditionalGeneration, exist_ok=True)
    AutoTokenizer.register(CogAgentConfig, tokenizer_class=ChatGLM4Tokenizer, exist_ok=True)
    _REGISTERED = True


# --- load() -------------------------------------------------------------------------------------------------
def load(
    model_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    adapter: str | os.PathLike | None = None,
) -> tuple[ChatGLM4Tokenizer, CogAgentForConditionalGeneration]:
    """Load `(tokenizer, model)` from an official-format CogAgent / GLM-4V directory, in eval mode.

    dtype: a torch dtype, "bfloat16"/"float16"/"float32" (short forms bf16/fp16/fp32 too), or "auto"/None
      for the checkpoint's own dtype (`torch_dtype` in config.json; bf16 for the 9B files, fp32 for tiny).
    device_map: passed to `from_pretrained` ("auto" spreads the 9B over the visible GPUs via accelerate).
    trust_remote_code: run the checkpoint's own `modeling_chatglm.py` instead of this package. Those files
      target transformers 4.x (no `generate` on 5.x, removed cache helpers), so this is an escape hatch for
      users with an older stack; the returned objects are then the remote classes, not ours.
    allow_pickle: also accept `pytorch_model*.bin`. Unpickling can run arbitrary code, so it is opt-in;
      even then the files are read with `torch.load(weights_only=True)`.
    adapter: a PEFT adapter folder (a LoRA or prefix-tuning checkpoint of `cogagent-nb finetune`) to attach
      to the loaded base model; the model returned is then a PeftModel (`model.peft_recipes.load_adapter`).
    """
    directory = resolve_model_dir(model_dir, with_code=trust_remote_code)
    torch_dtype = resolve_dtype(dtype)
    if trust_remote_code:
        return _load_with_remote_code(directory, torch_dtype, device_map)

    register_auto_classes()
    from cogagent_nb.data.tokenizer import ChatGLM4Tokenizer
    from cogagent_nb.model.configuration import CogAgentConfig
    from cogagent_nb.model.modeling import CogAgentForConditionalGeneration

    check_architecture(directory)
    check_tokenizer_files(directory)
    use_safetensors = find_weights(directory, allow_pickle=allow_pickle) == "safetensors"
    config = CogAgentConfig.from_pretrained(directory)
    with progress_bars_off(weights_bytes(directory) < LOADING_BAR_BYTES):
        model, info = CogAgentForConditionalGeneration.from_pretrained(
            directory,
            config=config,
            dtype=torch_dtype,
            device_map=device_map,
            use_safetensors=use_safetensors,
            local_files_only=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # shape mismatches go to our error (with the key), not transformers'
        )
    check_loading_info(info, directory)
    model.eval()
    tokenizer = ChatGLM4Tokenizer.from_pretrained(directory)
    if adapter is not None:
        from cogagent_nb.model.peft_recipes import load_adapter

        model = load_adapter(model, adapter).eval()
    return tokenizer, model


def weights_bytes(directory: Path) -> int:
    """The size of the weight files in `directory` (safetensors or pickle shards)."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in directory.glob(pattern))


@contextmanager
def progress_bars_off(off: bool = True) -> Iterator[None]:
    """transformers' progress bars off for the block when `off`, then as they were (never switched on)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if off:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if off and was_on:
            hf_logging.enable_progress_bar()


def resolve_model_dir(model_dir: str | os.PathLike, *, with_code: bool = False) -> Path:
    """Return `model_dir` as a local directory, or explain why a hub id cannot be used here.

    The course never downloads: with `HF_HUB_OFFLINE=1` (set by the Makefile and the tests) a name that is
    not a folder is an error. Online, a hub id is fetched with `huggingface_hub.snapshot_download`
    (safetensors, json and tokenizer files only; the checkpoint's .py files only `with_code`), as the
    official script's `from_pretrained(MODEL_DIR)` does, and says so first. A name whose first part is a
    local folder (`models/cogagent-9b` beside a `models/`) is a mistyped path, never a download.
    """
    path = Path(model_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; pass the folder that holds config.json")
    name = str(model_dir)
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None
    if not looks_like_hub_id:
        raise CheckpointError(f"{path}: no such directory")
    if Path(name.split("/")[0]).is_dir():  # `models/cogagent-9b` with a local `models/`: a typo, not a hub id
        raise CheckpointError(
            f"{path}: no such directory (not fetched from the Hub as a model id, since {name.split('/')[0]}/ is a "
            "local folder)"
        )
    if _hub_offline():
        raise CheckpointError(
            f"{name!r} is not a local directory and HF_HUB_OFFLINE is set, so it will not be downloaded. "
            f"Download it first (e.g. `huggingface-cli download {name} --local-dir models/{name.split('/')[-1]}`) "
            "and pass that folder."
        )
    from huggingface_hub import snapshot_download

    print(f"{name!r} is not a local folder: downloading it from the Hugging Face Hub (HF_HUB_OFFLINE=1 forbids this)")
    patterns = ["*.json", "*.safetensors", "tokenizer.model"] + (["*.py"] if with_code else [])
    return Path(snapshot_download(name, allow_patterns=patterns))


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Map the accepted spellings to what `from_pretrained(dtype=...)` takes ("auto" for None)."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not understood; use one of {sorted(DTYPES)} or a torch.dtype")
    return DTYPES[key]


def read_config_json(directory: Path) -> dict[str, Any]:
    """The raw config.json as a dict, with errors that name the file and the line."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a model directory needs config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err


def check_architecture(directory: Path) -> None:
    """Fail loudly for a config this package does not implement (another model_type or architecture)."""
    raw = read_config_json(directory)
    path = directory / "config.json"
    model_type = raw.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{path}: model_type: {model_type!r} is not {MODEL_TYPE!r}; this package implements only the "
            "CogAgent / GLM-4V (ChatGLM) architecture"
        )
    architectures = raw.get("architectures") or []
    unknown = [a for a in architectures if a not in IMPLEMENTED_ARCHITECTURES]
    if unknown:
        raise CheckpointError(
            f"{path}: architectures: {unknown} not implemented (known: {sorted(IMPLEMENTED_ARCHITECTURES)})"
        )
    if "vision_config" not in raw:
        raise CheckpointError(
            f"{path}: vision_config: missing; this is a text-only ChatGLM/GLM-4 checkpoint, not CogAgent/GLM-4V"
        )


TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")


def check_tokenizer_files(directory: Path) -> None:
    """`load` returns the tokenizer too: name the tokenizer files that are missing, and how to add them.

    `model.save_pretrained(d)` (transformers) writes only the model, so this is the usual way to get here.
    """
    missing = [name for name in TOKENIZER_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{directory}: {' and '.join(missing)} missing; load() returns the tokenizer with the model. "
            "Save model and tokenizer together with cogagent_nb.save_pretrained(dir, model, tokenizer) "
            "(model.save_pretrained writes only the model), or add the base model's tokenizer with "
            "tokenizer.save_pretrained(dir) / cogagent_nb.write_tokenizer_files(dir, BASE/tokenizer.model, "
            "image_size=...)."
        )


def find_weights(directory: Path, *, allow_pickle: bool = False) -> str:
    """Say which weight format `directory` holds: "safetensors" (preferred) or "pickle" (only if allowed)."""
    if (directory / SAFE_WEIGHTS_NAME).is_file():
        return "safetensors"
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        _check_shards_exist(index)
        return "safetensors"
    pickles = [name for name in PICKLE_WEIGHTS_NAMES if (directory / name).is_file()]
    pickles += sorted(p.name for p in directory.glob("pytorch_model-*.bin"))
    if pickles:
        if allow_pickle:
            return "pickle"
        raise CheckpointError(
            f"{directory}: only pickle weights ({', '.join(pickles)}); loading them can execute arbitrary code. "
            "Convert them to safetensors, or pass allow_pickle=True if you trust their source."
        )
    raise CheckpointError(f"{directory}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}")


def _check_shards_exist(index_path: Path) -> None:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{index_path}:{err.lineno}: invalid JSON: {err.msg}") from err
    except KeyError:
        raise CheckpointError(f"{index_path}: weight_map: missing") from None
    missing = sorted({shard for shard in weight_map.values() if not (index_path.parent / shard).is_file()})
    if missing:
        raise CheckpointError(f"{index_path}: weight_map names shards that are not there: {missing}")


def check_loading_info(info: dict[str, Any], directory: Path) -> None:
    """Turn `from_pretrained`'s loading report into an error listing every key that did not match.

    transformers only warns about missing weights (and initialises them randomly), which would let a
    wrong or truncated checkpoint train silently; here that is an error.
    """
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not IGNORED_CHECKPOINT_KEYS.search(k))
    missing = sorted(k for k in info.get("missing_keys", ()) if not IGNORED_CHECKPOINT_KEYS.search(k))
    mismatched = sorted(
        f"{key}: checkpoint {tuple(stored)} vs model {tuple(expected)}"
        for key, stored, expected in info.get("mismatched_keys", ())
    )
    errors = list(info.get("error_msgs", ()))
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) missing from the checkpoint: {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weight(s) in the checkpoint: {_preview(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_preview(mismatched)}")
    problems += errors
    if problems:
        raise CheckpointError(f"{directory}: " + "; ".join(problems))


def _preview(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _load_with_remote_code(directory: Path, dtype: torch.dtype | str, device_map: str | dict | None):
    """Hand off to the checkpoint's own code (its `auto_map`): the user opted in with trust_remote_code=True."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = read_config_json(directory)
    if "AutoModelForCausalLM" not in (raw.get("auto_map") or {}):
        raise CheckpointError(
            f"{directory / 'config.json'}: auto_map: no AutoModelForCausalLM entry, so there is no remote code "
            "to trust; call load() without trust_remote_code to use this package's implementation"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, dtype=dtype, device_map=device_map, use_safetensors=True
    )
    model.eval()
    return tokenizer, model


# --- building and saving -----------------------------------------------------------------------------------
def init_model(
    config: CogAgentConfig | str,
    *,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> CogAgentForConditionalGeneration:
    """A randomly initialised CogAgent, in eval mode: `init_model("tiny")`, `init_model(config, dtype="bf16")`.

    config: a `CogAgentConfig` or a preset name (`CogAgentConfig.from_preset`).
    seed: on CPU the weights depend on the seed only (the global RNG state is left as it was), so the
      same seed gives byte-identical weights, which `make_tiny_model` relies on.
    dtype: as in `load` ("bfloat16"/"bf16", "float32", a torch dtype); None = the config's own dtype
      (`torch_dtype` in config.json), else float32. On CPU the weights are drawn in fp32, then cast.
    device: None or "cpu" builds on the CPU. Any other device builds on the meta device, allocates the
      weights on `device` in `dtype` and initialises them there: seconds for the 9B on a GPU instead of
      minutes of CPU init and a copy; the weights then follow that device's RNG (same seed, same weights
      on the same kind of device).
    """
    from cogagent_nb.model.configuration import CogAgentConfig
    from cogagent_nb.model.modeling import CogAgentForConditionalGeneration

    if isinstance(config, str):
        config = CogAgentConfig.from_preset(config)
    target = resolve_dtype(dtype)
    if target == "auto":
        target = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device("cpu"):
                model = CogAgentForConditionalGeneration(config)
        return model.to(target).eval()
    return _init_on_device(config, seed=seed, dtype=target, device=device)


def _init_on_device(
    config: CogAgentConfig, *, seed: int, dtype: torch.dtype, device: torch.device
) -> CogAgentForConditionalGeneration:
    """Build on the meta device (no memory, no init), allocate on `device` in `dtype`, initialise there."""
    from cogagent_nb.model.modeling import CogAgentForConditionalGeneration

    with torch.device("meta"):
        model = CogAgentForConditionalGeneration(config)
    model = model.to(dtype).to_empty(device=device)  # uninitialised memory until init_weights below
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(seed)
        with torch.no_grad():
            model.init_weights()
    return model.eval()


def save_pretrained(
    out_dir: str | os.PathLike, model: CogAgentForConditionalGeneration, tokenizer: ChatGLM4Tokenizer
) -> str:
    """Write `model` and `tokenizer` as an official-format directory that `load(out_dir)` reads back; return it.

    Files: config.json (official field names, `architectures` ChatGLMForConditionalGeneration),
    model.safetensors (the model's dtype, the official key names, plus the rotary `inv_freq` buffer the
    official files carry), generation_config.json (the model's, or the official stop set and greedy
    decoding), tokenizer.model + tokenizer_config.json (the official tokenizer layout, with the
    tokenizer's `image_size`). A PEFT model is refused: save its adapter (`save_adapter`) or merge it
    first (`merge_adapter`).
    """
    from cogagent_nb.data.tokenizer import write_tokenizer_files
    from cogagent_nb.model.modeling import CogAgentForConditionalGeneration

    if not isinstance(model, CogAgentForConditionalGeneration):
        raise TypeError(
            f"save_pretrained expects a CogAgentForConditionalGeneration, got {type(model).__name__}; for a PEFT "
            "model use save_adapter(model, dir), or merge_adapter(model) first to save a full model"
        )
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    write_official_config(config, directory, dtype=model.dtype)
    save_official_weights(model.state_dict(), directory, inv_freq=config.rotary_inv_freq())
    generation = getattr(model, "generation_config", None)
    if generation is not None and not getattr(generation, "_from_model_config", True):
        generation.save_pretrained(directory)  # the user's (or the checkpoint's) own generation settings
    else:
        write_generation_config(config, directory)
    write_tokenizer_files(directory, tokenizer, image_size=tokenizer.image_size)
    return str(directory)


def make_random_model(
    out_dir: str | os.PathLike,
    preset: CogAgentConfig | str = "cogagent-9b-20241220",
    *,
    seed: int = 0,
    dtype: str | torch.dtype | None = "bfloat16",
    device: str | torch.device | None = None,
) -> str:
    """Write a random-initialised model of any preset as an official-format directory; return it.

    For running the real-size pipeline (finetune.py, benchmarks, inference) where the real checkpoint
    cannot be downloaded. The weights are random; the tokenizer is a *stand-in*: the course's tiny BPE
    ranks padded with filler ranks up to the preset's rank count, so that every special id sits where the
    real `tokenizer.model` puts it (151329... on the 9B) and the model's config needs no change. Filler
    tokens start with the byte 0xF8, which never occurs in UTF-8 text, so they are never produced. The
    stand-in spells text like the tiny tokenizer: good for measuring speed and memory, not for meaning.
    `device="cuda"` initialises on the GPU (seconds for the 9B instead of minutes on the CPU).
    """
    from cogagent_nb.data.bpe import read_tokenizer_model, write_tokenizer_model
    from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer
    from cogagent_nb.model.configuration import PRESETS, CogAgentConfig, vocabulary_fields

    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: unknown; choose one of {', '.join(sorted(PRESETS))}")
    if preset == "tiny":  # the tiny tokenizer's own vocabulary, as make_tiny_model; dtype and device still apply
        preset = CogAgentConfig.from_preset("tiny", **vocabulary_fields(len(read_tokenizer_model(TINY_TOKENIZER_FILE))))
    config = preset if isinstance(preset, CogAgentConfig) else CogAgentConfig.from_preset(preset)
    n_ranks = config.pad_token_id  # GLM-4 numbers the specials right after the ranks; <|endoftext|> is first
    ranks = read_tokenizer_model(TINY_TOKENIZER_FILE)
    if n_ranks < len(ranks):
        raise ValueError(f"this config has {n_ranks} ranks, fewer than the tiny tokenizer's {len(ranks)}")
    for filler in range(n_ranks - len(ranks)):
        ranks[b"\xf8" + filler.to_bytes(3, "big")] = len(ranks)
    directory = Path(out_dir)
    write_tokenizer_model(directory / "tokenizer.model", ranks)
    tokenizer = ChatGLM4Tokenizer(directory / "tokenizer.model", image_size=config.image_size)
    model = init_model(config, seed=seed, dtype=dtype, device=device)
    return save_pretrained(directory, model, tokenizer)


def make_tiny_model(out_dir: str | os.PathLike, *, seed: int = 0) -> str:
    """Write a random tiny CogAgent as a complete official-format directory; return the directory.

    `init_model` of the `tiny` preset (fp32), saved with `save_pretrained` together with the course's
    tiny BPE tokenizer (image size 224). The same seed gives byte-identical files, so tests and
    notebooks can share one model and compare results.
    """
    from cogagent_nb.data.bpe import read_tokenizer_model
    from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer
    from cogagent_nb.model.configuration import CogAgentConfig, vocabulary_fields

    n_ranks = len(read_tokenizer_model(TINY_TOKENIZER_FILE))  # the shipped file decides, not a constant
    config = CogAgentConfig.from_preset("tiny", **vocabulary_fields(n_ranks))
    tokenizer = ChatGLM4Tokenizer(TINY_TOKENIZER_FILE, image_size=config.image_size)
    return save_pretrained(out_dir, init_model(config, seed=seed), tokenizer)


def write_official_config(config: CogAgentConfig, directory: Path, *, dtype: torch.dtype | None = None) -> None:
    """config.json with the official field names and the official class name in `architectures`.

    dtype: the dtype of the weights written beside it, so that `load(dtype=None)` reads them as saved.
    """
    config = config.__class__.from_dict(config.to_dict())  # a copy: do not touch the caller's config
    config.architectures = ["ChatGLMForConditionalGeneration"]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(directory)


def save_official_weights(
    state_dict: dict[str, torch.Tensor], directory: Path, *, inv_freq: torch.Tensor | None = None
) -> Path:
    """Write model.safetensors with the official key names, sorted, contiguous, with the "pt" metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(state_dict.items())}
    if inv_freq is not None:
        tensors.setdefault("transformer.rotary_pos_emb.inv_freq", inv_freq.contiguous())
    path = directory / SAFE_WEIGHTS_NAME
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def write_generation_config(config: CogAgentConfig, directory: Path) -> None:
    """generation_config.json: stop on the official set (endoftext, <|user|>, <|observation|>), greedy."""
    from transformers import GenerationConfig

    generation = GenerationConfig(
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    generation.save_pretrained(directory)
