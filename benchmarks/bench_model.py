"""Forward + backward step time and peak memory of CogAgent on a synthetic batch.

Each sample carries one image, so the model runs both towers: `--seq-len` counts the *spliced* sequence
the decoder sees (text + num_image_tokens + boi/eoi), i.e. the input ids are
`seq_len - num_image_tokens + 1` long (their boi/placeholder/eoi triple becomes num_image_tokens + 2
vectors). The weights are random: on a GPU the model is built on the meta device, moved with
`to_empty` and initialised there (seconds, even for 13.9B parameters); nothing is downloaded.

Modes:
  full   every parameter trains except, by default, the vision tower (`--freeze-vision`, the official
         sft.yaml recipe: freezeV True); `--no-freeze-vision` trains everything.
  lora   the official lora.yaml (r 8, alpha 32, dropout 0.1 on every `query_key_value`, both towers);
         needs peft; skipped with a message when peft is not installed.
Only forward + backward are timed (no optimizer step unless `--optimizer adamw`, whose fp32 states for
9.4B trainable parameters would need ~150 GB on their own).

Examples:
  python benchmarks/bench_model.py --preset tiny --device cpu --batch 4 --seq-len 256 --steps 10
  python benchmarks/bench_model.py --preset cogagent-9b-20241220 --device cuda --dtype bfloat16 \
      --batch 1 --seq-len 2048 --steps 5 --mode full --grad-ckpt
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a clone without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from cogagent_nb.model.configuration import CogAgentConfig  # noqa: E402
from cogagent_nb.model.loading import init_model  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "cogagent-9b-20241220", "glm-4v-9b"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="spliced length: text + num_image_tokens + 2")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mode", default="full", choices=["full", "lora"])
    p.add_argument(
        "--freeze-vision",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="full mode: freeze the vision tower as the official sft.yaml (default: on)",
    )
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in both towers")
    p.add_argument("--optimizer", default="none", choices=["none", "adamw"], help="also time an optimizer step")
    p.add_argument(
        "--meta-init",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="build on the meta device, then allocate and initialise on --device (default: on for cuda)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON file (default .bench/model-<preset>-<device>.json)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.meta_init = args.device == "cuda" if args.meta_init is None else args.meta_init
    args.out = args.out or REPO_ROOT / ".bench" / f"model-{args.preset}-{args.device}.json"
    return args


# --- model --------------------------------------------------------------------------------------------------
def build_model(
    config: CogAgentConfig, device: torch.device, dtype: torch.dtype, seed: int, meta_init: bool
) -> torch.nn.Module:
    """Random weights on `device` (`init_model`). With meta_init: built on meta, allocated and initialised on
    the device — seconds for the 9B on a GPU instead of minutes of CPU init and a copy."""
    if meta_init:
        return init_model(config, seed=seed, dtype=dtype, device=device)
    return init_model(config, seed=seed, dtype=dtype).to(device)


def configure_training(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """Apply the mode (LoRA, frozen vision tower, gradient checkpointing) and switch to training."""
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.mode == "lora":
        from cogagent_nb.model.peft_recipes import add_lora  # peft is a dependency: a missing one is an error

        model = add_lora(model, scope="both")
        if args.grad_ckpt:
            model.enable_input_require_grads()
    elif args.freeze_vision:
        model.transformer.vision.requires_grad_(False)
    model.train()
    return model


# --- batch --------------------------------------------------------------------------------------------------
def synthetic_batch(
    config: CogAgentConfig, batch: int, seq_len: int, device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """Random text ids around one boi/placeholder/eoi triple per sample, a random image, labels = ids.

    Text ids are drawn below the smallest special id so no stray boi/eoi appears.
    """
    n_ids = seq_len - config.num_image_tokens + 1
    if n_ids < 4:
        raise SystemExit(
            f"--seq-len {seq_len} is shorter than the image ({config.num_image_tokens + 2}) + 1 text token"
        )
    special_floor = min([config.pad_token_id, config.boi_token_id, config.eoi_token_id, *config.eos_token_id])
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, special_floor, (batch, n_ids), generator=g)
    boi_at = 2  # after [gMASK]<sop>-like text, as in the chat template
    ids[:, boi_at : boi_at + 3] = torch.tensor([config.boi_token_id, config.pad_token_id, config.eoi_token_id])
    size = config.image_size
    images = torch.randn(batch, 3, size, size, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "position_ids": torch.arange(n_ids).expand(batch, n_ids).contiguous().to(device),
        "labels": ids.clone().to(device),
        "images": images.to(device=device, dtype=dtype),
    }


# --- measuring ----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or the process's peak resident set size on CPU (ru_maxrss is KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_steps(
    model, batch, optimizer, steps: int, warmup: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """Time `steps` forward+backward(+optimizer) steps after `warmup` untimed ones; returns (ms/step, losses)."""
    times, losses = [], []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - start))
            losses.append(float(loss.detach()))
    return times, losses


def machine_description(device: torch.device) -> dict[str, str | int]:
    info: dict[str, str | int] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count() or 0,
        "processor": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda or "")
    return info


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown (no commit)"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    config = CogAgentConfig.from_preset(args.preset)
    config.use_cache = False

    t0 = time.perf_counter()
    model = build_model(config, device, dtype, args.seed, args.meta_init)
    build_s = time.perf_counter() - t0
    model = configure_training(model, args)
    trainable, total = count_parameters(model)
    optimizer = None
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = synthetic_batch(config, args.batch, args.seq_len, device, dtype, args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    times, losses = run_steps(model, batch, optimizer, args.steps, args.warmup, device)
    ms = sorted(times)[len(times) // 2]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "mode": args.mode,
        "freeze_vision": bool(args.freeze_vision and args.mode == "full"),
        "grad_ckpt": args.grad_ckpt,
        "optimizer": args.optimizer,
        "meta_init": args.meta_init,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "input_ids_len": int(batch["input_ids"].shape[1]),
        "num_image_tokens": config.num_image_tokens,
        "steps": args.steps,
        "warmup": args.warmup,
        "ms_per_step_median": round(ms, 2),
        "ms_per_step_all": [round(t, 2) for t in times],
        "tokens_per_s": round(args.batch * args.seq_len / (ms / 1000), 1),
        "peak_memory_gib": round(peak_memory_bytes(device) / 2**30, 3),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "params_trainable": trainable,
        "params_total": total,
        "build_s": round(build_s, 2),
        "losses": [round(x, 4) for x in losses],
        "machine": machine_description(device),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


def print_table(r: dict) -> None:
    rows = [
        ("preset / device / dtype", f"{r['preset']} / {r['device']} / {r['dtype']}"),
        (
            "mode",
            r["mode"] + (" (vision frozen)" if r["freeze_vision"] else "") + (" + grad ckpt" if r["grad_ckpt"] else ""),
        ),
        (
            "batch x spliced seq (ids)",
            f"{r['batch']} x {r['seq_len']} ({r['input_ids_len']} ids, {r['num_image_tokens']} image tokens)",
        ),
        ("parameters trainable / total", f"{r['params_trainable']:,} / {r['params_total']:,}"),
        ("ms / step (median)", f"{r['ms_per_step_median']:.1f}"),
        ("tokens / s", f"{r['tokens_per_s']:,.0f}"),
        (f"peak memory ({r['peak_memory_kind']})", f"{r['peak_memory_gib']:.2f} GiB"),
        ("loss first -> last", f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}" if r["losses"] else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
