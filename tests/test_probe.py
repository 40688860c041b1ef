"""Tests of leworld.probe: Pearson r, the linear and MLP probes, the episode split, the CLI.

Run: pytest tests/test_probe.py -q
"""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from leworld import probe as probe_mod
from leworld.checkpoint import export_model
from leworld.data.clips import split_episodes
from leworld.data.collect import collect
from leworld.data.store import EpisodeStore
from leworld.model import LeWMConfig, LeWorldModel
from leworld.probe import RIDGES, fit_linear, fit_mlp, holdout_split, pearson, select_frames

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(encoder="cnn", image_size=32, cnn_channels=(8, 16, 16), enc_width=32, embed_dim=32, proj_hidden=64,
            pred_depth=1, pred_heads=2, pred_head_dim=16, pred_mlp=64, action_hidden=32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tworoom.h5"
    return collect("tworoom", episodes=6, steps=20, resolution=32, seed=1, out=path, progress=False)


def export_tiny(directory: Path, data: Path, env: str = "tworoom", **overrides) -> Path:
    torch.manual_seed(0)
    model = LeWorldModel(LeWMConfig(**{**TINY, **overrides}))
    extra = {"data": {"path": str(data), "val_fraction": 0.2, "split_seed": 0}, "dataset": {"env": env}}
    return export_model(model, directory, extra=extra)


# ---- Pearson r --------------------------------------------------------------------------------------
def direct_r(a, b) -> float:
    """Pearson r of two sequences by its definition, summed with math.fsum."""
    n = len(a)
    ma, mb = math.fsum(a) / n, math.fsum(b) / n
    cov = math.fsum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(math.fsum((x - ma) ** 2 for x in a) * math.fsum((y - mb) ** 2 for y in b))


def test_pearson_matches_the_direct_formula_and_corrcoef():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 3)) * [1.0, 1e3, 1e-3] + [0.0, 5e4, -7.0]  # (N, K), scales and offsets differ
    b = a * [2.0, -1.0, 0.5] + rng.normal(size=(300, 3)) * [1.0, 1e3, 1e-3]
    r = pearson(a, b)  # (K,)
    for k in range(3):
        assert r[k] == pytest.approx(direct_r(a[:, k].tolist(), b[:, k].tolist()), abs=1e-12)
        assert r[k] == pytest.approx(np.corrcoef(a[:, k], b[:, k])[0, 1], abs=1e-12)
    assert isinstance(pearson(a[:, 0], b[:, 0]), float)
    assert pearson(a[:, 0], 3 * a[:, 0] + 1) == pytest.approx(1.0, abs=1e-12)
    assert pearson(a[:, 0], -a[:, 0]) == pytest.approx(-1.0, abs=1e-12)
    assert math.isnan(pearson(a[:, 0], np.ones(300)))  # a constant column has no r
    with pytest.raises(ValueError, match="equal shape"):
        pearson(a, b[:, :2])


# ---- linear probe --------------------------------------------------------------------------------------
def linear_data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)) * rng.uniform(0.1, 100.0, 12) + rng.uniform(-50, 50, 12)  # (N, D)
    weight, bias = rng.normal(size=(12, 2)), np.array([224.0, -3.0])  # (D, K), (K,)
    return x, x @ weight + bias, weight, bias


def test_targets_follow_the_env_state_layouts():
    """Two-Room state: agent x, y first; Push-T: agent x, y, block x, y, angle (rad), velocity."""
    state = np.array([[10.0, 20.0, 30.0, 40.0, math.pi / 6, 7.0, 8.0]])
    got = probe_mod.targets("pusht", state)
    np.testing.assert_array_equal(got["agent"], [[10.0, 20.0]])
    np.testing.assert_array_equal(got["block"], [[30.0, 40.0]])
    np.testing.assert_allclose(got["angle"], [[math.sqrt(3) / 2, 0.5]], rtol=1e-15)
    assert list(probe_mod.targets("tworoom", state[:, :4])) == ["agent"]
    np.testing.assert_array_equal(probe_mod.targets("tworoom", state[:, :4])["agent"], [[10.0, 20.0]])


def test_linear_probe_recovers_an_exact_linear_map():
    x, y, weight, bias = linear_data(400, 0)
    groups = np.repeat(np.arange(50), 8)
    chosen = fit_linear(x, y, groups=groups)
    assert chosen.ridge == RIDGES[0]  # noise-free targets: the weakest ridge predicts the held-out rows best
    x_new = np.random.default_rng(9).normal(size=(200, 12)) * 30.0  # fresh inputs (N, D)
    r = pearson(chosen.predict(x_new), x_new @ weight + bias)
    assert np.all(r > 1 - 1e-6)
    exact = fit_linear(x, y, ridge=0.0)
    solution = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0]  # (D+1, K): weights, then bias
    np.testing.assert_allclose(exact.weight, solution[:-1], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(exact.bias, solution[-1], rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(exact.weight, weight, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(chosen.weight, weight, rtol=1e-4, atol=1e-6)


def test_ridge_equals_the_augmented_least_squares_solution():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 5)) * [1, 2, 3, 4, 5] + 10  # (N, D)
    y = np.c_[x[:, 0] ** 2, x[:, 1]] + rng.normal(size=(100, 2))  # (N, K)
    lam = 0.3
    xs, ys = (x - x.mean(0)) / x.std(0), (y - y.mean(0)) / y.std(0)
    # |xs W - ys|^2 / n + lam |W|^2  ==  |[xs; sqrt(n lam) I] W - [ys; 0]|^2 / n
    ws = np.linalg.lstsq(np.r_[xs, math.sqrt(len(x) * lam) * np.eye(5)], np.r_[ys, np.zeros((5, 2))], rcond=None)[0]
    expected = (xs @ ws) * y.std(0) + y.mean(0)
    np.testing.assert_allclose(fit_linear(x, y, ridge=lam).predict(x), expected, rtol=1e-10, atol=1e-9)


def held_out_mse_by_hand(x, y, fit, held, lam) -> float:
    """A ridge probe fitted on the rows `fit` alone (their own mean and std, augmented least squares),
    scored on the rows `held` by the MSE of the targets standardised with the fitting rows' statistics."""
    d, k = x.shape[1], y.shape[1]
    mx, sx, my, sy = x[fit].mean(0), x[fit].std(0), y[fit].mean(0), y[fit].std(0)
    xs, ys = (x[fit] - mx) / sx, (y[fit] - my) / sy
    ws = np.linalg.lstsq(np.r_[xs, math.sqrt(len(fit) * lam) * np.eye(d)], np.r_[ys, np.zeros((d, k))],
                         rcond=None)[0]
    return float(np.mean((((x[held] - mx) / sx) @ ws - (y[held] - my) / sy) ** 2))


def test_the_ridge_is_chosen_without_looking_at_the_held_out_rows_statistics():
    """The held-out episodes only score the candidate ridges: scaling their features (as a drifted
    episode would) must not change how the fitting rows are standardised, so the choice equals a
    by-hand selection that standardises with the fitting rows alone."""
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(40), 5)  # (N,) 40 episodes of 5 rows
    fit, held = holdout_split(len(groups), groups, 0.2, 0)
    x = rng.normal(size=(200, 8))  # (N, D)
    y = x @ rng.normal(size=(8, 2)) * 0.3 + rng.normal(size=(200, 2))  # (N, K), noisy
    chosen = []
    for scale in (1.0, 30.0):  # the held-out rows' features 30x wider: all-row std would grow about 13x
        xd = x.copy()
        xd[held] *= scale
        expected = RIDGES[int(np.argmin([held_out_mse_by_hand(xd, y, fit, held, lam) for lam in RIDGES]))]
        assert probe_mod.select_ridge(xd, y, groups, 0.2, 0) == expected
        assert fit_linear(xd, y, groups=groups).ridge == expected
        chosen.append(expected)
    assert chosen[0] != chosen[1]  # the case is one where the held-out rows' values matter at all


# ---- MLP probe -------------------------------------------------------------------------------------------
def test_mlp_fits_a_nonlinear_function_much_better_than_the_linear_probe():
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, size=(3000, 4))  # (N, D)
    y = np.c_[np.cos(x[:, 0]), np.sin(x[:, 1]) * x[:, 2]]  # (N, 2): both uncorrelated with x
    train, val = slice(0, 2400), slice(2400, None)
    groups = np.arange(2400) // 10
    linear = fit_linear(x[train], y[train], groups=groups)
    mlp = fit_mlp(x[train], y[train], epochs=150, groups=groups)
    lin_mse = ((linear.predict(x[val]) - y[val]) ** 2).mean()
    mlp_mse = ((mlp.predict(x[val]) - y[val]) ** 2).mean()
    assert np.all(pearson(mlp.predict(x[val]), y[val]) > 0.95)
    assert np.all(pearson(linear.predict(x[val]), y[val]) < 0.3)
    assert mlp_mse < 0.1 * lin_mse
    assert 1 <= mlp.best_epoch <= mlp.epochs_run <= 150


def test_mlp_is_no_worse_than_the_linear_probe_when_the_truth_is_linear():
    """A few informative directions among many noisy ones (like a low-rank embedding): the MLP
    probe starts from the linear fit, so its extra freedom must not cost held-out accuracy."""
    rng = np.random.default_rng(1)
    n, d = 2500, 96
    latent = rng.normal(size=(n, 3))
    x = np.c_[latent, 0.3 * rng.normal(size=(n, d - 3))] @ rng.normal(size=(d, d))  # mixed: no dim is clean
    y = latent[:, :2] + 0.05 * rng.normal(size=(n, 2))  # (N, 2), linear in x up to noise
    train, val = slice(0, 2000), slice(2000, None)
    groups = np.arange(2000) // 10
    linear = fit_linear(x[train], y[train], groups=groups)
    mlp = fit_mlp(x[train], y[train], epochs=100, groups=groups)
    lin_mse = ((linear.predict(x[val]) - y[val]) ** 2).mean()
    mlp_mse = ((mlp.predict(x[val]) - y[val]) ** 2).mean()
    assert mlp_mse < 1.1 * lin_mse, (mlp_mse, lin_mse)


def test_mlp_that_never_improves_is_the_linear_probe_and_stops_after_its_patience():
    """With a zero learning rate no epoch beats epoch 0 (the linear probe alone): it is kept, and
    training stops once `patience` epochs have passed without improvement."""
    rng = np.random.default_rng(2)
    x, groups = rng.normal(size=(300, 6)), np.arange(300) // 6
    y = np.c_[x[:, 0] ** 2, x[:, 1]]  # (N, 2)
    mlp = fit_mlp(x, y, epochs=10, lr=0.0, patience=3, groups=groups)
    assert mlp.best_epoch == 0 and mlp.epochs_run == 3
    np.testing.assert_allclose(mlp.predict(x), mlp.linear.predict(x), rtol=1e-6, atol=1e-6)


def test_mlp_is_seeded_and_leaves_the_global_torch_state_alone():
    rng = np.random.default_rng(0)
    x, groups = rng.normal(size=(200, 6)), np.arange(200) // 5
    y = np.tanh(x[:, :2])
    torch.manual_seed(123)
    threads, state = torch.get_num_threads(), torch.get_rng_state()
    first = fit_mlp(x, y, hidden=16, epochs=5, groups=groups, seed=3).predict(x)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    np.testing.assert_array_equal(first, fit_mlp(x, y, hidden=16, epochs=5, groups=groups, seed=3).predict(x))
    assert not np.array_equal(first, fit_mlp(x, y, hidden=16, epochs=5, groups=groups, seed=4).predict(x))


# ---- frames and the episode split ----------------------------------------------------------------------
def test_holdout_split_holds_out_whole_groups():
    groups = np.repeat(np.arange(10), 3)
    fit, held = holdout_split(30, groups, 0.2, seed=0)
    assert sorted(np.r_[fit, held].tolist()) == list(range(30))
    assert len(np.unique(groups[held])) == 2 and not set(groups[fit]) & set(groups[held])
    for fraction in (0.9, 1.0):  # at least one group is always left to fit on
        fit, held = holdout_split(6, np.array([0, 0, 0, 1, 1, 1]), fraction, seed=0)
        assert len(fit) == 3 and len(held) == 3


def test_select_frames_draws_distinct_rows_inside_each_episode_under_the_cap(dataset):
    store = EpisodeStore(dataset)
    rows, owner = select_frames(store, np.arange(6), 4, None, np.random.default_rng(0))
    assert len(rows) == 24 and len(np.unique(rows)) == 24 and np.all(np.diff(rows) > 0)
    start, length = store.episode_offset[owner], store.episode_length[owner]
    assert np.all((rows >= start) & (rows < start + length))
    capped, capped_owner = select_frames(store, np.arange(6), 4, 10, np.random.default_rng(0))
    assert len(capped) == 8 and len(np.unique(capped_owner)) == 2  # 10 // 4 whole episodes
    for cap in (3, 0, -5):  # below one episode's frames: an error, not one episode kept anyway
        with pytest.raises(ValueError, match=f"a cap of {cap} frames keeps no episode's 4 frames"):
            select_frames(store, np.arange(6), 4, cap, np.random.default_rng(0))


def test_probe_fits_on_training_episodes_and_scores_on_validation_episodes(dataset, monkeypatch):
    store = EpisodeStore(dataset)
    model = LeWorldModel(LeWMConfig(**TINY)).eval()
    embedded, fitted = [], []

    def fake_embed(model, store, rows, batch_size=256, progress=True):  # column 0 carries the row
        embedded.append(rows.copy())
        return np.c_[rows, np.random.default_rng(len(rows)).normal(size=(len(rows), 7))]

    linear_calls = []

    def recording(fit):
        def wrapped(x, *args, **kwargs):
            fitted.append(x[:, 0].astype(np.int64))
            made = fit(x, *args, **kwargs)
            if fit is fit_linear:
                linear_calls.append((x[:, 0].astype(np.int64), args, kwargs, made))
            return made
        return wrapped

    monkeypatch.setattr(probe_mod, "embed_frames", fake_embed)
    monkeypatch.setattr(probe_mod, "fit_linear", recording(fit_linear))
    monkeypatch.setattr(probe_mod, "fit_mlp", recording(fit_mlp))
    result = probe_mod.probe(model, store, val_fraction=0.34, split_seed=5, frames_per_episode=5, mlp_epochs=2,
                             progress=False)
    train_eps, val_eps = split_episodes(store.num_episodes, 0.34, 5)
    episode_of_row = np.repeat(np.arange(store.num_episodes), store.episode_length)
    train_rows, val_rows = embedded
    assert set(episode_of_row[train_rows]) == set(train_eps.tolist())
    assert set(episode_of_row[val_rows]) == set(val_eps.tolist())
    assert not set(episode_of_row[train_rows]) & set(episode_of_row[val_rows])
    # the linear probe and the MLP probe see all training rows; the MLP's own linear base sees
    # the training rows outside its held-out episodes; nothing sees a validation row
    assert len(fitted) == 3 and sum(np.array_equal(rows, train_rows) for rows in fitted) == 2
    assert all(set(rows.tolist()) <= set(train_rows.tolist()) for rows in fitted)
    assert result["frames"] == {"train": 5 * len(train_eps), "val": 5 * len(val_eps),
                                "train_episodes": len(train_eps), "val_episodes": len(val_eps)}
    # the ridge is chosen on held-out whole episodes: fit_linear gets each training row's episode
    rows, args, kwargs, linear = next(c for c in linear_calls if np.array_equal(c[0], train_rows))
    groups = kwargs.get("groups", args[2] if len(args) > 2 else None)
    np.testing.assert_array_equal(groups, episode_of_row[train_rows])
    # the scores are those of the fitted probe on the validation rows, computed here by hand
    x_val = fake_embed(model, store, val_rows)
    name = next(iter(result["quantities"]))
    y_val = probe_mod.targets(result["env"], store.read("state", val_rows))[name].astype(np.float64)
    pred = linear.predict(x_val)
    mse = ((pred - y_val) ** 2).mean(0)
    got = result["quantities"][name]["linear"]
    np.testing.assert_allclose(got["mse_per_output"], mse, rtol=1e-12)
    assert got["mse"] == pytest.approx(mse.mean(), rel=1e-12)
    r = [np.corrcoef(pred[:, k], y_val[:, k])[0, 1] for k in range(y_val.shape[1])]
    np.testing.assert_allclose(got["r_per_output"], r, rtol=1e-9)


# ---- command line -------------------------------------------------------------------------------------
def test_cli_smoke_writes_a_complete_json(tmp_path, dataset):
    model_dir = export_tiny(tmp_path / "model", dataset)
    out = tmp_path / "probe.json"
    cmd = [sys.executable, "-m", "leworld.probe", "--model", str(model_dir), "--out", str(out),
           "--mlp-epochs", "3", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "agent (x, y)" in proc.stdout and "0.996" in proc.stdout
    result = json.loads(out.read_text())
    assert result["protocol"] == "probe-v1" and result["env"] == "tworoom" and result["seed"] == 0
    assert result["model"] == str(model_dir) and result["data"] == str(dataset)
    assert result["model_sha256"] == hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert result["leworld_version"] and result["wall_seconds"] > 0
    assert result["settings"]["frames_per_episode"] == 8 and result["settings"]["val_fraction"] == 0.2
    assert result["frames"] == {"train": 40, "val": 8, "train_episodes": 5, "val_episodes": 1}
    agent = result["quantities"]["agent"]
    assert agent["outputs"] == ["x", "y"] and agent["paper_linear_r"] == 0.996
    for kind in ("linear", "mlp"):
        assert len(agent[kind]["r_per_output"]) == 2 and agent[kind]["mse"] >= 0
        assert agent[kind]["r"] == pytest.approx(np.mean(agent[kind]["r_per_output"]))
        assert len(agent[kind]["mse_per_output"]) == 2
        assert agent[kind]["mse"] == pytest.approx(np.mean(agent[kind]["mse_per_output"]))
    assert not list(tmp_path.glob(".probe.json.*"))  # no temporary file left behind


def test_cli_warns_when_another_split_of_the_training_data_would_score_trained_episodes(tmp_path, dataset, capsys):
    model_dir = export_tiny(tmp_path / "model", dataset)  # trained with val_fraction 0.2, split_seed 0
    base = ["--model", str(model_dir), "--mlp-epochs", "1", "--no-progress"]
    probe_mod.main([*base, "--out", str(tmp_path / "a.json")])
    assert "warning" not in capsys.readouterr().err
    probe_mod.main([*base, "--out", str(tmp_path / "b.json"), "--split-seed", "1"])
    assert "is not the split the model was trained with (0.2 / 0)" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("no model", "no exported model"),
    ("no dataset", "no dataset at"),
    ("other env", "trained on pusht"),
    ("other resolution", "encodes 48 px frames"),
])
def test_cli_clear_errors(tmp_path, dataset, case, message):
    args = ["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out.json"), "--no-progress"]
    if case == "no dataset":
        export_tiny(tmp_path / "model", tmp_path / "missing.h5")
    elif case == "other env":
        export_tiny(tmp_path / "model", dataset, env="pusht")
    elif case == "other resolution":
        export_tiny(tmp_path / "model", dataset, image_size=48)
    with pytest.raises(SystemExit, match=message) as err:
        probe_mod.main(args)
    assert not (tmp_path / "out.json").exists()
    if case == "no dataset":  # the collect command with the model's env and frame size
        assert f"collect --env tworoom --resolution {TINY['image_size']} --out" in str(err.value)


def test_a_training_checkpoint_is_probed_like_the_model_exported_from_it(tmp_path, dataset):
    """A .ckpt written during training carries its data settings: probing it needs no --data and gives
    exactly the numbers of the model exported at the same step; the results name the .ckpt's hash."""
    import lightning as L

    from leworld.checkpoint import model_extra
    from leworld.data.datamodule import LeWMDataModule
    from leworld.module import LeWMModule

    L.seed_everything(0)
    module = LeWMModule(LeWMConfig(**TINY, history=1), num_directions=16)
    dm = LeWMDataModule(str(dataset), num_frames=2, frameskip=5, batch_size=8, num_workers=0, val_fraction=0.2,
                        split_seed=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, default_root_dir=str(tmp_path), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, dm)
    ckpt, exported = Path(trainer.checkpoint_callback.best_model_path), tmp_path / "model"
    assert ckpt.suffix == ".ckpt" and (exported / "model.safetensors").is_file()

    from_ckpt, from_export = model_extra(ckpt), model_extra(exported)
    assert from_ckpt["data"] == from_export["data"] == {"path": str(dataset), "val_fraction": 0.2, "split_seed": 2,
                                                        "num_frames": 2, "frameskip": 5, "batch_size": 8,
                                                        "shuffle_seed": 0}
    assert from_ckpt["global_step"] == from_export["global_step"] == 3

    results = {}
    for name, model in (("ckpt", ckpt), ("export", exported)):
        out = tmp_path / f"{name}.json"
        probe_mod.main(["--model", str(model), "--out", str(out), "--mlp-epochs", "2", "--no-progress"])
        results[name] = json.loads(out.read_text())
    assert results["ckpt"]["quantities"] == results["export"]["quantities"]
    assert results["ckpt"]["settings"]["val_fraction"] == 0.2 and results["ckpt"]["settings"]["split_seed"] == 2
    assert results["ckpt"]["model_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert results["export"]["model_sha256"] != results["ckpt"]["model_sha256"]


def test_a_negative_ridge_or_device_or_out_that_cannot_work_is_refused_before_any_work(tmp_path, capsys):
    x, y = np.random.default_rng(0).normal(size=(20, 3)), np.random.default_rng(1).normal(size=(20, 2))
    for ridge in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            fit_linear(x, y, ridge=ridge)
    (tmp_path / "adir").mkdir()
    from leworld import forecast as forecast_mod, separation as separation_mod

    cases = [(probe_mod, ["--ridge", "-1"], "--ridge must be a finite number >= 0"),
             (forecast_mod, ["--ridge", "-0.5"], "--ridge must be a finite number >= 0"),
             (separation_mod, ["--seed", "-1"], "--seed must be >= 0"),
             (probe_mod, ["--device", "bogus"], "unknown device 'bogus'"),
             (forecast_mod, ["--out", str(tmp_path / "adir")], "is a directory"),
             (probe_mod, ["--max-val-frames", "0"], "--max-val-frames (0) must keep the frames of at least 2"),
             (probe_mod, ["--max-train-frames", "15"], "at least 2 x --frames-per-episode = 16"),
             (forecast_mod, ["--max-train-frames", "-5"], "--max-train-frames (-5) must keep the frames"),
             (probe_mod, ["--mlp-patience", "-3"], "--mlp-patience must be at least 1, got -3"),
             (probe_mod, ["--split-seed", "-1"], "--split-seed must be >= 0, got -1")]
    for module, args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            module.parse_args(["--model", str(tmp_path / "model"), *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, (module.__name__, args)


@pytest.mark.parametrize("args, episodes", [(["--max-train-frames", "16", "--frames-per-episode", "8"], 2),
                                            (["--holdout-fraction", "0.7"], 5)])
def test_too_few_training_episodes_for_the_two_holdouts_is_refused_before_encoding(tmp_path, dataset, monkeypatch,
                                                                                 args, episodes):
    """The MLP probe's stopping hold-out and its linear base's ridge hold-out together need 3 or more
    training episodes (more for a large --holdout-fraction); settings that leave fewer are named,
    before any frame is encoded."""
    model_dir = export_tiny(tmp_path / "model", dataset)
    monkeypatch.setattr(probe_mod, "embed_frames", lambda *a, **k: pytest.fail("encoded before the check"))
    with pytest.raises(SystemExit, match=rf"error: the probes have {episodes} training episode\(s\).*needs at least "
                                         r"2: keep more training episodes .*--max-train-frames.*--holdout-fraction"):
        probe_mod.main(["--model", str(model_dir), "--out", str(tmp_path / "p.json"), "--no-progress", *args])
    assert not (tmp_path / "p.json").exists()


def test_the_holdout_check_agrees_with_what_fitting_needs():
    """check_holdouts refuses exactly the episode counts and fractions where fit_mlp cannot fit."""
    from leworld.probe import check_holdouts

    rng = np.random.default_rng(0)
    for episodes in range(1, 8):
        for fraction in (0.1, 0.2, 0.5, 0.7, 0.9):
            groups = np.repeat(np.arange(episodes), 4)
            x, y = rng.normal(size=(len(groups), 3)), rng.normal(size=(len(groups), 2))
            try:
                fit_mlp(x, y, epochs=1, groups=groups, holdout_fraction=fraction)
                fits = True
            except ValueError:
                fits = False
            try:
                check_holdouts(episodes, fraction)
                allowed = True
            except ValueError:
                allowed = False
            assert allowed == fits, (episodes, fraction)


def test_an_unwritable_default_result_path_is_refused_before_any_work(tmp_path, dataset, monkeypatch):
    """Without --out the result goes to runs/probe/<name>.json; where that cannot be written (here
    `runs` is a file), the command says so at once, not after probing."""
    model_dir = export_tiny(tmp_path / "model", dataset)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("not a folder")
    monkeypatch.setattr(probe_mod, "embed_frames", lambda *a, **k: pytest.fail("worked before the check"))
    with pytest.raises(SystemExit, match=r"error: cannot write runs/probe/\S+\.json: runs is a file.*pass --out"):
        probe_mod.main(["--model", str(model_dir), "--no-progress"])
    assert (tmp_path / "runs").read_text() == "not a folder"
