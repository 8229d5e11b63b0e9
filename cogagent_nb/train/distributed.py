"""Preparing a process for multi-process and DeepSpeed training, on GPUs and on a plain CPU.

Launchers describe the job to each process through environment variables (torchrun docs, "Environment
Variables"; the `deepspeed` launcher sets the same ones and also passes `--local_rank=N`):

    RANK         this process's index among all processes        0 .. WORLD_SIZE-1
    LOCAL_RANK   its index on this machine (= the GPU it uses)   0 .. LOCAL_WORLD_SIZE-1
    WORLD_SIZE   processes in the job (nodes x processes per node)
    MASTER_ADDR / MASTER_PORT   where rank 0 listens for the others to join

Three situations need more than the launcher gives, and `prepare_distributed(training_args)` handles each
in the one place where the Trainer's arguments are built (`cogagent_nb.train.finetune.build_training_args`):

1. DeepSpeed in a single process (`python finetune.py ... configs/sft.yaml`, a notebook): DeepSpeed
   always creates a process group, and without a launcher it would look for MPI. The HF DeepSpeed guide
   ("Deployment in Notebooks") sets RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR, MASTER_PORT by hand;
   `single_process_env()` does that, with a free port so that two runs on one machine do not collide.
2. DeepSpeed on CPU: `TrainingArguments._setup_devices` builds accelerate's `PartialState` without a
   backend, and `PartialState._prepare_backend` chooses one only for an accelerator (nccl, hccl, ...), so on
   a CPU no process group would be made for DeepSpeed. This module creates the state first, with
   `ACCELERATE_USE_DEEPSPEED=true` and `PartialState(backend="gloo")`, and asks the Trainer to use it
   (`accelerator_config={"use_configured_state": True}`). It also sets DS_ACCELERATOR=cpu (unless the user
   chose one), so that DeepSpeed takes the CPU as meant instead of warning, in every process, that it found
   no GPU. DeepSpeed's CPU accelerator then runs ZeRO over gloo and JIT-compiles one small C++ op
   (`deepspeed_shm_comm`, shared-memory all-reduce) on first use, ~1 minute on 2 cores:
   `TORCH_EXTENSIONS_DIR` points at one cache that every later run reuses, and `build_cpu_ops()` (called by
   `make setup`) fills it in advance.
3. Plain data parallel (no DeepSpeed) on CPU: with several processes and no GPU, transformers only
   creates a gloo process group when `use_cpu=True`; otherwise each process would silently train alone.

On GPUs with a launcher (torchrun, deepspeed) nothing is changed: NCCL, the launcher's variables and
transformers' own set-up are used as they are.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
JIT_CACHE_VARIABLE = "TORCH_EXTENSIONS_DIR"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job, read from the launcher's environment variables."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str | None
    master_port: int | None
    launched: bool  # True when a launcher (torchrun, deepspeed, this module) set RANK and WORLD_SIZE

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_info(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; a lone process is rank 0 of 1."""
    env = os.environ if env is None else env

    def number(name: str, default: int) -> int:
        value = env.get(name)
        if value in (None, ""):
            return default
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer") from None

    port = env.get("MASTER_PORT")
    return LaunchInfo(
        rank=number("RANK", 0),
        local_rank=number("LOCAL_RANK", number("RANK", 0)),
        world_size=number("WORLD_SIZE", 1),
        master_addr=env.get("MASTER_ADDR") or None,
        master_port=number("MASTER_PORT", 0) if port else None,
        launched="RANK" in env and "WORLD_SIZE" in env,
    )


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` right now (the OS picks it), for a rendezvous or MASTER_PORT."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def single_process_env(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Make a process that no launcher started look like rank 0 of a job of 1; return what was set.

    Variables that are already set are kept, so a launcher's values always win.
    """
    env = os.environ if env is None else env
    wanted = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": LOOPBACK}
    added = {name: value for name, value in wanted.items() if name not in env}
    if "MASTER_PORT" not in env:
        added["MASTER_PORT"] = str(free_port())
    env.update(added)
    return added


def consume_local_rank_argument(argv: Sequence[str], env: MutableMapping[str, str] | None = None) -> list[str]:
    """Remove `--local_rank=N` / `--local_rank N` (what the `deepspeed` launcher appends) from argv.

    The value goes to LOCAL_RANK when the launcher did not set it, so the official positional command
    line `finetune.py DATA MODEL CONFIG [RESUME]` parses the same under every launcher.
    """
    env = os.environ if env is None else env
    out: list[str] = []
    args = list(argv)
    index = 0
    while index < len(args):
        arg = args[index]
        if arg.startswith(("--local_rank=", "--local-rank=")):
            env.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and index + 1 < len(args):
            env.setdefault("LOCAL_RANK", args[index + 1])
            index += 1
        else:
            out.append(arg)
        index += 1
    return out


def default_jit_cache() -> Path:
    """Where DeepSpeed's JIT-compiled ops are kept: $XDG_CACHE_HOME (or ~/.cache)/cogagent_nb/torch_extensions."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cogagent_nb" / "torch_extensions"


def use_jit_cache(env: MutableMapping[str, str] | None = None) -> Path:
    """Set TORCH_EXTENSIONS_DIR to the shared cache unless the user chose one; return the folder in use."""
    env = os.environ if env is None else env
    env.setdefault(JIT_CACHE_VARIABLE, str(default_jit_cache()))
    return Path(env[JIT_CACHE_VARIABLE])


# DeepSpeed's CPU accelerator compiles these on first use: the shared-memory all-reduce (every ZeRO run on
# a CPU) and the CPU Adam behind ds_zero_3.json's `optimizer` block (~1 and ~2 minutes on 2 cores).
CPU_OPS = ("ShareMemCommBuilder", "FusedAdamBuilder")


def build_cpu_ops(ops: Sequence[str] = CPU_OPS) -> list[str]:
    """Compile DeepSpeed's CPU ops into the JIT cache now, so that no training run stops to compile them.

    `make setup` calls this once: a launch, a lesson or a test then finds the ops built (torch rebuilds
    only when the compiler command changes: another venv, another CPU). On an accelerator other than the
    CPU nothing is built (its ops are CUDA or NPU code, compiled at first use or shipped prebuilt).
    Returns the names of the ops built or found in the cache.
    """
    use_jit_cache()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return []
    built = []
    for op in ops:
        builder = accelerator.create_op_builder(op)
        if builder is None or not builder.is_compatible(verbose=False):
            raise RuntimeError(f"DeepSpeed's {op} cannot be built here (no C++ compiler with OpenMP?)")
        builder.load(verbose=False)
        built.append(builder.NAME)
    return built


# --- DeepSpeed configuration ---------------------------------------------------------------------------------
# The official files (THUDM/GLM-4 `finetune/configs/ds_zero_2.json` and `ds_zero_3.json`; CogAgent's
# finetune/README refers to the same two files and its sft.yaml to `configs/ds_zero_3.json`), as data so
# that notebooks can generate and explain them and a test can check configs/*.json against them.
# "auto" values are filled in by transformers from training_args (HfTrainerDeepSpeedConfig).
OFFICIAL_DEEPSPEED_CONFIGS: dict[int, dict[str, Any]] = {
    2: {
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 2,
            "allgather_partitions": True,
            "allgather_bucket_size": 5e8,
            "overlap_comm": True,
            "reduce_scatter": True,
            "reduce_bucket_size": 5e8,
            "contiguous_gradients": True,
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 2000,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    },
    3: {
        "train_micro_batch_size_per_gpu": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": "auto"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
        "zero_optimization": {
            "stage": 3,
            "allgather_partitions": True,
            "allgather_bucket_size": 5e8,
            "reduce_scatter": True,
            "contiguous_gradients": True,
            "overlap_comm": True,
            "sub_group_size": 1e9,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    },
}

# What each field of the two files means (DeepSpeed "Configuration JSON" docs, deepspeed.ai/docs/config-json/,
# and the HF "DeepSpeed" guide for "auto"). docs/DISTRIBUTED.md shows this table; a test checks that every
# field of both files is explained.
DEEPSPEED_FIELDS: dict[str, str] = {
    "train_batch_size": "global batch = micro batch x accumulation x processes; auto: from training_args",
    "train_micro_batch_size_per_gpu": "samples per process per forward; auto: per_device_train_batch_size",
    "gradient_accumulation_steps": "micro-batches per optimizer step; auto: gradient_accumulation_steps",
    "gradient_clipping": "clip the global gradient norm to this; auto: max_grad_norm (0 = off)",
    "steps_per_print": "DeepSpeed prints its own progress every N steps (2000: practically never)",
    "wall_clock_breakdown": "time forward/backward/step separately and print it (off: it synchronises)",
    "zero_allow_untested_optimizer": "allow an optimizer DeepSpeed has not validated with ZeRO (the Trainer's)",
    "fp16.enabled": "fp16 mixed precision with loss scaling; auto: training_args.fp16",
    "fp16.loss_scale": "0 = dynamic loss scaling (find the largest scale that does not overflow)",
    "fp16.loss_scale_window": "steps without overflow before the dynamic scale is doubled",
    "fp16.initial_scale_power": "the first loss scale is 2**16",
    "fp16.hysteresis": "overflows tolerated before the scale is halved",
    "fp16.min_loss_scale": "the scale never goes below 1",
    "bf16.enabled": "bf16 mixed precision (no loss scaling needed); auto: training_args.bf16",
    "optimizer.type": "DeepSpeed builds the optimizer itself: AdamW (FusedAdam kernel on GPU, JIT-compiled)",
    "optimizer.params.lr": "auto: learning_rate",
    "optimizer.params.betas": "auto: [adam_beta1, adam_beta2]",
    "optimizer.params.eps": "auto: adam_epsilon",
    "optimizer.params.weight_decay": "auto: weight_decay",
    "zero_optimization.stage": "2: shard gradients + optimizer states; 3: also shard the weights",
    "zero_optimization.allgather_partitions": "gather updated parameters with all-gather (not broadcasts)",
    "zero_optimization.allgather_bucket_size": "elements per all-gather call (5e8: fewer, larger messages)",
    "zero_optimization.overlap_comm": "overlap gradient reduction with the backward pass (uses more memory)",
    "zero_optimization.reduce_scatter": "reduce gradients with reduce-scatter, each rank keeps its shard",
    "zero_optimization.reduce_bucket_size": "elements per reduction call; auto: hidden_size**2 (ZeRO-3)",
    "zero_optimization.contiguous_gradients": "copy gradients into one buffer as they are made (less fragmentation)",
    "zero_optimization.sub_group_size": "parameters per optimizer-step group (bounds the fp32 working set)",
    "zero_optimization.stage3_prefetch_bucket_size": "parameters fetched ahead of use; auto: 0.9 hidden_size**2",
    "zero_optimization.stage3_param_persistence_threshold": "parameters smaller than this stay whole on every "
    "rank; auto: 10 x hidden_size",
    "zero_optimization.stage3_max_live_parameters": "at most this many gathered parameters held at once",
    "zero_optimization.stage3_max_reuse_distance": "keep a gathered parameter if it is reused within this many",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": "save_model gathers the shards into one "
    "model.safetensors (otherwise only the ZeRO shards exist: consolidate_zero_checkpoint)",
}


def deepspeed_config(stage: int) -> dict[str, Any]:
    """A fresh copy of the official DeepSpeed config for ZeRO stage 2 or 3."""
    import copy

    if stage not in OFFICIAL_DEEPSPEED_CONFIGS:
        raise ValueError(f"official DeepSpeed configs exist for ZeRO stages 2 and 3, not {stage}")
    return copy.deepcopy(OFFICIAL_DEEPSPEED_CONFIGS[stage])


def write_deepspeed_config(path: str | os.PathLike, config: Mapping[str, Any] | int) -> Path:
    """Write a DeepSpeed config (a dict, or a stage number for the official one) as JSON; return the path."""
    config = deepspeed_config(config) if isinstance(config, int) else config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def config_fields(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config to dotted keys: {"zero_optimization.stage": 2, ...}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(config_fields(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def explain_deepspeed_config(config: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """(dotted key, value, meaning) for every field of a config; unknown fields say so."""
    return [
        (key, value, DEEPSPEED_FIELDS.get(key, "(not one of the official fields)"))
        for key, value in config_fields(config).items()
    ]


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config that cannot be used; the message names the file."""


def read_deepspeed_config(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config as a dict, from a JSON file or a dict; errors name the file and line."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise DeepSpeedConfigError(f"{path}: DeepSpeed config not found (training_args.deepspeed)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DeepSpeedConfigError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def zero_stage(config: Mapping[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when it has no zero_optimization block)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def accelerator_available() -> bool:
    """Whether torch sees a CUDA GPU or (after `enable_npu`) an Ascend NPU that DeepSpeed can use."""
    import torch

    if torch.cuda.is_available():
        return True
    npu = getattr(torch, "npu", None)
    try:
        return bool(npu is not None and npu.is_available())
    except RuntimeError:
        return False


def set_cuda_arch_list(
    env: MutableMapping[str, str] | None = None, capabilities: list[tuple[int, int]] | None = None
) -> str | None:
    """Set TORCH_CUDA_ARCH_LIST to the visible GPUs' plain compute capabilities unless the user chose one.

    DeepSpeed JIT-builds its CUDA ops (FusedAdam for the official ds_zero_3.json) for the architectures
    torch reports, and DeepSpeed 0.19 cannot parse the "9.0a" that torch 2.11 reports on Hopper
    (`ValueError: invalid literal for int() with base 10: '0a'`, seen on an H200). "9.0" builds the
    same kernels for the card at hand. Returns the value in use (None without CUDA).
    """
    import torch

    env = os.environ if env is None else env
    if "TORCH_CUDA_ARCH_LIST" in env:
        return env["TORCH_CUDA_ARCH_LIST"]
    if capabilities is None:
        if not torch.cuda.is_available():
            return None
        capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    env["TORCH_CUDA_ARCH_LIST"] = ";".join(sorted({f"{major}.{minor}" for major, minor in capabilities}))
    return env["TORCH_CUDA_ARCH_LIST"]


def prepare_distributed(training_args: Mapping[str, Any]) -> dict[str, Any]:
    """Prepare this process for the Trainer described by `training_args`; return the arguments to use.

    Call once per process, before `Seq2SeqTrainingArguments(**returned)`. See the module docstring for the
    three cases handled. First, an Ascend NPU is enabled when one is found or COGAGENT_NB_NPU=1 asks for
    it (train/devices.py). The input is not modified.
    """
    from cogagent_nb.train.devices import enable_npu, npu_request

    args = dict(training_args)
    enable_npu(npu_request())  # the official two torch_npu lines, when an NPU is asked for or found
    info = launch_info()
    has_accelerator = accelerator_available()
    on_cpu = not has_accelerator or bool(args.get("use_cpu"))
    if not has_accelerator:  # transformers imports DeepSpeed when it is installed, with or without a config
        use_cpu_accelerator()
    if args.get("deepspeed") and args.get("use_cpu") and has_accelerator:
        # DeepSpeed picks its accelerator by itself (CUDA whenever one is visible), so it cannot be kept on the CPU
        raise DeepSpeedConfigError(
            "training_args.use_cpu=true with DeepSpeed on a machine with a GPU/NPU: DeepSpeed would still use the "
            "accelerator. Set training_args.use_cpu=false (the tiny configs pin it to true: "
            "--set training_args.use_cpu=false), or hide the GPUs (CUDA_VISIBLE_DEVICES=)"
        )
    if args.get("deepspeed"):
        if not info.launched:
            single_process_env()
        use_jit_cache()
        if not on_cpu:
            set_cuda_arch_list()
        if on_cpu:
            use_cpu_accelerator()  # also with use_cpu on a machine that has a GPU
            args["accelerator_config"] = _with_configured_state(args.get("accelerator_config"))
            init_cpu_deepspeed_state()
            remove_shm_buffer_at_exit()
    elif on_cpu and info.distributed:
        args["use_cpu"] = True
        args.setdefault("ddp_backend", "gloo")
    return args


def _with_configured_state(accelerator_config: Any) -> dict[str, Any]:
    if accelerator_config is None:
        return {"use_configured_state": True}
    if isinstance(accelerator_config, Mapping):
        return {**accelerator_config, "use_configured_state": True}
    raise DeepSpeedConfigError(
        "training_args.accelerator_config must be a mapping when DeepSpeed runs on CPU "
        f"(got {type(accelerator_config).__name__})"
    )


def deepspeed_shm_buffer(env: Mapping[str, str] | None = None, shm_dir: Path = Path("/dev/shm")) -> Path | None:
    """This rank's shared-memory all-reduce buffer that DeepSpeed makes on a CPU, or None when it makes none.

    DeepSpeed's CPU backend creates one ~66 MB segment per rank, named after the user id, MASTER_ADDR,
    MASTER_PORT and the rank, whenever all ranks are on one machine (its own launcher sets LOCAL_SIZE to
    the world size). DeepSpeed 0.19 never removes it, so every run of the `deepspeed` launcher on a CPU
    would leave 2 x 66 MB of RAM-backed files in /dev/shm until the machine restarts.
    """
    env = os.environ if env is None else env
    local_size, world_size = env.get("LOCAL_SIZE", ""), env.get("WORLD_SIZE", "1")
    if not local_size or local_size != world_size:
        return None
    name = f"{_shm_buffer_prefix()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}"
    return shm_dir / f"{name}_{env.get('RANK', '0')}"


def _shm_buffer_prefix() -> str:
    """How DeepSpeed's CPU backend starts the name of every buffer this user's ranks make."""
    return f"deepspeed_allreduce_buffer_{os.getuid()}"


def remove_shm_buffer_at_exit() -> Path | None:
    """Remove this rank's DeepSpeed shared-memory buffer when the process ends (see `deepspeed_shm_buffer`).

    The other ranks may still have it mapped; removing the name only frees the memory once they are done.
    """
    import atexit

    buffer = deepspeed_shm_buffer()
    if buffer is not None:
        atexit.register(buffer.unlink, missing_ok=True)
    return buffer


def _paths_in_use(proc: Path) -> set[str]:
    """Every file that a live process we may inspect has mapped or open (its /proc maps and fds)."""
    used: set[str] = set()
    for pid in proc.glob("[0-9]*"):
        try:
            fields = (line.split(maxsplit=5) for line in (pid / "maps").open())
            used.update(f[5].strip() for f in fields if len(f) == 6)  # address perms offset dev inode path
            used.update(os.readlink(fd) for fd in (pid / "fd").iterdir())
        except OSError:  # the process ended, or is another user's
            continue
    return used


def remove_stale_shm_buffers(shm_dir: Path = Path("/dev/shm"), proc: Path = Path("/proc")) -> list[Path]:
    """Remove this user's DeepSpeed shared-memory buffers that no live process uses; return them.

    A rank that crashes (SIGABRT, SIGKILL) runs no exit handler, so `remove_shm_buffer_at_exit` cannot
    free its 66 MB; `launch` calls this after a failed launch. A buffer still mapped or open by any
    process (another DeepSpeed run of this user) is left alone.
    """
    buffers = sorted(shm_dir.glob(f"{_shm_buffer_prefix()}_*"))
    if not buffers:
        return []
    used = _paths_in_use(proc)
    stale = [buffer for buffer in buffers if str(buffer) not in used]
    for buffer in stale:
        buffer.unlink(missing_ok=True)
    return stale


def use_cpu_accelerator(env: MutableMapping[str, str] | None = None) -> str:
    """Tell DeepSpeed to use its CPU accelerator (DS_ACCELERATOR=cpu) unless the user chose one.

    Why: DeepSpeed finds the CPU by failing to find a GPU, and then warns once per process "Setting
    accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it." On a
    machine without an accelerator that is the intended choice, not a failure, and the warning
    fills a launched run's log. Set before DeepSpeed first asks (it caches the answer). Returns the value.
    """
    env = os.environ if env is None else env
    return env.setdefault("DS_ACCELERATOR", "cpu")


def init_cpu_deepspeed_state():
    """Create accelerate's process state for DeepSpeed over gloo (case 2 of the module docstring).

    Idempotent: a second call returns the existing state. Returns the `PartialState`.
    """
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState

    state = PartialState(backend="gloo")
    if state.distributed_type.value != "DEEPSPEED":
        raise RuntimeError(
            f"accelerate's state was already created for {state.distributed_type.value}, not DeepSpeed; "
            "create nothing with accelerate before prepare_distributed()"
        )
    return state


def finish_distributed() -> bool:
    """End a finished multi-process run cleanly: wait for every rank, then close the process group.

    Without it a rank can exit while a peer's gloo thread still talks to it; gloo then throws in that
    thread and the peer dies by SIGABRT although training succeeded. PyTorch's docs ask for
    `destroy_process_group()` before a process exits.
    Call only after success: after a failure the barrier would wait for ranks that are gone. Returns
    whether there was a process group to close.
    """
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return False
    torch_dist.barrier()
    torch_dist.destroy_process_group()
    return True


def deepspeed_available() -> bool:
    """Whether `import deepspeed` can work (the package is installed)."""
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


# --- launching from Python (notebooks, tests) ------------------------------------------------------------------
def torchrun_command(
    script_args: Sequence[str],
    *,
    nproc_per_node: int = 2,
    nnodes: int = 1,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    script: str | os.PathLike = "finetune.py",
) -> list[str]:
    """The torchrun command line for `script script_args...`, as a list (what a shell would run).

    Without `rdzv_endpoint`: `--standalone` (one machine, torchrun picks a free port), as in the official
    README. With it: the multi-node form `--rdzv_backend=c10d --rdzv_endpoint=HOST:PORT`, the same on every
    node except `--node_rank` (docs/DISTRIBUTED.md).
    """
    command = [sys.executable, "-m", "torch.distributed.run"]
    if rdzv_endpoint is None:
        command += ["--standalone", f"--nnodes={nnodes}"]
    else:
        command += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
        if node_rank is not None:
            command.append(f"--node_rank={node_rank}")
    command.append(f"--nproc_per_node={nproc_per_node}")
    return command + [str(script), *map(str, script_args)]


def shell_form(command: Sequence[str]) -> str:
    """The command as a person types it: `torchrun ...` / `deepspeed ...` instead of the interpreter paths."""
    import shlex

    parts = list(command)
    if parts[:3] == [sys.executable, "-m", "torch.distributed.run"]:
        parts = ["torchrun", *parts[3:]]
    elif parts and Path(parts[0]).name == "deepspeed":
        parts[0] = "deepspeed"
    return shlex.join(parts)


def deepspeed_command(
    script_args: Sequence[str],
    *,
    num_gpus: int = 2,
    script: str | os.PathLike = "finetune.py",
    master_port: int | None = None,
) -> list[str]:
    """The `deepspeed` launcher command line (`deepspeed --num_gpus N finetune.py ...`) as a list.

    On a CPU the launcher starts one process per `--num_gpus` as well (its "localhost" resource is the CPU).
    """
    launcher = Path(sys.executable).with_name("deepspeed")
    command = [str(launcher) if launcher.exists() else "deepspeed", f"--num_gpus={num_gpus}"]
    if master_port is not None:
        command.append(f"--master_port={master_port}")
    return command + [str(script), *map(str, script_args)]


@dataclass
class LaunchResult:
    """A finished launch: the command, its exit status, the seconds it took and every output line."""

    command: list[str]
    returncode: int
    seconds: float
    lines: list[str]

    def check(self) -> LaunchResult:
        """Raise when the run failed, with the first error any worker printed and the last lines; else self.

        A launcher's last lines are its own summary ("exitcode -6, SIGABRT"); the worker's message that says
        why is often far above it, so it is shown first.
        """
        if self.returncode != 0:
            cause, tail = self.first_error(), "\n".join(self.lines[-40:])
            shown = f"first error:\n{cause}\n...\nlast lines:\n{tail}" if cause else f"last lines:\n{tail}"
            killed = f" (a worker was killed by {signal})" if (signal := self.worker_signal()) else ""
            raise RuntimeError(f"{' '.join(self.command)} exited with {self.returncode}{killed}; {shown}")
        return self

    def worker_signal(self) -> str | None:
        """The signal that killed the first failed worker ("SIGABRT"), as the launcher reports it; else None.

        torchrun's summary lists every worker it ended (SIGTERM, once one had failed) and then, under
        "Root Cause", the one that failed first: only that one counts. The deepspeed launcher logs the
        first failed worker's return code alone.
        """
        import signal

        root = next((i for i, line in enumerate(self.lines) if line.startswith("Root Cause")), None)
        for line in self.lines if root is None else self.lines[root:]:
            if named := _TORCHRUN_SIGNAL.search(line):
                return named.group(1)
            if number := _DEEPSPEED_SIGNAL.search(line):
                code = int(number.group(1))
                return signal.Signals(code).name if code in signal.valid_signals() else f"signal {code}"
        return None

    def first_error(self, context: int = 30) -> str:
        """The lines from the first worker error (a traceback, a C++ abort) on, or "" when none is found."""
        for index, line in enumerate(self.lines):
            if not _WORKER_ERROR.search(line):
                continue
            if "Traceback" in line and any(map(_LAUNCHER_LINE.search, self.lines[index : index + 4])):
                continue  # the launcher's own traceback, which only reports that a worker failed
            return "\n".join(self.lines[max(0, index - 3) : index + context])
        return ""


# A worker's own failure: a Python traceback, a C++ exception or assertion, a glibc abort, a crash signal,
# finetune.py's refusals of a config, data or resume mistake (`error: ...`, run_from_args), a missing script.
_WORKER_ERROR = re.compile(
    r"Traceback \(most recent call last\)|terminate called|what\(\):|Assertion .* failed|"
    r"double free|corrupted|Segmentation fault|Fatal Python error|\[rank\d+\]:.*Error|"
    r"^(\[rank\d+\]: )?error: |can't open file"
)
# How each launcher reports a worker killed by a signal: torchrun's summary and the deepspeed launcher's log.
_TORCHRUN_SIGNAL = re.compile(r"Signal \d+ \((SIG[A-Z]+)\) received by PID")
_DEEPSPEED_SIGNAL = re.compile(r"exits with return code = -(\d+)")
# The launcher's own report of the failure, which comes after the worker's and says only which signal.
_LAUNCHER_LINE = re.compile(r"torch/distributed/(run|elastic)|ChildFailedError|launcher/(launch|runner)\.py")


def launch(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    echo: bool = True,
    timeout: float | None = None,
) -> LaunchResult:
    """Run a launcher command, streaming its output line by line as it comes, and collect it.

    `env` entries are added to this process's environment (OMP_NUM_THREADS=1 is the default, as in the
    official README: each process would otherwise start one thread per core and they would fight).
    `echo=False` keeps the lines silent (tests); a notebook sees them live. After `timeout` seconds, or on
    an interrupt, the launcher and its workers (one process group) are killed and the error is raised.
    A progress bar redraws itself in place ("\\r"), as it would in a terminal: it is echoed that way and
    only its last state before the next line is kept, instead of one line per redraw (two per step).
    """
    import io
    import signal
    import subprocess
    import threading
    import time

    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    use_jit_cache(run_env)
    started = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen(
        list(command),
        cwd=cwd,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    ) as process:
        assert process.stdout is not None
        # newline="": a lone "\r" (a bar's redraw) ends a piece but is not turned into "\n"
        pieces = io.TextIOWrapper(process.stdout, encoding="utf-8", errors="replace", newline="")

        def stop() -> None:  # the launcher and every worker it started share its process group
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, stop) if timeout is not None else None
        if timer is not None:
            timer.start()
        try:
            redrawn = False  # the last kept line is a bar state that the next piece overwrites
            for piece in pieces:  # ends when every process holding the pipe has exited or was killed
                text, is_redraw = piece.rstrip("\r\n"), piece.endswith("\r")
                if is_redraw and not text:  # tqdm's "\r" before its first state
                    continue
                if echo:
                    print(text, end="\r" if is_redraw else "\n", flush=True)
                if redrawn:
                    lines[-1] = text
                else:
                    lines.append(text)
                redrawn = is_redraw
        except BaseException:  # a notebook interrupt: do not leave workers behind
            stop()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        returncode = process.wait()
    seconds = time.perf_counter() - started
    if returncode != 0 and (freed := remove_stale_shm_buffers()) and echo:
        print(f"removed {len(freed)} shared-memory buffer(s) that the failed run's DeepSpeed left in /dev/shm")
    if timeout is not None and seconds >= timeout and returncode < 0:
        tail = "\n".join(lines[-20:])
        raise TimeoutError(f"{shell_form(command)} ran longer than {timeout} s and was stopped; last lines:\n{tail}")
    return LaunchResult(list(command), returncode, seconds, lines)


# --- ZeRO checkpoints -> official-format model folder ---------------------------------------------------------
def consolidate_zero_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Turn a DeepSpeed checkpoint of a full fine-tuning run into an official-format folder `cnb.load` reads.

    ZeRO keeps each rank's shard of the fp32 master weights in `global_stepN/`; DeepSpeed's own
    `zero_to_fp32` (also copied into every checkpoint as `zero_to_fp32.py`) gathers them into one state dict.
    That dict is written as model.safetensors with the official key names, beside the checkpoint's
    config.json, generation_config.json and tokenizer files. Works with any number of ranks and without
    `stage3_gather_16bit_weights_on_model_save`; needs no GPU. LoRA checkpoints already hold the adapter
    (`adapter_model.safetensors`): merge those with `cogagent-nb merge` instead.
    """
    import shutil

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cogagent_nb.model.configuration import CogAgentConfig
    from cogagent_nb.model.loading import save_official_weights
    from cogagent_nb.train.export import refuse_used_folder, staged_folder

    checkpoint, out = Path(checkpoint_dir), Path(out_dir)
    if not (checkpoint / "latest").is_file():
        raise FileNotFoundError(f"{checkpoint}: no DeepSpeed checkpoint here (no 'latest' file naming global_stepN)")
    if (checkpoint / "adapter_config.json").is_file():
        raise ValueError(
            f"{checkpoint} is a LoRA/PEFT checkpoint: its adapter is adapter_model.safetensors; "
            "merge it into the base model with `cogagent-nb merge` instead"
        )
    refuse_used_folder(out)  # before gathering the shards, which takes minutes on the 9B
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    config = CogAgentConfig.from_pretrained(checkpoint)
    with staged_folder(out) as staging:  # whole or absent, as merge writes its model
        staging.mkdir()
        for name in (
            "config.json",
            "generation_config.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "added_tokens.json",
            "special_tokens_map.json",
        ):
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, staging / name)
        save_official_weights(state_dict, staging, inv_freq=config.rotary_inv_freq())
    return out
