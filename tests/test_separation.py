"""Tests of leworld.separation: the AUC and errors against brute force and the env's success test,
synthetic embeddings with known answers, and the command.

Run: pytest tests/test_separation.py -q
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from envs.push_t_physics import is_success, pose_error
from leworld import separation as sep_mod
from leworld.checkpoint import export_model, model_extra
from leworld.data.clips import split_episodes
from leworld.data.collect import collect
from leworld.data.store import EpisodeStore
from leworld.model import LeWMConfig, LeWorldModel
from leworld.probe import embed_frames
from leworld.separation import auc, goal_errors, separation, validation_frames


def brute_force(z, states, episode, env, band, radius=16.0):
    """separation() with every frame a goal, written as plain loops over goals and candidates."""
    z = np.asarray(z, np.float64)
    kinds = ("pose", "angle") if env == "pusht" else ("agent",)
    aucs, pairs, top1, chance = {q: [] for q in kinds}, {q: 0 for q in kinds}, [], []
    for g in range(len(z)):
        cands = []
        for n in range(len(z)):
            if episode[n] == episode[g]:
                continue
            if env == "pusht":
                pose, ang = pose_error(states[n], states[g])
                err = {"pose": pose[0] / 20.0, "angle": ang[0] / (math.pi / 9)}
            else:
                err = {"agent": math.dist(states[n][:2], states[g][:2]) / radius}
            cands.append((float(((z[n] - z[g]) ** 2).sum()), err))
        passing = [c for c, e in cands if all(v < 1 for v in e.values())]
        if not passing:
            continue
        top1.append(all(v < 1 for v in min(cands, key=lambda ce: ce[0])[1].values()))
        chance.append(len(passing) / len(cands))  # a candidate of another episode drawn at random passes
        for q in kinds:
            miss = [c for c, e in cands if 1 <= e[q] < band and all(e[k] < 1 for k in kinds if k != q)]
            if miss:
                wins = sum(1.0 if p < m else 0.5 if p == m else 0.0 for p, m in itertools.product(passing, miss))
                aucs[q].append(wins / (len(passing) * len(miss)))
                pairs[q] += len(passing) * len(miss)
    return ({q: (np.mean(v) if v else float("nan"), len(v), pairs[q]) for q, v in aucs.items()},
            (np.mean(top1), len(top1), np.mean(chance)))


def pusht_states(rng, n_episodes=8, per=40):
    """Random Push-T states clustered so that many pairs of episodes come within the success test."""
    states, episode = [], []
    for e in range(n_episodes):
        centre = np.array([200.0, 220.0, 260.0, 250.0, 0.0])
        s = centre + np.concatenate([rng.normal(0, 14, (per, 4)), rng.normal(0, 0.5, (per, 1))], 1)
        states.append(np.concatenate([s, np.zeros((per, 2))], 1))  # (per, 7): block velocity unused
        episode.append(np.full(per, e))
    return np.concatenate(states), np.concatenate(episode)


# ---- the pieces -------------------------------------------------------------------------------------
def test_auc_equals_the_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos = rng.integers(0, 6, rng.integers(1, 9)).astype(float)  # small integers: many ties
        neg = rng.integers(0, 6, rng.integers(1, 9)).astype(float)
        pairs = [(1.0 if p < m else 0.5 if p == m else 0.0) for p in pos for m in neg]
        assert auc(pos, neg) == pytest.approx(sum(pairs) / len(pairs), abs=1e-15)
    assert auc([0.0], [1.0]) == 1.0 and auc([1.0], [0.0]) == 0.0 and auc([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="at least one value"):
        auc([], [1.0])


def test_goal_errors_are_the_success_test_of_push_t():
    rng = np.random.default_rng(1)
    states, _ = pusht_states(rng, 2, 60)
    goals = states[:7]
    err = goal_errors("pusht", states, goals)
    for i, g in enumerate(goals):
        pose, ang = pose_error(states, np.repeat(g[None], len(states), 0))
        np.testing.assert_allclose(err["pose"][i] * 20.0, pose, rtol=1e-12)
        np.testing.assert_allclose(err["angle"][i] * math.pi / 9, ang, rtol=1e-12, atol=1e-12)
        passes = (err["pose"][i] < 1) & (err["angle"][i] < 1)
        assert np.array_equal(passes, is_success(states, np.repeat(g[None], len(states), 0)))
    assert 0 < passes.sum() < len(states)  # the draw does exercise both outcomes
    # angles either side of +-pi are close: 3.1 and -3.1 rad differ by 2 pi - 6.2 rad
    near = np.array([[100.0, 100.0, 200.0, 200.0, 3.1, 0.0, 0.0]])
    far_side = np.array([[100.0, 100.0, 200.0, 200.0, -3.1, 0.0, 0.0]])
    assert goal_errors("pusht", near, far_side)["angle"][0, 0] == pytest.approx((2 * math.pi - 6.2) / (math.pi / 9))
    with pytest.raises(ValueError, match="no success test"):
        goal_errors("cartpole", states, goals)


# ---- separation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("env", ["pusht", "tworoom"])
def test_separation_matches_brute_force(env):
    rng = np.random.default_rng(2)
    states, episode = pusht_states(rng, 5, 16)
    z = np.concatenate([states[:, :5] / np.array([20, 20, 20, 20, 0.3]), rng.normal(0, 1.0, (len(states), 6))], 1)
    result = separation(z, states, episode, env, num_goals=10**6, band=3.0)
    expected, (top1, goals, chance) = brute_force(z, states, episode, env, band=3.0)
    assert result["goals"] == len(states) and result["top1"]["goals"] == goals > 0
    assert result["top1"]["rate"] == pytest.approx(top1, abs=1e-12)
    assert result["top1"]["chance"] == pytest.approx(chance, abs=1e-12)
    for q, (value, n, pairs) in expected.items():
        assert n > 0 and result["misses"][q]["goals"] == n and result["misses"][q]["pairs"] == pairs
        assert result["misses"][q]["auc"] == pytest.approx(value, abs=1e-12)


def test_an_embedding_of_the_success_test_separates_and_one_without_the_angle_does_not():
    rng = np.random.default_rng(3)
    states, episode = pusht_states(rng, 10, 40)
    pose_part = states[:, :4] / 20.0  # (N, 4)
    angle_part = np.stack([np.cos(states[:, 4]), np.sin(states[:, 4])], 1) * 100.0  # (N, 2) dominant
    full = separation(np.concatenate([pose_part, angle_part], 1), states, episode, "pusht")
    blind = separation(pose_part, states, episode, "pusht")
    assert full["misses"]["angle"]["goals"] > 20 and full["misses"]["pose"]["goals"] > 20
    assert full["misses"]["angle"]["auc"] > 0.99  # passing angles (< 20 deg) always cost less than 20-60 deg
    assert blind["misses"]["pose"]["auc"] > 0.95
    assert 0.35 < blind["misses"]["angle"]["auc"] < 0.65  # blind to the angle: a coin toss
    # weighed as the test weighs them (20 px and 20 degrees one unit each), the cheapest state passes more often
    balanced = np.concatenate([pose_part, angle_part / 100.0 / (2 * math.sin(math.pi / 18))], 1)
    assert separation(balanced, states, episode, "pusht")["top1"]["rate"] > blind["top1"]["rate"] + 0.1


def test_separation_is_seeded_and_checks_its_inputs():
    rng = np.random.default_rng(4)
    states, episode = pusht_states(rng, 4, 30)
    z = rng.normal(size=(len(states), 8))
    a, b = separation(z, states, episode, "pusht", num_goals=40, seed=7), separation(z, states, episode, "pusht", num_goals=40, seed=7)
    assert a == b
    assert separation(z, states, episode, "pusht", num_goals=40, seed=8) != a
    with pytest.raises(ValueError, match="must agree"):
        separation(z[:-1], states, episode, "pusht")
    with pytest.raises(ValueError, match="at least 2 episodes"):
        separation(z, states, np.zeros(len(z), int), "pusht")
    for band in (1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="band above 1"):
            separation(z, states, episode, "pusht", band=band)
    with pytest.raises(ValueError, match="no success test"):
        separation(z, states, episode, "cartpole")


# ---- with a model, and the command -------------------------------------------------------------------
TINY = dict(encoder="cnn", image_size=32, cnn_channels=(8, 16, 16), enc_width=32, embed_dim=32, proj_hidden=64,
            pred_depth=1, pred_heads=2, pred_head_dim=16, pred_mlp=64, action_hidden=32, history=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tworoom.h5"
    return collect("tworoom", episodes=8, steps=30, resolution=32, seed=5, out=path, progress=False)


def export_tiny(directory, data, env: str = "tworoom"):
    torch.manual_seed(0)
    model = LeWorldModel(LeWMConfig(**TINY)).eval()
    extra = {"data": {"path": str(data), "val_fraction": 0.5, "split_seed": 0}, "dataset": {"env": env}}
    return model, export_model(model, directory, extra=extra)


def test_validation_frames_take_every_stride_and_cap_whole_episodes(dataset):
    store = EpisodeStore(dataset)
    rows, owner = validation_frames(store, np.array([1, 3, 6]), stride=4, max_frames=None)
    expected = np.concatenate([store.episode_offset[e] + np.arange(0, store.episode_length[e], 4) for e in (1, 3, 6)])
    assert np.array_equal(rows, expected) and np.array_equal(np.unique(owner), [1, 3, 6])
    capped, capped_owner = validation_frames(store, np.array([1, 3, 6]), stride=1, max_frames=70, seed=0)
    kept = np.unique(capped_owner)
    assert len(kept) == 2 and len(capped) == sum(store.episode_length[e] for e in kept) <= 70
    total = int(sum(store.episode_length[e] for e in (1, 3, 6)))
    exact, exact_owner = validation_frames(store, np.array([1, 3, 6]), stride=1, max_frames=total, seed=0)
    assert len(exact) == total and np.array_equal(np.unique(exact_owner), [1, 3, 6])  # a cap of exactly all keeps all


@pytest.fixture(scope="module")
def dataset_radius_8(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tworoom_r8.h5"
    return collect("tworoom", episodes=8, steps=30, resolution=32, seed=5, out=path, progress=False,
                   env_kwargs={"success_radius": 8.0})


@pytest.mark.parametrize("radius", [16.0, 8.0])
def test_cli_equals_the_brute_force_over_the_models_embeddings(tmp_path, radius, capsys, request):
    """The command scores with the success radius the dataset was collected with."""
    dataset = request.getfixturevalue("dataset" if radius == 16.0 else "dataset_radius_8")
    model, model_dir = export_tiny(tmp_path / "model", dataset)
    out = tmp_path / "sep.json"
    sep_mod.main(["--model", str(model_dir), "--out", str(out), "--num-goals", "100000", "--no-progress"])
    printed = capsys.readouterr().out
    assert "near miss by" in printed and "cheapest candidate passes" in printed
    result = json.loads(out.read_text())
    assert result["protocol"] == "separation-v1" and result["env"] == "tworoom" and result["val_episodes"] == 4
    assert result["model_sha256"] == hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    store = EpisodeStore(dataset)
    _, val = split_episodes(store.num_episodes, 0.5, 0)
    rows, owner = validation_frames(store, val)
    z = embed_frames(model, store, rows, progress=False)
    expected, (top1, goals, _) = brute_force(z, store.read("state", rows), owner, "tworoom", band=3.0, radius=radius)
    assert result["frames"] == len(rows) and result["top1"]["goals"] == goals > 0
    assert result["top1"]["rate"] == pytest.approx(top1, abs=1e-9)
    assert result["misses"]["agent"]["goals"] == expected["agent"][1] > 0
    assert result["misses"]["agent"]["pairs"] == expected["agent"][2]
    assert result["misses"]["agent"]["auc"] == pytest.approx(expected["agent"][0], abs=1e-9)
    assert not list(tmp_path.glob(".sep.json.*"))


@pytest.mark.parametrize("case, message", [("no model", "no exported model"), ("other env", "trained on pusht"),
                                           ("cap", "max_frames 5 keeps the frames of 1 of the 4 validation episodes"),
                                           ("stride", "none of the goal frames has a frame of another episode that "
                                                      "passes the success test"),
                                           ("band nan", "band a finite number above 1"),
                                           ("band inf", "band a finite number above 1")])
def test_cli_clear_errors(tmp_path, dataset, case, message, capsys):
    if case != "no model":
        export_tiny(tmp_path / "model", dataset, env="pusht" if case == "other env" else "tworoom")
    extra = {"cap": ["--max-frames", "5"],  # fewer frames than one episode holds
             "stride": ["--stride", "100000"],  # one frame per episode: no goal has a pass to separate
             "band nan": ["--band", "nan"], "band inf": ["--band", "inf"]}.get(case, [])
    with pytest.raises(SystemExit) as info:
        sep_mod.main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out.json"), "--no-progress",
                      *extra])
    said = str(info.value) + capsys.readouterr().err
    assert message in said  # a usage error prints, others carry it
    if case == "stride":  # the fixes that apply: not --max-frames, which kept every episode
        assert said.endswith("nothing to separate; lower --stride (100000); or score more validation episodes (4 "
                             "here): a dataset with more episodes, generated with the model's settings and passed "
                             "with --data")
    assert not (tmp_path / "out.json").exists()


def test_default_result_files_keep_each_seed(tmp_path, dataset, monkeypatch):
    _, model_dir = export_tiny(tmp_path / "runs" / "sep_tiny" / "version_0" / "model", dataset)
    monkeypatch.chdir(tmp_path)
    for seed in (0, 1):
        sep_mod.main(["--model", str(model_dir), "--seed", str(seed), "--num-goals", "20", "--no-progress"])
    first = json.loads((tmp_path / "runs" / "separation" / "sep_tiny.json").read_text())
    second = json.loads((tmp_path / "runs" / "separation" / "sep_tiny-seed1.json").read_text())
    assert (first["settings"]["seed"], second["settings"]["seed"]) == (0, 1)
    assert (first["seed"], second["seed"]) == (0, 1)  # the seed heads the record, as in every result JSON


def test_a_second_version_of_a_run_names_the_results_it_replaced(tmp_path, dataset, monkeypatch, capsys):
    """The default file names the run, not its version: results of version_1 replace version_0's,
    and say so; rerunning one model says nothing. The file records which version it holds."""
    runs = tmp_path / "runs" / "sep_tiny"
    _, first = export_tiny(runs / "version_0" / "model", dataset)
    other, _ = export_tiny(tmp_path / "scratch", dataset)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    second = export_model(other, runs / "version_1" / "model", extra=model_extra(first))
    monkeypatch.chdir(tmp_path)
    out = Path("runs") / "separation" / "sep_tiny.json"  # relative to the working directory, as the default
    for model in (first, first):
        sep_mod.main(["--model", str(model), "--num-goals", "20", "--no-progress"])
        assert "held the results of another model" not in capsys.readouterr().err
    sep_mod.main(["--model", str(second), "--num-goals", "20", "--no-progress"])
    assert f"{out} held the results of another model ({first}); they were replaced" in capsys.readouterr().err
    assert json.loads(out.read_text())["model_dir"] == str(second)
