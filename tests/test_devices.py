"""Device detection and the Ascend NPU decision logic, with fake torch_npu modules (no CANN, no NPU here).

Each way a torch_npu install can fail is simulated by an importer that raises what the real one raises:
ImportError (package or a shared library absent), OSError (a CANN .so that cannot be loaded), RuntimeError
(driver trouble). A real subprocess test checks that a broken device plug-in cannot break `import torch`
once `cogagent_nb` is imported (torch's backend autoload, TORCH_DEVICE_BACKEND_AUTOLOAD).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from cogagent_nb.train import devices


@pytest.fixture(autouse=True)
def restore_environ():
    """prepare_distributed writes os.environ (RANK, MASTER_PORT, TORCH_EXTENSIONS_DIR ...) on purpose; put it back,
    or later tests in this session would believe they run inside a launcher (and use a stale port)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


class FakeNpu:
    """torch_npu.npu of a machine with `count` NPUs."""

    def __init__(self, count: int, bf16: bool = True, error: BaseException | None = None):
        self.count, self.bf16, self.error = count, bf16, error

    def is_available(self) -> bool:
        if self.error is not None:
            raise self.error
        return self.count > 0

    def device_count(self) -> int:
        return self.count

    def get_device_name(self, index: int) -> str:
        return "Ascend910B3"

    def is_bf16_supported(self) -> bool:
        return self.bf16


def importer_for(
    npu: FakeNpu | None = None, *, fail: BaseException | None = None, transfer_fails: BaseException | None = None
):
    """An importer that knows torch_npu (as `npu` describes it) and records which modules were imported."""
    imported: list[str] = []

    def importer(name: str) -> types.ModuleType:
        if name == "torch_npu":
            if fail is not None:
                raise fail
            imported.append(name)
            module = types.ModuleType("torch_npu")
            module.npu = npu
            return module
        if name == "torch_npu.contrib.transfer_to_npu":
            if transfer_fails is not None:
                raise transfer_fails
            imported.append(name)
            return types.ModuleType(name)
        raise AssertionError(f"unexpected import {name}")

    importer.imported = imported
    return importer


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ModuleNotFoundError("No module named 'torch_npu'", name="torch_npu"), "not installed"),
        (ImportError("libhccl.so: cannot open shared object file"), "source /usr/local/Ascend"),
        (OSError("libascendcl.so: cannot open shared object file"), "OSError: libascendcl.so"),
        (RuntimeError("drvGetDevNum failed"), "RuntimeError: drvGetDevNum"),
    ],
)
def test_each_import_failure_is_caught_and_named(error, expected):
    status = devices.npu_status(importer=importer_for(fail=error))
    assert not status.available
    assert expected in status.reason


def test_missing_dependency_of_torch_npu_is_named():
    error = ModuleNotFoundError("No module named 'decorator'", name="decorator")
    status = devices.npu_status(importer=importer_for(fail=error))
    assert "needs module 'decorator'" in status.reason


def test_no_device_and_driver_errors():
    assert "sees no NPU" in devices.npu_status(importer=importer_for(FakeNpu(0))).reason
    broken = FakeNpu(1, error=RuntimeError("npu-smi: driver not loaded"))
    assert "querying the NPU failed" in devices.npu_status(importer=importer_for(broken)).reason


def test_enable_npu_applies_the_two_official_lines_when_an_npu_is_found():
    importer = importer_for(FakeNpu(8))
    status = devices.enable_npu(None, importer=importer)
    assert status.available and status.device_count == 8 and status.transfer_to_npu
    assert importer.imported == ["torch_npu", "torch_npu.contrib.transfer_to_npu"]


def test_enable_npu_requested_but_missing_says_what_is_missing():
    importer = importer_for(fail=OSError("libascend_hal.so: cannot open shared object file"))
    with pytest.raises(RuntimeError, match="requested but cannot be used.*libascend_hal.so"):
        devices.enable_npu(True, importer=importer)


def test_enable_npu_not_requested_never_imports():
    importer = importer_for(FakeNpu(8))
    assert not devices.enable_npu(False, importer=importer).available
    assert importer.imported == []


def test_transfer_to_npu_failure_is_reported():
    importer = importer_for(FakeNpu(1), transfer_fails=ImportError("cannot import name 'transfer_to_npu'"))
    status = devices.npu_status(importer=importer, apply_transfer=True)
    assert not status.available and "transfer_to_npu" in status.reason


def test_detect_device_prefers_a_found_npu_and_reports_it():
    report = devices.detect_device(None, importer=importer_for(FakeNpu(2, bf16=False)))
    assert (report.kind, report.count, report.bf16) == ("npu", 2, False)
    assert str(report).startswith("device: npu x2 (Ascend910B3s), bf16 no")


def test_detect_device_without_npu_on_this_machine():
    import torch

    report = devices.detect_device(None, importer=importer_for(fail=ImportError("no torch_npu")))
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert report.kind == expected
    line = devices.device_report()
    assert line.startswith(f"device: {expected} x") and "torch " in line


def test_cogagent_nb_sets_autoload_off_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != devices.AUTOLOAD_ENV}
    code = "import os, cogagent_nb; print(os.environ['TORCH_DEVICE_BACKEND_AUTOLOAD'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
    env[devices.AUTOLOAD_ENV] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


@pytest.mark.slow
def test_broken_device_plugin_cannot_break_import_torch(tmp_path: Path, repo_root: Path):
    """A fake installed plug-in in the `torch.backends` entry-point group whose import raises OSError, as
    torch_npu does without CANN: plain `import torch` fails, `import cogagent_nb; import torch` works."""
    (tmp_path / "fake_npu_plugin.py").write_text(
        textwrap.dedent("""
            raise OSError("libascendcl.so: cannot open shared object file: No such file or directory")
            def autoload():
                pass
        """)
    )
    info = tmp_path / "fake_npu_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-npu-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[torch.backends]\nfake_npu = fake_npu_plugin:autoload\n")
    env = {k: v for k, v in os.environ.items() if k != devices.AUTOLOAD_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(repo_root)])
    plain = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert plain.returncode != 0 and "fake_npu" in plain.stderr, "the fake plug-in must break a plain import"
    guarded = subprocess.run(
        [sys.executable, "-c", "import cogagent_nb; import torch; print(torch.ones(1).sum())"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert guarded.returncode == 0, guarded.stderr[-2000:]


def test_npu_request_from_the_environment():
    assert devices.npu_request({}) is None
    assert devices.npu_request({"COGAGENT_NB_NPU": "1"}) is True
    assert devices.npu_request({"COGAGENT_NB_NPU": "no"}) is False
    with pytest.raises(ValueError, match="COGAGENT_NB_NPU='maybe'"):
        devices.npu_request({"COGAGENT_NB_NPU": "maybe"})


def test_prepare_distributed_enables_a_requested_npu_and_fails_loudly_without_one(monkeypatch):
    from cogagent_nb.train import distributed

    monkeypatch.setenv("COGAGENT_NB_NPU", "1")
    monkeypatch.setattr(devices, "npu_installed", lambda: False)
    monkeypatch.setattr(devices.importlib, "import_module", importer_for(fail=OSError("libascendcl.so missing")))
    with pytest.raises(RuntimeError, match="NPU was requested.*libascendcl.so"):
        distributed.prepare_distributed({"output_dir": "out"})
