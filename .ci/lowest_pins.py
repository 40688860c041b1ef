"""Print the lowest version of every dependency that pyproject.toml allows, as pip pins.

Example:
    python .ci/lowest_pins.py > lowest.txt && pip install -r lowest.txt && pip install --no-deps -e .

Every runtime and `dev` dependency must name a lower bound (`>=`): without one the lowest
allowed version is not a version anybody tested. `.ci/lowest` installs these pins and runs the
test suite with them, so that the bounds stay true.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.-]+(?:\[[A-Za-z0-9_,.-]+\])?)\s*(.*)$")


def requirements(pyproject: Path) -> list[str]:
    """The runtime dependencies and the `dev` extra of a pyproject.toml."""
    if tomllib is None:
        raise RuntimeError("reading pyproject.toml needs Python 3.11 or later (tomllib)")
    project = tomllib.loads(pyproject.read_text())["project"]
    return list(project["dependencies"]) + list(project.get("optional-dependencies", {}).get("dev", []))


def lowest_pin(requirement: str) -> str:
    """'torch>=2.6,<3' -> 'torch==2.6'; a requirement without a lower bound is an error."""
    match = REQUIREMENT.match(requirement)
    if match is None or ";" in requirement:
        raise ValueError(f"cannot read the requirement {requirement!r}: write it as name>=X[,<Y]")
    name, spec = match.groups()
    lows = [part.strip()[2:].strip() for part in spec.split(",") if part.strip().startswith(">=")]
    if len(lows) != 1:
        raise ValueError(f"{requirement!r} has no lower bound: give it one (name>=X) in pyproject.toml")
    return f"{name}=={lows[0]}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    pyproject = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "pyproject.toml"
    for requirement in requirements(pyproject):
        print(lowest_pin(requirement))
    return 0


if __name__ == "__main__":
    sys.exit(main())
