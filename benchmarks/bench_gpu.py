"""Speed and memory of every fine-tuning and inference method, each optimisation before/after, one command.

For issue 9 (docs/BENCHMARKS.md, "One GPU"): one process builds the model afresh for each case (random
weights, initialised on the device), times `--steps` steps after `--warmup` untimed ones and prints one
table; the JSON holds every figure. The optimisations of `modeling.SPEEDUPS` are switched off for the
`*-before` cases only, so each before/after pair runs in the same process on the same card.

Methods (the targets table of the issue):
  lora               official lora.yaml: r 8 on every `query_key_value`, both towers
  lora_language      LoRA on the language model only, vision tower frozen (freezeV)
  full_sft_one_gpu   every language-model weight trains, vision frozen; optimizer step included
  qlora              lora on a 4-bit NF4 base (bitsandbytes), when it is importable
  inference          prefill (logits of the last position, as `generate`), greedy decode at batch 1 and 8:
                     the static KV-cache decoder with CUDA graphs (decode_tok_s_bs1, what generate_answers
                     runs) and `GenerationMixin.generate` (decode_tok_s_bs1_generate, the path it replaced)

--padding adds batches of 4 demo samples of mixed lengths: padding waste in data order, shuffled and
grouped by length (the Trainer's group_by_length), and the LoRA step time of data order vs grouped.

Per case: step time (median, min, max), spliced tokens/s, MFU = model FLOPs / (step time x the bf16
matmul rate measured at the start of the same run), peak allocated and reserved memory. Model FLOPs
follow the issue's formula (`model_flops`), recomputation not counted.

Examples:
  python benchmarks/bench_gpu.py --preset tiny --device cpu --steps 1 --warmup 0     # the test-suite smoke
  python benchmarks/bench_gpu.py --preset cogagent-9b-20241220 --device cuda --parity --profile-dir out
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a clone without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_model import build_model, synthetic_batch  # noqa: E402
from cogagent_nb.model import modeling  # noqa: E402
from cogagent_nb.model.configuration import CogAgentConfig  # noqa: E402

GIB = 2**30


# --- cases --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One measured configuration: a method plus how it is run."""

    name: str
    method: str  # lora | lora_language | full_sft_one_gpu | qlora | inference
    checkpointing: str = "none"  # none | full | half (every 2nd layer) | selective (vision attention kept)
    speedups: bool = True  # modeling.SPEEDUPS all on (after) or all off (before)
    optimizer: str = "adamw"  # adamw (torch, states in the weights' dtype) | fused (BackwardFusedAdamW)
    compile_optimizer: bool = True
    note: str = ""


CASES: tuple[Case, ...] = (
    Case("lora-before", "lora", "none", speedups=False, note="as issue 9's baseline: full logits, no ckpt"),
    Case("lora-nockpt", "lora", "none", note="speedups, no checkpointing"),
    Case("lora-ckpt-before", "lora", "full", speedups=False, note="full ckpt, full logits"),
    Case("lora-ckpt", "lora", "full", note="speedups + full ckpt (the recipe: <= 30 GiB)"),
    Case("lora", "lora", "selective", note="speedups + selective ckpt (did not pay)"),
    Case("lora_language-before", "lora_language", "full", speedups=False, note="full ckpt, vision with grad mode"),
    Case("lora_language", "lora_language", "full", note="speedups + full ckpt"),
    Case("lora_language-nockpt", "lora_language", "none", note="speedups, no checkpointing"),
    Case("lora_language-half", "lora_language", "half", note="speedups, every 2nd layer checkpointed"),
    Case("full_sft_one_gpu-before", "full_sft_one_gpu", "full", speedups=False, note="torch AdamW, bf16 states"),
    Case(
        "full_sft_one_gpu-eager", "full_sft_one_gpu", "full", optimizer="fused", compile_optimizer=False, note="eager"
    ),
    Case("full_sft_one_gpu", "full_sft_one_gpu", "full", optimizer="fused", note="fused in backward, compiled"),
    Case("full_sft_one_gpu-half", "full_sft_one_gpu", "half", optimizer="fused", note="as above, every 2nd layer ckpt"),
    Case("qlora", "qlora", "selective", note="NF4 base, bf16 compute, selective ckpt"),
    Case("inference", "inference"),
)


def speedups(on: bool):
    """Every `modeling.SPEEDUPS` switch on (or off) for the duration of a case."""
    return modeling.SPEEDUPS.switched(**{f.name: on for f in dataclasses.fields(modeling.SPEEDUPS)})


# --- FLOPs (issue 9's formula) ------------------------------------------------------------------------------
def tower_flops(config: CogAgentConfig, seq_len: int, batch: int) -> tuple[float, float]:
    """Forward FLOPs (language, vision) of one step: 2 x matmul parameters x tokens + attention scores.

    Language: 2 (layers x layer matmul params + vocab x hidden) L + 2 * 2 L^2 hidden layers / 2 (causal).
    Vision: 2 layers x layer params x N + 2 * 2 N^2 hidden_v layers + 2 (conv + GLU params) n,
    N = patches + cls, n = image tokens after the 2x2 conv.
    """
    h, f = config.hidden_size, config.ffn_hidden_size
    layer = h * config.qkv_width + config.q_width * h + h * 2 * f + f * h
    language = 2 * (config.num_layers * layer + config.padded_vocab_size * h) * seq_len
    language += 2 * 2 * seq_len**2 * h * config.num_layers / 2
    v = config.vision_config
    hv, fv, depth = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    vision_layer = hv * 3 * hv + hv * hv + 2 * hv * fv
    adapter = hv * 4 * h + h * h + 3 * h * f  # 2x2 conv into the language width, then the GLU
    vision = 2 * depth * vision_layer * tokens + 2 * 2 * tokens**2 * hv * depth + 2 * adapter * config.num_image_tokens
    return batch * language, batch * vision


def model_flops(method: str, config: CogAgentConfig, seq_len: int, batch: int) -> float:
    """Forward + backward FLOPs: backward = forward where gradients pass, 2 x forward where weights train."""
    language, vision = tower_flops(config, seq_len, batch)
    backward = {
        "lora": language + vision,
        "qlora": language + vision,
        "lora_language": language,
        "full_sft_one_gpu": 2 * language,
        "inference": 0.0,
    }[method]
    return language + vision + backward


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s (8192^3 bf16 on a GPU; a small fp32 product on CPU), random operands."""
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    repeats = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


# --- building a case ----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantize_to_nf4(model: torch.nn.Module, device: torch.device) -> int:
    """Swap every Linear of both towers (not the output layer) for a bitsandbytes 4-bit NF4 Linear.

    The QLoRA recipe (Dettmers et al., arXiv 2305.14314): NF4 weights with double-quantised scales,
    bf16 compute. Returns the number of layers swapped. Benchmark-only: loading a checkpoint in 4 bit
    goes through transformers' BitsAndBytesConfig.
    """
    import bitsandbytes as bnb

    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or (parent_name.endswith("transformer") and name == "output_layer"):
                continue
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
                device="meta",
            )
            quantized.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True, module=quantized
            )
            quantized.weight = quantized.weight.to(device)  # Params4bit.to quantizes in place
            quantized.bias = child.bias
            setattr(parent, name, quantized)
            swapped += 1
    return swapped


def prepare(case: Case, config: CogAgentConfig, args: argparse.Namespace) -> tuple[torch.nn.Module, Any, dict]:
    """Model (+ optimizer) for a case; returns (model, optimizer or None, facts for the JSON)."""
    device, dtype = torch.device(args.device), args.torch_dtype
    config = copy.deepcopy(config)  # a case may change its model's config (inference turns the cache on)
    model = build_model(config, device, dtype, args.seed, meta_init=device.type == "cuda")
    facts: dict[str, Any] = {}
    if case.method == "inference":
        model.config.use_cache = model.generation_config.use_cache = True
        return model.eval(), None, facts
    if case.method == "qlora":
        facts["nf4_layers"] = quantize_to_nf4(model, device)
        gc.collect()
        torch.cuda.empty_cache()
    if case.method in ("lora", "lora_language", "qlora"):
        from cogagent_nb.model.peft_recipes import add_lora

        scope = "language" if case.method == "lora_language" else "both"
        if case.method == "lora_language":
            model.transformer.vision.requires_grad_(False)
        model = add_lora(model, scope=scope, dropout=args.lora_dropout)
    else:  # full_sft_one_gpu: the official sft.yaml, freezeV
        model.transformer.vision.requires_grad_(False)
    if case.checkpointing in ("full", "half"):
        modeling.enable_activation_checkpointing(model, every_n_layers=2 if case.checkpointing == "half" else 1)
    elif case.checkpointing == "selective":
        modeling.selective_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    facts["params_trainable"] = sum(p.numel() for p in params)
    if case.optimizer == "fused":
        from cogagent_nb.train.optim import BackwardFusedAdamW

        optimizer = BackwardFusedAdamW(params, lr=args.lr, compile=case.compile_optimizer and device.type == "cuda")
        facts["optimizer"] = "BackwardFusedAdamW (bf16 states, stochastic rounding, step fused into backward)"
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, foreach=True)
        facts["optimizer"] = f"torch.optim.AdamW (states in {str(dtype).removeprefix('torch.')})"
    return model, optimizer, facts


# --- measuring ----------------------------------------------------------------------------------------------
def time_steps(step: Callable[[], float], steps: int, warmup: int, device: torch.device) -> tuple[list[float], list]:
    """Seconds per call of `step` (synchronised) after warm-up; also each call's return value."""
    times, values = [], []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        value = step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            values.append(value)
    return times, values


def train_step(model: torch.nn.Module, optimizer: Any, batch: dict) -> Callable[[], float]:
    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":  # no allocator statistics on CPU
        return {"peak_gib": None, "reserved_gib": None}
    return {
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2),
        "reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 2),
    }


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def summarise(times: list[float]) -> dict[str, float]:
    return {
        "step_s": round(statistics.median(times), 4),
        "step_s_min": round(min(times), 4),
        "step_s_max": round(max(times), 4),
    }


def run_training_case(case: Case, config: CogAgentConfig, args: argparse.Namespace, rate: float) -> dict:
    device = torch.device(args.device)
    with speedups(case.speedups):
        model, optimizer, facts = prepare(case, config, args)
        batch = synthetic_batch(config, args.batch, args.seq_len, device, args.torch_dtype, args.seed)
        reset_memory(device)
        times, losses = time_steps(train_step(model, optimizer, batch), args.steps, args.warmup, device)
        result = {**summarise(times), **memory(device), **facts, "losses": [round(x, 4) for x in losses]}
        if args.profile_dir and case.name in args.profile:
            result["profile"] = profile(train_step(model, optimizer, batch), device, args.profile_dir / case.name)
    flops = model_flops(case.method, config, args.seq_len, args.batch)
    result.update(
        tokens_per_s=round(args.batch * args.seq_len / result["step_s"], 1),
        tflop_per_step=round(flops / 1e12, 2),
        model_flops=flops,
        mfu=round(flops / (result["step_s"] * rate), 4),
    )
    if hasattr(optimizer, "remove_hooks"):
        optimizer.remove_hooks()  # the hooks tie parameters and optimizer state together
    del model, optimizer
    return result


def run_inference_case(case: Case, config: CogAgentConfig, args: argparse.Namespace, rate: float) -> dict:
    """Prefill as `generate` does it (logits of the last position), then greedy decode at batch 1 and 8,
    through the static decoder and through `generate` (`DECODE_PATHS`), in the same process; the share of
    equal ids between the two (`decode_same_ids_bs*`) shows they decode the same thing up to rounding."""
    device = torch.device(args.device)
    model, _, _ = prepare(case, config, args)
    result: dict[str, Any] = {}
    one = synthetic_batch(config, 1, args.seq_len, device, args.torch_dtype, args.seed)
    one.pop("labels")
    reset_memory(device)
    with torch.no_grad():
        times, _ = time_steps(lambda: model(**one, use_cache=True, logits_to_keep=1), args.steps, args.warmup, device)
    result.update(summarise(times), **memory(device))
    flops = model_flops("inference", config, args.seq_len, 1)
    result.update(tflop_per_step=round(flops / 1e12, 2), mfu=round(flops / (result["step_s"] * rate), 4))
    for rows in args.decode_batches:
        inputs = synthetic_batch(config, rows, args.seq_len, device, args.torch_dtype, args.seed + rows)
        inputs.pop("labels")
        ids = {}
        for suffix, decode in decode_paths(device).items():
            reset_memory(device)
            decode_s, fixed_s, ids[suffix] = decode_seconds_per_step(decode, model, inputs, args.new_tokens, device)
            result[f"decode_tok_s_bs{rows}{suffix}"] = round(rows / decode_s, 1)
            result[f"decode_ms_per_step_bs{rows}{suffix}"] = round(1000 * decode_s, 2)
            result[f"decode_fixed_s_bs{rows}{suffix}"] = round(fixed_s, 4)
            result[f"peak_gib_bs{rows}{suffix}"] = memory(device)["peak_gib"]
        same = (ids[""] == ids["_generate"]).float().mean().item() if ids[""].shape == ids["_generate"].shape else 0.0
        result[f"decode_same_ids_bs{rows}"] = round(same, 4)
    if args.profile_dir and case.name in args.profile:
        inputs = synthetic_batch(config, 1, args.seq_len, device, args.torch_dtype, args.seed)
        inputs.pop("labels")
        for suffix, decode in decode_paths(device).items():
            result[f"profile{suffix}"] = profile(
                lambda decode=decode: decode(model, inputs, 16), device, args.profile_dir / f"decode{suffix}", 16
            )
    model = None  # free the weights before the next case
    return result


def generate(model: torch.nn.Module, inputs: dict, new_tokens: int) -> torch.Tensor:
    """The "before" path: `GenerationMixin.generate`, greedy, no stop before `new_tokens`; the new ids."""
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=model.config.pad_token_id,
    )
    return out[:, inputs["input_ids"].shape[1] :]


def static_decode(model: torch.nn.Module, inputs: dict, new_tokens: int, compile_step: bool = False) -> torch.Tensor:
    """The "after" path: the static KV-cache decoder, a CUDA graph replay per token on a GPU.

    `generate` above never stops (min_new_tokens = new_tokens sets the stop ids' scores to -inf); the
    same here: no stop ids, and the stop ids are suppressed with the image markers, so both choose
    among the same candidates and their ids can be compared.
    """
    from cogagent_nb.infer.static_decode import greedy_generate

    config, device = model.config, inputs["input_ids"].device
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return greedy_generate(
        model,
        **inputs,
        max_new_tokens=new_tokens,
        stop_ids=(),
        pad_token_id=config.pad_token_id,
        suppress_ids=(config.boi_token_id, config.eoi_token_id, *eos),
        use_graph=device.type == "cuda",
        compile_step=compile_step,
    )


def static_decode_compiled(model: torch.nn.Module, inputs: dict, new_tokens: int) -> torch.Tensor:
    """The static decoder with its step compiled (`greedy_generate(compile_step=True)`), opt-in."""
    return static_decode(model, inputs, new_tokens, compile_step=True)


DECODE_PATHS: dict[str, Callable[[torch.nn.Module, dict, int], torch.Tensor]] = {
    "": static_decode,  # decode_tok_s_bs1: what `generate_answers` runs for greedy answers
    "_compiled": static_decode_compiled,  # decode_tok_s_bs1_compiled: the same, step through torch.compile
    "_generate": generate,  # decode_tok_s_bs1_generate: the path it replaced
}


def decode_paths(device: torch.device) -> dict[str, Callable[[torch.nn.Module, dict, int], torch.Tensor]]:
    """`DECODE_PATHS` measured on `device`: the compiled step only on CUDA (Inductor's CPU build of the
    step is slow to compile and not what is measured)."""
    return {k: v for k, v in DECODE_PATHS.items() if k != "_compiled" or device.type == "cuda"}


def decode_seconds_per_step(
    decode: Callable[[torch.nn.Module, dict, int], torch.Tensor],
    model: torch.nn.Module,
    inputs: dict,
    new_tokens: int,
    device: torch.device,
    repeats: int = 2,
) -> tuple[float, float, torch.Tensor]:
    """(seconds per decode step, fixed seconds per call, the new ids of the longer call).

    Per step: (time with 2 + new_tokens tokens - time with 2 tokens) / new_tokens, so the fixed costs
    (prefill, and for the static decoder the warm-up and graph capture, which need at least one decode
    step) cancel. Each time is the best of `repeats` runs, so a stray pause does not land in the
    difference. Fixed: the time with 2 tokens minus one step.
    """
    with torch.no_grad():
        decode(model, inputs, 4)  # warm-up
        timings = {}
        for count in (2, 2 + new_tokens):
            best = float("inf")
            for _ in range(repeats):
                sync(device)
                start = time.perf_counter()
                out = decode(model, inputs, count)
                sync(device)
                best = min(best, time.perf_counter() - start)
            timings[count] = best
            if out.shape != (inputs["input_ids"].shape[0], count):
                raise RuntimeError(f"{decode.__name__} returned {tuple(out.shape)} new ids, expected {count} per row")
    per_step = (timings[2 + new_tokens] - timings[2]) / new_tokens
    return per_step, timings[2] - per_step, out


def profile(step: Callable[[], Any], device: torch.device, out: Path, wall_divisor: int = 1) -> dict:
    """torch.profiler over one call: top kernels by device time (table written to `out`.txt) and GPU busy share."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()  # warm
    sync(device)
    start = time.perf_counter()
    with torch_profile(activities=activities, profile_memory=False) as prof:
        step()
        sync(device)
    wall = time.perf_counter() - start
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(f"wall {wall:.4f} s, kernels {busy:.4f} s\n{table}\n", encoding="utf-8")
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    return {
        "wall_s": round(wall, 4),
        "kernel_s": round(busy, 4),
        "gpu_busy_share": round(busy / wall, 3) if wall else None,
        "per": wall_divisor,
        "top_kernels": [
            {"name": e.key[:90], "s": round(e.self_device_time_total / 1e6, 4), "calls": e.count} for e in top
        ],
    }


def gqa_mask_attention(config: CogAgentConfig, args: argparse.Namespace, rows: int = 4) -> dict:
    """SDPA forward + backward of one language layer with a padding mask: enable_gqa vs K/V repeated.

    Issue 9's trap: with an explicit mask, `enable_gqa` runs on the math kernel on CUDA (it
    materialises the (B, Hq, L, L) scores); repeated K/V reach the memory-efficient kernel.
    """
    import torch.nn.functional as F

    device, dtype = torch.device(args.device), args.torch_dtype
    heads, kv_heads, dim, length = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.kv_channels,
        args.seq_len,
    )
    q = torch.randn(rows, heads, length, dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(rows, kv_heads, length, dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(rows, kv_heads, length, dim, device=device, dtype=dtype, requires_grad=True)
    padding = torch.ones(rows, length, dtype=torch.bool, device=device)
    padding[1:, : length // 4] = False  # three rows left-padded by a quarter
    mask, _ = modeling.build_attention_mask(padding, length, 0)
    groups = heads // kv_heads

    def grouped() -> float:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out.sum().backward()
        return 0.0

    def expanded() -> float:
        kk, vv = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        out.sum().backward()
        return 0.0

    result = {"rows": rows, "length": length}
    for name, fn in (("enable_gqa_s", grouped), ("expanded_kv_s", expanded)):
        reset_memory(device)
        times, _ = time_steps(fn, 5, 2, device)
        result[name] = round(statistics.median(times), 5)
        result[name.replace("_s", "_peak_gib")] = memory(device)["peak_gib"]
    return result


# --- padding: batches of 4 mixed lengths, in data order or grouped by length -------------------------------
DEMO_TRAIN = REPO_ROOT / "data" / "CogAgentData" / "train.jsonl"


def demo_lengths(config: CogAgentConfig, tokenizer_dir: Path | None) -> list[int]:
    """Spliced lengths (text ids + the image's n - 1 extra slots) of the demo training samples.

    Encoded as finetune.py encodes them (`encode_conversation` with configs/lora.yaml's length budgets);
    a blank image stands in for each screenshot, since lengths do not depend on pixels. The tokenizer
    is `tokenizer_dir`'s or, by default, the course's tiny one, which spells text in more ids than
    GLM-4's 151k-rank tokenizer does (so the text share of a sample is overstated).
    """
    from PIL import Image

    from cogagent_nb.data.encoding import encode_conversation
    from cogagent_nb.data.tokenizer import TINY_TOKENIZER_FILE, ChatGLM4Tokenizer
    from cogagent_nb.data.validation import load_conversations
    from cogagent_nb.train.config import load_config
    from cogagent_nb.train.data import length_budgets

    if tokenizer_dir is not None:
        tokenizer = ChatGLM4Tokenizer.from_pretrained(str(tokenizer_dir), image_size=14)
    else:
        tokenizer = ChatGLM4Tokenizer(TINY_TOKENIZER_FILE, image_size=14)
    budgets = length_budgets(load_config(REPO_ROOT / "configs" / "lora.yaml"))
    blank = Image.new("RGB", (14, 14))
    lengths = []
    for conversation in load_conversations(DEMO_TRAIN):
        messages = [{**m, "image": blank} if m.get("image") is not None else m for m in conversation["messages"]]
        sample = encode_conversation(messages, tokenizer, num_image_tokens=config.num_image_tokens, **budgets)
        lengths.append(len(sample.input_ids) + config.num_image_tokens - 1)
    return lengths


def batch_orders(lengths: list[int], rows: int, seed: int) -> dict[str, list[list[int]]]:
    """Index batches of `rows`: in data order, shuffled (the Trainer's default sampler), grouped by length
    (the Trainer's `group_by_length`: transformers' `get_length_grouped_indices`, mega-batches of 50 x rows
    sorted longest first)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    orders = {
        "data_order": list(range(len(lengths))),
        "shuffled": torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist(),
        "grouped": get_length_grouped_indices(lengths, rows, generator=torch.Generator().manual_seed(seed)),
    }
    return {name: [order[i : i + rows] for i in range(0, len(order), rows)] for name, order in orders.items()}


def padding_waste(lengths: list[int], batches: list[list[int]]) -> float:
    """Padded slots / all slots when each batch is padded to its longest sample."""
    slots = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1 - sum(lengths[i] for batch in batches for i in batch) / slots


def padded_batch(
    config: CogAgentConfig, lengths: list[int], device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """`synthetic_batch` rows of the given spliced lengths, right-padded as the training collator pads."""
    rows = [synthetic_batch(config, 1, length, device, dtype, seed + i) for i, length in enumerate(lengths)]
    width = max(row["input_ids"].shape[1] for row in rows)
    fill = {"input_ids": config.pad_token_id, "attention_mask": 0, "position_ids": 0, "labels": -100}
    batch = {
        key: torch.cat([torch.nn.functional.pad(r[key], (0, width - r[key].shape[1]), value=v) for r in rows])
        for key, v in fill.items()
    }
    batch["images"] = torch.cat([r["images"] for r in rows])
    return batch


def padding_report(config: CogAgentConfig, args: argparse.Namespace, rows: int = 4, timed: int = 16) -> dict:
    """Padding waste of batches of `rows` demo samples per order, and the LoRA step time of each order.

    Waste is over the whole demo training file. Time: the official LoRA recipe (both towers, full
    checkpointing) over the same `timed` samples (a seeded draw) batched in data order and grouped by
    length (sorted longest first, as one mega-batch of `group_by_length`), one untimed step first.
    """
    device = torch.device(args.device)
    lengths = demo_lengths(config, args.tokenizer)
    orders = batch_orders(lengths, rows, args.seed)
    result: dict[str, Any] = {"rows": rows, "samples": len(lengths), "length_min": min(lengths)}
    result["length_max"] = max(lengths)
    result.update({f"waste_{name}": round(padding_waste(lengths, batches), 4) for name, batches in orders.items()})
    subset = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(args.seed))[:timed].tolist()
    subset_orders = {"data_order": sorted(subset), "grouped": sorted(subset, key=lambda i: -lengths[i])}
    model, optimizer, _ = prepare(Case("padding", "lora", "full"), config, args)
    for name, order in subset_orders.items():
        batches = [[lengths[i] for i in order[j : j + rows]] for j in range(0, len(order), rows)]
        steps = [
            train_step(model, optimizer, padded_batch(config, b, device, args.torch_dtype, args.seed)) for b in batches
        ]
        steps[0]()  # warm-up
        sync(device)
        start = time.perf_counter()
        for step in steps:
            step()
        sync(device)
        result[f"subset_s_{name}"] = round(time.perf_counter() - start, 3)
        result[f"subset_waste_{name}"] = round(
            padding_waste(lengths, [order[j : j + rows] for j in range(0, len(order), rows)]), 4
        )
    result["subset_samples"] = timed
    del model, optimizer
    return result


# --- parity: the optimised LoRA step against the plain one ---------------------------------------------------
def lora_parity(config: CogAgentConfig, args: argparse.Namespace) -> dict:
    """Loss and LoRA gradients: speedups + checkpointing against neither, same weights and batch.

    LoRA dropout is 0 and lora_B is drawn at random (it starts at zero, which would make every
    lora_A gradient zero). The backward of the plain path is not deterministic on CUDA (cuDNN
    attention backward), so the plain step is run twice: their gap is the noise floor, and the
    optimised step passes when its loss equals the plain one to 1e-3 and its gradients stay within
    1.5 x that floor (relative L2 distance over all LoRA gradients).
    """
    device = torch.device(args.device)
    case = Case("parity", "lora", "none")
    model, _, _ = prepare(case, config, argparse.Namespace(**{**vars(args), "lora_dropout": 0.0}))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, device=device, generator=generator) * 0.01)
    batch = synthetic_batch(config, args.batch, args.seq_len, device, args.torch_dtype, args.seed)

    def loss_and_grads(on: bool) -> tuple[float, dict[str, torch.Tensor]]:
        with speedups(on):
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
        return float(loss.detach()), {
            n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None
        }

    def gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        diff = sum(float((b[n] - g).norm() ** 2) for n, g in a.items()) ** 0.5
        return diff / sum(float(g.norm() ** 2) for g in a.values()) ** 0.5

    plain_loss, plain = loss_and_grads(False)
    _, plain_again = loss_and_grads(False)
    modeling.enable_activation_checkpointing(model)
    fast_loss, fast = loss_and_grads(True)
    floor, distance = gap(plain, plain_again), gap(plain, fast)
    loss_gap = abs(fast_loss - plain_loss) / abs(plain_loss)
    model = None  # free the weights
    return {
        "loss_plain": plain_loss,
        "loss_optimised": fast_loss,
        "loss_rel_diff": loss_gap,
        "grad_rel_l2_plain_vs_plain": floor,
        "grad_rel_l2_plain_vs_optimised": distance,
        "tensors": len(plain),
        "tolerance": "loss rel diff < 1e-3; gradient rel L2 <= 1.5 x plain-vs-plain + 1e-6",
        "passed": loss_gap < 1e-3 and distance <= 1.5 * floor + 1e-6,
    }


def loss_curves(config: CogAgentConfig, args: argparse.Namespace) -> dict:
    """LoRA and QLoRA on one fixed batch for `--curve-steps` steps, same seed: do the curves agree?"""
    device = torch.device(args.device)
    curves = {}
    for method in ("lora", "qlora"):
        torch.manual_seed(args.seed)
        model, optimizer, _ = prepare(Case(method, method, "selective"), config, args)
        for group in optimizer.param_groups:
            group["lr"] = args.curve_lr
        batch = synthetic_batch(config, args.batch, args.seq_len, device, args.torch_dtype, args.seed)
        step = train_step(model, optimizer, batch)
        curves[method] = [round(step(), 4) for _ in range(args.curve_steps)]
        del model, optimizer
        reset_memory(device)
    gaps = [abs(a - b) for a, b in zip(curves["lora"], curves["qlora"], strict=True)]
    return {
        **curves,
        "lr": args.curve_lr,
        "max_abs_gap": round(max(gaps), 4),
        "lora_drop": round(curves["lora"][0] - curves["lora"][-1], 4),
    }


# --- driver -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "cogagent-9b-20241220", "glm-4v-9b"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cases", default="all", help="comma-separated case names (default: all); see CASES")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None, help="spliced length (default 2048 on the 9B, 194 on tiny)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per generate")
    p.add_argument("--decode-batches", default="1,8")
    p.add_argument("--parity", action="store_true", help="compare the optimised LoRA step with the plain one")
    p.add_argument("--attention", action="store_true", help="time SDPA with a mask: enable_gqa vs repeated K/V")
    p.add_argument(
        "--padding", action="store_true", help="batches of 4 demo samples: padding waste and LoRA step time by order"
    )
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder for --padding (default: tiny)")
    p.add_argument("--curve-steps", type=int, default=0, help="LoRA vs QLoRA loss curves over this many steps")
    p.add_argument("--curve-lr", type=float, default=1e-3)
    p.add_argument("--profile-dir", type=Path, default=None, help="write torch.profiler tables here")
    p.add_argument("--profile", default="lora,full_sft_one_gpu,inference", help="cases to profile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each case in its own process (default: on for cuda)",
    )
    p.add_argument("--matmul-tflops", type=float, default=None, help="skip measuring the matmul rate (child runs)")
    p.add_argument("--out", type=Path, default=None, help="JSON (default .bench/gpu-<preset>-<device>.json)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.isolate = args.device == "cuda" if args.isolate is None else args.isolate
    args.torch_dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    args.seq_len = args.seq_len or (2048 if args.preset != "tiny" else 194)
    args.decode_batches = [int(x) for x in args.decode_batches.split(",") if x]
    args.profile = set(args.profile.split(","))
    args.out = args.out or REPO_ROOT / ".bench" / f"gpu-{args.preset}-{args.device}.json"
    names = [c.name for c in CASES]
    wanted = names if args.cases == "all" else args.cases.split(",")
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        p.error(f"--cases: unknown {unknown}; known: {names}")
    by_name = {c.name: c for c in CASES}
    args.selected = [by_name[name] for name in wanted]  # in the order given: the most wanted first
    return args


def bitsandbytes_missing() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a library that fails to load its CUDA binary
        return f"{type(err).__name__}: {err}"
    return None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    config = CogAgentConfig.from_preset(args.preset)
    config.use_cache = False
    rate = args.matmul_tflops * 1e12 if args.matmul_tflops else matmul_rate(device, args.torch_dtype)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{card}: measured {'bf16' if device.type == 'cuda' else 'fp32'} matmul rate {rate / 1e12:.1f} TFLOP/s")
    report: dict[str, Any] = {
        "card": card,
        "matmul_tflops": round(rate / 1e12, 1),
        "command": " ".join(["python3", *sys.argv]),
        "commit": os.environ.get("BENCH_COMMIT") or git_commit(),  # a copied tree has no .git of its own
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "cases": {},
    }
    missing_bnb = bitsandbytes_missing() if device.type == "cuda" else "bitsandbytes 4-bit needs CUDA"
    for case in args.selected:
        if case.method == "qlora" and missing_bnb:
            report["cases"][case.name] = {"skipped": missing_bnb}
            print(f"{case.name}: skipped ({missing_bnb})")
            continue
        start = time.perf_counter()
        try:
            if args.isolate:
                result = run_in_child(case, args, rate)
            else:
                runner = run_inference_case if case.method == "inference" else run_training_case
                result = runner(case, config, args, rate)
        except torch.cuda.OutOfMemoryError as err:
            result = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        except Exception as err:  # one broken case must not cost the rest of a lease
            result = {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": traceback.format_exc()[-4000:]}
        reset_memory(device)
        result.update(method=case.method, checkpointing=case.checkpointing, speedups=case.speedups, note=case.note)
        result["case_s"] = round(time.perf_counter() - start, 1)
        report["cases"][case.name] = result
        shown = {k: v for k, v in result.items() if not k.startswith("profile") and k != "losses"}
        print(f"{case.name}: " + json.dumps(shown))
        write(report, args.out)
    if args.attention:
        report["gqa_mask_attention"] = gqa_mask_attention(config, args)
        print("gqa + mask attention: " + json.dumps(report["gqa_mask_attention"]))
        reset_memory(device)
    if args.padding:
        report["padding"] = padding_report(config, args)
        print("padding, batches of 4: " + json.dumps(report["padding"]))
        reset_memory(device)
    if args.parity:
        report["parity"] = lora_parity(config, args)
        print("parity: " + json.dumps(report["parity"]))
        reset_memory(device)
    if args.curve_steps and not missing_bnb:
        report["loss_curves"] = loss_curves(config, args)
        print("loss curves: " + json.dumps(report["loss_curves"]))
    write(report, args.out)
    print_table(report)
    return 0


def run_in_child(case: Case, args: argparse.Namespace, rate: float) -> dict:
    """Run one case in a fresh Python process, so no memory of an earlier case can stay on the card.

    (One run of this script in a single process saw the peaks of the cases after the full fine-tuning
    case grow by ~50 GiB: something of that case outlived it; separate processes measure each case alone.)
    """
    out = args.out.with_name(f"{args.out.stem}.{case.name}.json")
    argv = [a for a in args.argv if a not in ("--parity", "--attention", "--padding", "--isolate")]
    argv = [*_without_option(argv, ("--cases", "--out", "--curve-steps", "--matmul-tflops"))]
    argv += ["--cases", case.name, "--out", str(out), "--no-isolate", "--matmul-tflops", str(rate / 1e12)]
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], check=False)
    if done.returncode != 0 or not out.exists():
        return {"error": f"child process exited with {done.returncode}"}
    result = json.loads(out.read_text(encoding="utf-8"))["cases"][case.name]
    out.unlink()
    return result


def _without_option(argv: list[str], names: tuple[str, ...]) -> list[str]:
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in names:
            skip = True
            continue
        if not any(item.startswith(name + "=") for name in names):
            kept.append(item)
    return kept


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def print_table(report: dict) -> None:
    head = f"{'case':<26}{'step s (min-max)':>22}{'tok/s':>9}{'MFU':>7}{'peak GiB':>10}{'reserved':>10}  note"
    print(
        f"\n{report['card']}, matmul {report['matmul_tflops']} TFLOP/s, batch {report['batch']} x {report['seq_len']}"
    )
    print(head)
    for name, r in report["cases"].items():
        if "step_s" not in r:
            print(f"{name:<26}{r.get('skipped') or r.get('error')}")
            continue
        spread = f"{r['step_s']:.3f} ({r['step_s_min']:.3f}-{r['step_s_max']:.3f})"
        tokens = r.get("tokens_per_s", "")
        peak = "-" if r["peak_gib"] is None else r["peak_gib"]
        reserved = "-" if r["reserved_gib"] is None else r["reserved_gib"]
        extra = "  ".join(f"{k}={v}" for k, v in r.items() if k.startswith("decode_tok_s"))
        print(f"{name:<26}{spread:>22}{tokens:>9}{r['mfu']:>7.1%}{peak:>10}{reserved:>10}  {r['note']} {extra}")


if __name__ == "__main__":
    sys.exit(main())
