"""The benchmark scripts run and report what they claim (timings themselves are not tested)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import train_loop  # noqa: E402

from leworld.device import cpu_model  # noqa: E402


def test_train_loop_runs_the_trainer_and_reports_its_rate(tmp_path):
    result = train_loop.run(str(ROOT / "configs/tworoom_tiny.yaml"), steps=3, warmup=1, device="cpu", batch_size=8,
                            log_every=2, root=str(tmp_path))
    assert result["steps"] == 3 and result["batch_size"] == 8 and result["log_every_n_steps"] == 2
    assert result["clips_per_s"] == pytest.approx(8 * 1000 / result["ms_per_step"], rel=0.01)
    assert "syncs_per_step" not in result  # counted on CUDA only
    assert result["device"].startswith(cpu_model()) and "torch threads" in result["device"]  # the hardware, named
    metrics = (tmp_path / "train_loop" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert "train/loss" in header and "train/grad_norm" in header
    steps = [int(row.split(",")[header.index("step")]) for row in metrics[1:] if row.split(",")[header.index("train/loss")]]
    assert steps == [1, 3]  # written every 2 steps of the 4 run
