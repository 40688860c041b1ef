"""Shared test helpers."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """The suite tests what Ctrl-C does (in this process and in the scripts it starts), so it needs
    Python's own SIGINT handler. A shell starts background jobs of a script (`nohup pytest &`,
    `cmd &` without job control) with SIGINT ignored, which the scripts under test rightly keep;
    the suite then installs the handler that an interactive start would have given it."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def build_cli(monkeypatch, tmp_path):
    """`build_cli(args, **kwargs)`: train.py's LeWMCLI built without running, in tmp_path (where a
    config's relative run and data paths land), reading `args`, not pytest's own arguments."""
    sys.path.insert(0, str(ROOT))
    try:
        from train import LeWMCLI
    finally:
        sys.path.remove(str(ROOT))
    from leworld.data.datamodule import LeWMDataModule
    from leworld.module import LeWMModule

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    return lambda args, **kwargs: LeWMCLI(LeWMModule, LeWMDataModule, args=args, run=False, **kwargs)
