"""Print pip constraints that pin every dependency in pyproject.toml to its stated floor.

`pyproject.toml` is the one place the floors are written; this script turns each `name>=X` of
`[project] dependencies` into `name==X`, so that the floor job (`make test-floor`) installs exactly
the oldest versions the package claims to support. Names given with `--keep` are left out (their
version comes from elsewhere, e.g. torch from TORCH_SPEC).

    python .ci/floor_constraints.py --keep torch > floor.txt
    pip install -c floor.txt -e ".[test]"
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(?:[^>]*,)?\s*>=\s*([^,;\s]+)")


def floors(pyproject: Path) -> dict[str, str]:
    """Each dependency's name and the version after its `>=`; a dependency with no floor is an error."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    result = {}
    for spec in dependencies:
        match = FLOOR.match(spec)
        if match is None:
            raise SystemExit(f"{pyproject}: dependency {spec!r} states no floor (write it as 'name>=X')")
        result[match.group(1).lower()] = match.group(2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    parser.add_argument("--keep", action="append", default=[], help="a dependency to leave unpinned")
    args = parser.parse_args(argv)
    keep = {name.lower() for name in args.keep}
    for name, version in floors(args.pyproject).items():
        if name not in keep:
            print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
