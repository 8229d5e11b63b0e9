"""Which accelerator this process trains on: CUDA, Ascend NPU, Apple MPS or the CPU, and why.

The official fine-tuning script supports Huawei Ascend NPUs through two commented-out lines at the top
of `finetune/finetune.py` (THUDM/CogAgent; its README, section "Fine-Tuning with Huawei Ascend Computing
Devices"):

    import torch_npu
    from torch_npu.contrib import transfer_to_npu

The first registers the `npu` device with torch; the second patches `torch.cuda.*` calls and
`device="cuda"` arguments so that CUDA code (transformers, accelerate, DeepSpeed) runs on the NPU.
`enable_npu()` applies exactly these two lines, when the user asks (`--device npu`, `use_npu=True`)
or when an NPU is found, and otherwise says precisely what is missing.

Importing `torch_npu` on a machine without a working CANN toolkit fails in three ways, all caught
here: `ImportError` (the package or one of its shared libraries is absent), `OSError` (a `.so` of
CANN cannot be loaded) and `RuntimeError` (the driver or `npu-smi` reports no device). Since torch 2.5,
`import torch` itself loads installed device plug-ins ("device backend autoload", pytorch RFC #122468),
so a broken `torch_npu` would break every `import torch`. `cogagent_nb/__init__.py` therefore sets
`TORCH_DEVICE_BACKEND_AUTOLOAD=0` unless the user chose a value; `enable_npu()` imports the plug-in
explicitly, where its failure can be reported instead of crashing.

Nothing here has run on Ascend hardware (none is available to this project): docs/NPU.md lists what
differs there (HCCL instead of NCCL, bf16 support per chip, no flash attention) and what was tested.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

DeviceKind = Literal["cuda", "npu", "mps", "cpu"]

# The errors a broken torch_npu / CANN install raises on import (see the module docstring).
NPU_IMPORT_ERRORS: tuple[type[BaseException], ...] = (ImportError, OSError, RuntimeError)

AUTOLOAD_ENV = "TORCH_DEVICE_BACKEND_AUTOLOAD"

NPU_HELP = "docs/NPU.md"

Importer = Callable[[str], ModuleType]


@dataclass(frozen=True)
class NpuStatus:
    """The outcome of looking for an Ascend NPU: usable or not, and the reason in one sentence."""

    available: bool
    reason: str
    device_count: int = 0
    transfer_to_npu: bool = False  # whether `from torch_npu.contrib import transfer_to_npu` ran


@dataclass(frozen=True)
class DeviceReport:
    """What this process will train on. `str(report)` is the one-line report the notebooks print."""

    kind: DeviceKind
    count: int
    name: str
    bf16: bool
    torch_version: str
    notes: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        plural = "s" if self.count != 1 else ""
        line = f"device: {self.kind} x{self.count} ({self.name}{plural}), bf16 {'yes' if self.bf16 else 'no'}"
        line += f", torch {self.torch_version}"
        return line + "".join(f"; {note}" for note in self.notes)


def protect_torch_import() -> None:
    """Stop `import torch` from auto-loading device plug-ins such as torch_npu, unless the user set it.

    Must run before the first `import torch` of the process to have any effect; `import cogagent_nb`
    calls it. Plug-ins the course needs are imported explicitly (`enable_npu`).
    """
    os.environ.setdefault(AUTOLOAD_ENV, "0")


def npu_installed() -> bool:
    """Whether a `torch_npu` package is on the path (importing it may still fail)."""
    return importlib.util.find_spec("torch_npu") is not None


def npu_status(*, importer: Importer | None = None, apply_transfer: bool = False) -> NpuStatus:
    """Import torch_npu (and optionally `transfer_to_npu`) and say whether an NPU can be used.

    `importer` defaults to `importlib.import_module`; tests pass a fake to exercise each failure without CANN.
    Never raises for a missing or broken install: the reason names what is missing.
    """
    importer = importer or importlib.import_module
    try:
        torch_npu = importer("torch_npu")
    except ModuleNotFoundError as error:
        if error.name not in (None, "torch_npu"):
            return NpuStatus(False, f"torch_npu is installed but needs module {error.name!r}: {error}")
        return NpuStatus(
            False,
            "torch_npu is not installed (pip install torch-npu==<your torch version>, "
            f"with the Ascend CANN toolkit; see {NPU_HELP})",
        )
    except NPU_IMPORT_ERRORS as error:
        return NpuStatus(
            False,
            f"torch_npu is installed but failed to import ({type(error).__name__}: {error}); "
            "usually the CANN toolkit is missing or its environment is not loaded: "
            "source /usr/local/Ascend/ascend-toolkit/set_env.sh",
        )
    npu = getattr(torch_npu, "npu", None)
    try:
        count = int(npu.device_count()) if npu is not None and npu.is_available() else 0
    except NPU_IMPORT_ERRORS as error:
        return NpuStatus(
            False,
            f"torch_npu imported but querying the NPU failed ({type(error).__name__}: {error}); "
            "check the driver with `npu-smi info`",
        )
    if count == 0:
        return NpuStatus(
            False,
            "torch_npu imported but sees no NPU (check the driver with `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES)",
        )
    transfer = False
    if apply_transfer:
        try:
            importer("torch_npu.contrib.transfer_to_npu")
            transfer = True
        except NPU_IMPORT_ERRORS as error:
            return NpuStatus(
                False,
                f"`from torch_npu.contrib import transfer_to_npu` failed ({type(error).__name__}: {error})",
                count,
            )
    return NpuStatus(True, f"{count} Ascend NPU{'s' if count != 1 else ''} found", count, transfer)


NPU_REQUEST_ENV = "COGAGENT_NB_NPU"


def npu_request(env: Mapping[str, str] | None = None) -> bool | None:
    """What the user asked for in COGAGENT_NB_NPU: "1"/"yes" require an NPU, "0"/"no" never use one, unset = auto.

    `finetune.py` has no flag of its own for this (its command line is the official one), so the choice is an
    environment variable: `COGAGENT_NB_NPU=1 torchrun ... finetune.py ...`.
    """
    value = (os.environ if env is None else env).get(NPU_REQUEST_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{NPU_REQUEST_ENV}={value!r}: use 1 (require an NPU), 0 (never) or leave it unset (auto)")


def enable_npu(use_npu: bool | None = None, *, importer: Importer | None = None) -> NpuStatus:
    """Apply the official two lines (`import torch_npu`; `from torch_npu.contrib import transfer_to_npu`).

    use_npu: True = the user asks for the NPU, so its absence is an error that says what is missing;
      None = use it when one is found (the default of `finetune.py`); False = never touch torch_npu.
    Returns the status; with use_npu None and no NPU, the status says why and nothing changes.
    """
    if use_npu is False:
        return NpuStatus(False, "NPU not requested")
    if use_npu is None and importer is None and not npu_installed():
        return NpuStatus(False, "torch_npu is not installed")  # the common case: do not even try
    status = npu_status(importer=importer, apply_transfer=True)
    if use_npu and not status.available:
        raise RuntimeError(f"an Ascend NPU was requested but cannot be used: {status.reason}")
    return status


def detect_device(use_npu: bool | None = None, *, importer: Importer | None = None) -> DeviceReport:
    """Decide the training device in the order NPU (if asked or found), CUDA, MPS, CPU.

    The NPU comes first because `transfer_to_npu` makes `torch.cuda` answer for the NPU; checking CUDA
    first would report the NPU as a GPU (accelerate does the same, huggingface/accelerate#3020).
    """
    import torch

    notes: list[str] = []
    npu = enable_npu(use_npu, importer=importer)
    if npu.available:
        name = _npu_name(importer)
        return DeviceReport(
            "npu", npu.device_count, name, _npu_bf16(importer), torch.__version__, ("transfer_to_npu applied",)
        )
    if use_npu is None and npu_installed():
        notes.append(f"NPU not used: {npu.reason}")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return DeviceReport(
            "cuda",
            count,
            torch.cuda.get_device_name(0),
            torch.cuda.is_bf16_supported(),
            torch.__version__,
            tuple(notes),
        )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return DeviceReport("mps", 1, "Apple GPU", True, torch.__version__, tuple(notes))
    threads = torch.get_num_threads()
    return DeviceReport(
        "cpu", 1, f"CPU, {threads} thread{'s' if threads != 1 else ''}", True, torch.__version__, tuple(notes)
    )


def device_report(use_npu: bool | None = None) -> str:
    """The one line the notebooks print in their setup cell, e.g. `device: cpu x1 (CPU, 2 threads), ...`."""
    return str(detect_device(use_npu))


def _npu_name(importer: Importer | None) -> str:
    try:
        return str((importer or importlib.import_module)("torch_npu").npu.get_device_name(0))
    except (AttributeError, *NPU_IMPORT_ERRORS):
        return "Ascend NPU"


def _npu_bf16(importer: Importer | None) -> bool:
    """bf16 is supported on Ascend 910B and later, not on 910A / 310 (docs/NPU.md)."""
    try:
        return bool((importer or importlib.import_module)("torch_npu").npu.is_bf16_supported())
    except (AttributeError, *NPU_IMPORT_ERRORS):
        return False
