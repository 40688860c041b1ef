"""Tests of leworld.forecast: the cost-weight fit, forecasts against a brute-force rollout, the CLI.

Run: pytest tests/test_forecast.py -q
"""
from __future__ import annotations

import copy
import hashlib
import json
import math

import numpy as np
import pytest
import torch

from leworld import forecast as forecast_mod
from leworld.checkpoint import export_model
from leworld.data.clips import ClipDataset, split_episodes
from leworld.data.collect import collect
from leworld.data.store import EpisodeStore
from leworld.forecast import cost_weights, fit_probes, forecast, wrap_degrees
from leworld.model import LeWMConfig, LeWorldModel

TINY = dict(encoder="cnn", image_size=32, cnn_channels=(8, 16, 16), enc_width=32, embed_dim=32, proj_hidden=64,
            pred_depth=1, pred_heads=2, pred_head_dim=16, pred_mlp=64, action_hidden=32, history=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pusht.h5"
    return collect("pusht", episodes=6, steps=24, resolution=32, seed=3, out=path, progress=False)


def tiny_model(**overrides) -> LeWorldModel:
    torch.manual_seed(0)
    model = LeWorldModel(LeWMConfig(**{**TINY, **overrides}))
    model.set_action_stats(torch.tensor([0.1, -0.2]), torch.tensor([0.5, 0.7]))
    with torch.no_grad():  # the adaLN-zero start ignores actions: perturb every weight so that they matter
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def export_tiny(directory, data, env: str = "pusht", **overrides):
    extra = {"data": {"path": str(data), "val_fraction": 0.34, "split_seed": 0}, "dataset": {"env": env}}
    return export_model(tiny_model(**overrides), directory, extra=extra)


# ---- cost weights -------------------------------------------------------------------------------------
def test_cost_weights_recover_the_weights_of_a_linear_embedding():
    """||z_a - z_b||^2 of z = Q [2 agent, 0.5 block, 0.1 angle_deg] (Q orthogonal) is exactly
    4 |d agent|^2 + 0.25 |d block|^2 + 0.01 d_angle^2."""
    rng = np.random.default_rng(0)
    n = 400
    s0 = np.concatenate([rng.uniform(50, 450, (n, 4)), rng.uniform(-1.0, 1.0, (n, 1)), rng.normal(size=(n, 2))], 1)
    s1 = s0 + np.concatenate([rng.normal(0, 30, (n, 4)), rng.uniform(-0.5, 0.5, (n, 1)), np.zeros((n, 2))], 1)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    embed = lambda s: np.concatenate([2 * s[:, :2], 0.5 * s[:, 2:4], 0.1 * np.degrees(s[:, 4:5]),  # noqa: E731
                                      np.zeros((len(s), 7))], 1) @ q.T
    fit = cost_weights("pusht", embed(s0), embed(s1), s0, s1)
    w = {k: v["weight"] for k, v in fit["quantities"].items()}
    assert w["agent"] == pytest.approx(4.0, rel=1e-9) and w["block"] == pytest.approx(0.25, rel=1e-9)
    assert w["angle"] == pytest.approx(0.01, rel=1e-9) and fit["quantities"]["block"]["slope"] == pytest.approx(0.5)
    assert abs(fit["intercept"]) < 1e-6 and fit["r2"] == pytest.approx(1.0, abs=1e-12) and fit["pairs"] == n


def test_cost_weights_wrap_the_angle_and_report_a_poor_fit():
    rng = np.random.default_rng(1)
    n = 300
    s0 = np.zeros((n, 7))
    s0[:, 4] = np.pi - 0.05  # just below +180 degrees
    s1 = s0.copy()
    s1[:, 4] = -np.pi + rng.uniform(0.0, 0.2, n)  # a small turn across the wrap
    turn = wrap_degrees(np.degrees(s1[:, 4] - s0[:, 4]))
    assert np.all(np.abs(turn) < 15.0)
    z0 = np.zeros((n, 3))
    z1 = np.stack([turn, np.zeros(n), np.zeros(n)], 1)
    fit = cost_weights("pusht", z0, z1, s0, s1)
    assert fit["quantities"]["angle"]["weight"] == pytest.approx(1.0, rel=1e-6)
    noise = rng.normal(size=(n, 3)) * 10.0  # a cost unrelated to the state change
    assert cost_weights("pusht", z0, noise, s0, s1)["r2"] < 0.2



def test_a_cost_that_falls_as_a_quantity_grows_has_slope_zero():
    """slope = sqrt(max(w, 0)): a negative weight (the cost shrinks as the block moves away) is no
    distance scale at all, so its slope is 0, not sqrt(|w|)."""
    rng = np.random.default_rng(2)
    n = 200
    s0 = np.concatenate([rng.uniform(50, 450, (n, 5)), np.zeros((n, 2))], 1)
    s1 = s0.copy()
    s1[:, :2] += rng.normal(0, 10, (n, 2))  # the agent moves
    s1[:, 2:4] += rng.normal(0, 10, (n, 2))  # and the block
    agent2 = ((s1[:, :2] - s0[:, :2]) ** 2).sum(1)
    block2 = ((s1[:, 2:4] - s0[:, 2:4]) ** 2).sum(1)
    cost = 5000.0 + 3.0 * agent2 - 0.5 * block2  # >= 0 for these moves
    assert cost.min() > 0
    z0, z1 = np.zeros((n, 1)), np.sqrt(cost)[:, None]
    fit = cost_weights("pusht", z0, z1, s0, s1)["quantities"]
    assert fit["block"]["weight"] == pytest.approx(-0.5, rel=1e-9) and fit["block"]["slope"] == 0.0
    assert fit["agent"]["weight"] == pytest.approx(3.0, rel=1e-9)
    assert fit["agent"]["slope"] == pytest.approx(math.sqrt(3.0), rel=1e-9)
    with pytest.raises(ValueError, match="more than 4 pairs"):
        cost_weights("pusht", z0[:3], z1[:3], s0[:3], s1[:3])


# ---- forecasts ----------------------------------------------------------------------------------------
def brute_force(model, store, val_eps, probes, horizon):
    """Per clip, frame by frame in float64: encode each frame alone, then predict autoregressively
    with the full `predict` on the last `history` frames; the probes read each prediction."""
    m = copy.deepcopy(model).double().eval()
    H, fs = m.config.history, m.config.frameskip
    clips = ClipDataset(store, val_eps, num_frames=H + horizon, frameskip=fs, with_state=True)
    rows = {q: [[] for _ in range(horizon)] for q in probes}
    floors = {q: [[] for _ in range(horizon)] for q in probes}
    moves = {q: [[] for _ in range(horizon)] for q in probes}  # (read change, true change) pairs
    emb_err, emb_copy = [[] for _ in range(horizon)], [[] for _ in range(horizon)]
    ends = []  # (z of the last context frame, z of the last frame, their states) per clip

    def read(q, z):  # the probe's reading of one embedding: (x, y), or the angle in degrees
        y = probes[q].predict(z.numpy()[None])[0]
        return np.array([np.degrees(np.arctan2(y[1], y[0]))]) if q == "angle" else y

    def truth(q, state):
        return np.array([np.degrees(state[4])]) if q == "angle" else state[[0, 1] if q == "agent" else [2, 3]]

    def diff(q, a, b):  # b - a, wrapped into [-180, 180) degrees for the angle
        return (b - a + 180.0) % 360.0 - 180.0 if q == "angle" else b - a

    with torch.no_grad():
        for i in range(len(clips)):
            clip = clips[i]
            frames = [m.encode(clip["pixels"][t].permute(2, 0, 1)[None, None])[0, 0] for t in range(H + horizon)]
            states = clip["state"].numpy().astype(np.float64)  # (H+T, S)
            blocks = m.normalize_actions(clip["action"].double())  # (H+T-1, fs*A)
            seq = frames[:H]
            for k in range(1, horizon + 1):
                n = len(seq)
                lo = max(0, n - H)
                emb = torch.stack(seq[lo:n])[None]  # (1, w, D)
                act = m.encode_actions(blocks[lo:n])[None]  # (1, w, D): block after each frame
                seq.append(m.predict(emb, act)[0, -1])
                for q in probes:
                    true_k = truth(q, states[H - 1 + k])
                    rows[q][k - 1].append(float(np.linalg.norm(diff(q, true_k, read(q, seq[-1])))))
                    floors[q][k - 1].append(float(np.linalg.norm(diff(q, true_k, read(q, frames[H - 1 + k])))))
                    moves[q][k - 1].append((diff(q, read(q, frames[H - 1]), read(q, seq[-1])),
                                            diff(q, truth(q, states[H - 1]), true_k)))
                emb_err[k - 1].append(float(((seq[-1] - frames[H - 1 + k]) ** 2).sum()))
                emb_copy[k - 1].append(float(((frames[H - 1] - frames[H - 1 + k]) ** 2).sum()))
            ends.append((frames[H - 1].numpy(), frames[-1].numpy(), states[H - 1], states[-1]))
    return {"rows": rows, "floors": floors, "moves": moves, "emb_err": emb_err, "emb_copy": emb_copy,
            "ends": ends}, clips


def test_forecast_matches_a_brute_force_rollout_and_the_states(dataset):
    model, store, horizon = tiny_model(), EpisodeStore(dataset), 2
    train_eps, val_eps = split_episodes(store.num_episodes, 0.34, 0)
    probes = fit_probes(model, store, "pusht", train_eps, progress=False)
    result = forecast(model, store, horizon=horizon, num_clips=10**6, val_fraction=0.34, probes=probes,
                      progress=False)
    brute, clips = brute_force(model, store, val_eps, probes, horizon)
    assert result["clips"] == len(clips) and result["history"] == 2 and len(clips) > 10
    for q in ("agent", "block", "angle"):
        for k in range(horizon):
            step = result["quantities"][q]["steps"][k]
            assert step["error"] == pytest.approx(np.mean(brute["rows"][q][k]), rel=1e-4, abs=1e-3)
            assert step["probe_floor"] == pytest.approx(np.mean(brute["floors"][q][k]), rel=1e-4, abs=1e-3)
            assert step["skill"] == pytest.approx(1 - step["error"] / step["copy_error"], abs=1e-12)
            read, true = (np.concatenate(v) for v in zip(*brute["moves"][q][k]))
            assert step["displacement_r"] == pytest.approx(np.corrcoef(read, true)[0, 1], abs=1e-4)
    for k in range(horizon):
        row = result["embedding"][k]
        assert row["error"] == pytest.approx(np.mean(brute["emb_err"][k]), rel=1e-4)
        assert row["copy_error"] == pytest.approx(np.mean(brute["emb_copy"][k]), rel=1e-4)
        assert row["skill"] == pytest.approx(1 - np.mean(brute["emb_err"][k]) / np.mean(brute["emb_copy"][k]), abs=1e-4)
    # the cost weights are fitted on (last context frame, last frame) pairs
    z0, z1, s0, s1 = (np.stack(v) for v in zip(*brute["ends"]))
    want = cost_weights("pusht", z0, z1, s0, s1)
    assert result["cost_weights"]["pairs"] == want["pairs"] == len(clips)
    assert result["cost_weights"]["r2"] == pytest.approx(want["r2"], rel=1e-3, abs=1e-4)
    for q, w in want["quantities"].items():
        assert result["cost_weights"]["quantities"][q]["weight"] == pytest.approx(w["weight"], rel=1e-3, abs=1e-9)
    # "nothing moves" straight from the stored states
    starts = clips.starts
    now = store.read("state", starts + 5 * 1).astype(np.float64)  # last context frame (history 2)
    later = store.read("state", starts + 5 * (1 + horizon)).astype(np.float64)
    steps = result["quantities"]
    assert steps["agent"]["steps"][-1]["copy_error"] == pytest.approx(
        np.linalg.norm(later[:, :2] - now[:, :2], axis=1).mean(), rel=1e-12)
    assert steps["block"]["steps"][-1]["copy_error"] == pytest.approx(
        np.linalg.norm(later[:, 2:4] - now[:, 2:4], axis=1).mean(), rel=1e-12)
    turn = np.abs((np.degrees(later[:, 4] - now[:, 4]) + 180.0) % 360.0 - 180.0)
    assert steps["angle"]["steps"][-1]["copy_error"] == pytest.approx(turn.mean(), rel=1e-12)


def test_forecast_is_seeded_and_checks_its_inputs(dataset):
    model, store = tiny_model(), EpisodeStore(dataset)
    a = forecast(model, store, horizon=1, num_clips=8, val_fraction=0.34, progress=False)
    b = forecast(model, store, horizon=1, num_clips=8, val_fraction=0.34, progress=False)
    assert a["clips"] == 8 and a["quantities"] == b["quantities"] and a["cost_weights"] == b["cost_weights"]
    train, _ = split_episodes(store.num_episodes, 0.34, 0)  # the probes are fitted on training episodes only
    given = forecast(model, store, horizon=1, num_clips=8, val_fraction=0.34, progress=False,
                     probes=fit_probes(model, store, "pusht", train, seed=0, progress=False))
    assert given["quantities"] == a["quantities"]
    with pytest.raises(ValueError, match="eval mode"):
        forecast(tiny_model().train(), store, progress=False)
    with pytest.raises(ValueError, match="encodes 48 px frames"):
        forecast(tiny_model(image_size=48), store, progress=False)
    with pytest.raises(ValueError, match="horizon"):
        forecast(model, store, horizon=0, progress=False)
    with pytest.raises(ValueError, match="probes are missing"):
        forecast(model, store, val_fraction=0.34, probes={}, progress=False)
    for too_few in (1, 4):  # Push-T's cost weights fit 3 quantities and an intercept: 5 clips at least
        with pytest.raises(ValueError, match=f"needs at least 5 validation clips .*got {too_few} .*raise --num-clips"):
            forecast(model, store, horizon=1, num_clips=too_few, val_fraction=0.34, progress=False)
    assert forecast(model, store, horizon=1, num_clips=5, val_fraction=0.34, progress=False)["clips"] == 5
    with pytest.raises(ValueError, match="at least 2 episodes"):  # a probe fitted on one episode's frames
        fit_probes(model, store, "pusht", train[:1], frames_per_episode=4, progress=False)


# ---- command line -------------------------------------------------------------------------------------
def test_table_keeps_large_numbers_apart():
    """A forecast far worse than copying has a large negative skill; it must not run into the floor
    column beside it (`23.0-1438.91`)."""
    step = {"step": 1, "error": 12345.6, "copy_error": 23.0, "probe_floor": 23.0, "skill": -1438.91,
            "displacement_r": -0.123}
    result = {"quantities": {"agent": {"unit": "px", "steps": [step]}},
              "embedding": [{"step": 1, "error": 1.0, "copy_error": 1.0, "skill": 0.0}],
              "cost_weights": {"pairs": 3, "r2": 0.5, "quantities": {"agent": {"slope": 1.0, "unit": "px"}}},
              "horizon": 1}
    row = forecast_mod.table(result).splitlines()[1]
    assert row.split()[-6:] == ["1", "12345.6", "23.0", "23.0", "-1438.91", "-0.123"]


def test_cli_writes_a_complete_json(tmp_path, dataset, capsys):
    model_dir = export_tiny(tmp_path / "model", dataset)
    out = tmp_path / "forecast.json"
    forecast_mod.main(["--model", str(model_dir), "--out", str(out), "--horizon", "2", "--num-clips", "16",
                       "--no-progress"])
    printed = capsys.readouterr().out
    assert "block (px)" in printed and "slopes agent" in printed
    result = json.loads(out.read_text())
    assert result["protocol"] == "forecast-v1" and result["env"] == "pusht" and result["clips"] == 16
    assert result["seed"] == 0 and result["data"] == str(dataset) and result["settings"]["horizon"] == 2
    assert result["model_sha256"] == hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert [s["step"] for s in result["quantities"]["block"]["steps"]] == [1, 2]
    assert result["quantities"]["block"]["steps"][1]["env_steps"] == 10
    assert set(result["cost_weights"]["quantities"]) == {"agent", "block", "angle"}
    assert not list(tmp_path.glob(".forecast.json.*"))


@pytest.mark.parametrize("case, message", [
    ("no model", "no exported model"),
    ("no dataset", "no dataset at"),
    ("other env", "trained on tworoom"),
])
def test_cli_clear_errors(tmp_path, dataset, case, message):
    args = ["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out.json"), "--no-progress"]
    if case == "no dataset":
        export_tiny(tmp_path / "model", tmp_path / "missing.h5")
    elif case == "other env":
        export_tiny(tmp_path / "model", dataset, env="tworoom")
    with pytest.raises(SystemExit, match=message):
        forecast_mod.main(args)
    assert not (tmp_path / "out.json").exists()
