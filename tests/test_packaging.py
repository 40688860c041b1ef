"""The lowest versions that pyproject.toml allows are what .ci/lowest installs and tests."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("lowest_pins", ROOT / ".ci" / "lowest_pins.py")
lowest_pins = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lowest_pins)


def test_every_dependency_is_pinned_at_its_lower_bound():
    pytest.importorskip("tomllib")
    reqs = lowest_pins.requirements(ROOT / "pyproject.toml")
    assert {Requirement(r).name for r in reqs} >= {"torch", "lightning", "jsonargparse", "numpy", "pytest"}
    for text in reqs:
        req = Requirement(text)  # an independent reading of the same string
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{text} needs one lower bound"
        pin = Requirement(lowest_pins.lowest_pin(text))
        assert pin.name == req.name and pin.extras == req.extras
        assert [(s.operator, s.version) for s in pin.specifier] == [("==", lower[0])]
        assert req.specifier.contains(lower[0])  # the pinned version is one the range allows


@pytest.mark.parametrize("text", ["numpy", "numpy<3", "numpy>1.24", "numpy>=1.24; python_version < '3.12'",
                                  "numpy>=1.24,>=1.26"])
def test_a_requirement_without_one_plain_lower_bound_is_refused(text):
    with pytest.raises(ValueError, match="numpy"):
        lowest_pins.lowest_pin(text)


def test_ci_runs_the_suite_with_the_lowest_versions_too():
    run = (ROOT / ".ci" / "run").read_text()
    lowest = (ROOT / ".ci" / "lowest").read_text()
    assert "bash .ci/lowest" in run
    assert "lowest_pins.py" in lowest and "--no-deps -e ." in lowest and "python -m pytest -q" in lowest
