"""Tests of bench/angle_readout.py: frames split by episode, targets from the state, a seeded run.

Run: pytest tests/test_angle_readout.py -q
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from leworld.checkpoint import export_model
from leworld.data.collect import collect
from leworld.model import LeWMConfig, LeWorldModel

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(encoder="cnn", image_size=32, cnn_channels=(8, 16, 16), enc_width=32, embed_dim=32, proj_hidden=64,
            pred_depth=1, pred_heads=2, pred_head_dim=16, pred_mlp=64, action_hidden=32)


def load_script():
    spec = importlib.util.spec_from_file_location("angle_readout", ROOT / "bench" / "angle_readout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pusht.h5"
    return collect("pusht", episodes=10, steps=30, resolution=32, policy="mix", seed=2, out=path, progress=False)


def test_frames_are_split_by_episode_and_targets_are_the_block_angle(dataset):
    script = load_script()
    (x_tr, y_tr, rows_tr), (x_va, y_va, rows_va) = script.load_frames(str(dataset), 10_000, 0.2, seed=3)
    with h5py.File(dataset, "r") as f:
        offsets, lengths = f["episode_offset"][:], f["episode_length"][:]
        state, pixels = f["state"][:], f["pixels"][:]
    episode_of = np.searchsorted(offsets, np.arange(len(state)), side="right") - 1  # row -> episode
    train_eps, val_eps = set(episode_of[rows_tr]), set(episode_of[rows_va])
    assert not train_eps & val_eps and len(val_eps) == 2 and len(train_eps) == 8
    for rows, x, y in ((rows_tr, x_tr, y_tr), (rows_va, x_va, y_va)):
        assert np.all((rows - offsets[episode_of[rows]]) % 5 == 0)  # every 5th frame of its episode
        assert torch.equal(x, torch.from_numpy(pixels[rows]).permute(0, 3, 1, 2))
        angle = state[rows, 4]
        np.testing.assert_allclose(y.numpy(), np.stack([np.cos(angle), np.sin(angle)], 1), atol=1e-6)
    assert len(rows_tr) + len(rows_va) == sum(math.ceil(n / 5) for n in lengths)


def test_a_run_is_seeded_and_reports_r_per_output(dataset, tmp_path, capsys):
    torch.manual_seed(0)
    model_dir = export_model(LeWorldModel(LeWMConfig(**TINY)), tmp_path / "model",
                             extra={"data": {"path": str(dataset)}, "dataset": {"env": "pusht"}})
    script = load_script()
    argv = ["--model", str(model_dir), "--steps", "4", "--batch-size", "8"]
    first, second = script.main(argv), script.main(argv)
    assert "supervised angle read-out" in capsys.readouterr().out
    for key in ("r_cos", "r_sin", "r_mean", "train_frames", "val_frames"):
        assert first[key] == second[key]
    assert -1.0 <= first["r_cos"] <= 1.0 and -1.0 <= first["r_sin"] <= 1.0
    assert first["r_mean"] == pytest.approx((first["r_cos"] + first["r_sin"]) / 2)


def test_a_model_without_a_dataset_is_a_clear_error(tmp_path):
    model_dir = export_model(LeWorldModel(LeWMConfig(**TINY)), tmp_path / "model", extra={})
    with pytest.raises(SystemExit, match="names no dataset"):
        load_script().main(["--model", str(model_dir)])
