"""Tests of leworld.allocator: freed memory is reused instead of faulted in again, and the opt-outs.

Run: pytest tests/test_allocator.py -q
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from leworld.allocator import OPT_OUT, keep_freed_memory

glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="needs Linux with glibc"
)

# One SIGReg forward and backward at the Push-T tiny training shape (B, T, D) = (128, 4, 192):
# its (T, K, B, J) = (4, 1024, 128, 17) float32 arrays are 36 MiB each, above glibc's largest
# default mmap threshold (32 MiB). Counts the minor page faults of each round, before and after
# keep_freed_memory(), in a child process: mallopt settings cannot be undone.
CHILD = """
import json, resource, sys, torch
from leworld.allocator import keep_freed_memory
from leworld.sigreg import sigreg

z = torch.randn(128, 4, 192, requires_grad=True)

def faults_per_round(rounds=4):
    counts = []
    for step in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        sigreg(z, step).backward()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

default = faults_per_round()
applied = keep_freed_memory()
kept = faults_per_round()
json.dump({"default": default, "applied": applied, "kept": kept}, sys.stdout)
"""


@pytest.fixture(autouse=True)
def no_user_choice(monkeypatch):
    """No opt-out, no malloc settings and no preloaded allocator in the environment."""
    for name in (OPT_OUT, "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)


@glibc_linux
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=120)
    r = json.loads(out.stdout)
    pages = 4 * 1024 * 17 * 128 * 4 // 4096  # of one (T, K, J, B) array
    assert r["applied"] is True
    # glibc's default: each such array is mmap'd and unmapped again, so every round faults in
    # the three of the forward (t s, cos, sin) anew
    assert min(r["default"]) > 2.5 * pages, r
    # kept: the first round faults the blocks in, later rounds mostly reuse them
    assert sum(r["kept"][1:]) < 0.2 * sum(r["default"][1:]), r


@pytest.mark.parametrize("env", [{OPT_OUT: "0"}, {"MALLOC_MMAP_THRESHOLD_": "65536"},
                                 {"MALLOC_TRIM_THRESHOLD_": "65536"}, {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
                                 {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"},
                                 {"LD_PRELOAD": "/opt/lib/libmimalloc.so"}])
def test_leaves_the_allocator_alone_when_the_user_chose(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert keep_freed_memory() is False


def test_threshold_must_fit_mallopt():
    for bad in (0, 2**31):
        with pytest.raises(ValueError, match="below 2\\*\\*31"):
            keep_freed_memory(bad)


@pytest.mark.parametrize("path", ["train.py", "plan.py", "surprise.py", "leworld/probe.py", "leworld/forecast.py",
                                  "leworld/separation.py", "leworld/recalibrate.py"])
def test_every_command_that_runs_the_network_keeps_freed_memory(path):
    """The commands the docs list call keep_freed_memory() in their main(), as the docs say."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[1] / path).read_text())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    calls = [n.func.id for n in ast.walk(main) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert "keep_freed_memory" in calls
