"""Shared test helpers."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
