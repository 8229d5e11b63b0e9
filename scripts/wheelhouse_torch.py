"""Print the one torch wheel of a wheelhouse; exit with a message if it is a CUDA build.

`make wheelhouse` fetches torch alone first, then runs this: the wheelhouse is for laptops without GPUs,
and on Linux PyPI's torch wheel is the CUDA build, which brings ~3 GB of nvidia-* wheels (and triton)
with it. A CUDA build declares them in its METADATA (`Requires-Dist: nvidia-...`); the CPU build
(`torch-X+cpu-...whl` from the PyTorch CPU index, or any macOS/Windows wheel) does not.

    python scripts/wheelhouse_torch.py wheelhouse      # -> wheelhouse/torch-2.13.0+cpu-cp311-...whl
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

GPU_REQUIREMENTS = ("nvidia-", "triton", "cuda-")


def cuda_requirements(wheel: Path) -> list[str]:
    """The `Requires-Dist` lines of a wheel's METADATA that name CUDA packages (empty for a CPU build)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode("utf-8", "replace")
    requirements = [
        line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]
    return [r for r in requirements if r.lower().startswith(GPU_REQUIREMENTS)]


def main(folder: str) -> int:
    wheels = sorted(Path(folder).glob("torch-*.whl"))
    if len(wheels) != 1:
        print(f"{folder}: expected one torch wheel, found {[w.name for w in wheels]}", file=sys.stderr)
        return 1
    gpu = cuda_requirements(wheels[0])
    if gpu:
        print(
            f"{wheels[0].name} is a CUDA build (it requires {', '.join(gpu[:3])}, ...: about 3 GB more).\n"
            "The wheelhouse is for laptops without GPUs: let pip reach the PyTorch CPU index "
            "(TORCH_CPU_INDEX, https://download.pytorch.org/whl/cpu), or set TORCH_SPEC to a CPU wheel file.",
            file=sys.stderr,
        )
        return 1
    print(wheels[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "wheelhouse"))
