"""`make wheelhouse` (docs/WORKSHOP.md): the CUDA-build check on the torch wheel, and the build requirements the
offline `pip install -e .` needs, kept equal to pyproject.toml's."""

from __future__ import annotations

import runpy
import shlex
import zipfile
from pathlib import Path

import pytest


def _wheel(folder: Path, name: str, requires: list[str]) -> Path:
    path = folder / name
    metadata = "Metadata-Version: 2.1\nName: torch\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("torch-2.13.0.dist-info/METADATA", metadata)
    return path


@pytest.fixture
def check(repo_root: Path):
    return runpy.run_path(str(repo_root / "scripts" / "wheelhouse_torch.py"))["main"]


def test_a_cpu_torch_wheel_passes_and_is_printed(tmp_path: Path, check, capsys) -> None:
    wheel = _wheel(tmp_path, "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", ["filelock", "sympy>=1.13"])
    assert check(str(tmp_path)) == 0
    assert capsys.readouterr().out.strip() == str(wheel)


def test_a_cuda_torch_wheel_stops_the_wheelhouse(tmp_path: Path, check, capsys) -> None:
    _wheel(tmp_path, "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl", ["filelock", "nvidia-cublas==13.1.1.3"])
    assert check(str(tmp_path)) == 1
    assert "CUDA build" in capsys.readouterr().err


def test_no_torch_wheel_or_two_are_errors(tmp_path: Path, check) -> None:
    assert check(str(tmp_path)) == 1
    _wheel(tmp_path, "torch-2.12.0+cpu-a.whl", [])
    _wheel(tmp_path, "torch-2.13.0+cpu-b.whl", [])
    assert check(str(tmp_path)) == 1


def test_wheelhouse_carries_the_build_requirements_of_pyproject(repo_root: Path) -> None:
    line = next(x for x in (repo_root / "Makefile").read_text().splitlines() if x.startswith("BUILD_REQUIRES"))
    in_makefile = shlex.split(line.split(":=", 1)[1])
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(repo_root / "pyproject.toml", "rb") as f:
        assert in_makefile == tomllib.load(f)["build-system"]["requires"]
