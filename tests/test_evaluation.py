"""Evaluation: protocol sampling, the MPC loop with an exact analytic Two-Room model, baselines,
success summaries, and plan.py end to end (results JSON, videos, clear errors)."""
from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import envs
from envs.two_room import WALL, TwoRoomBatch
from leworld.checkpoint import export_model, load_model
from leworld.data.clips import split_episodes
from leworld.data.collect import collect
from leworld.data.store import EpisodeStore
from leworld.evaluation import (EvalProtocol, get_protocol, make_baseline, run_episodes, sample_pairs, summarize,
                                wilson_interval)
from leworld.model import LeWMConfig, LeWorldModel
from leworld.planning import CEM, MPCPolicy

ROOT = Path(__file__).resolve().parents[1]
RES = 64


@pytest.fixture(scope="module")
def tworoom_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tworoom.h5"
    collect("tworoom", episodes=60, steps=100, resolution=RES, policy="expert", noise=2.0, seed=0, out=path,
            workers=1, progress=False)
    return path


# ------------------------------------------------------------------------------------------ protocols
def test_pairs_are_deterministic_and_from_validation_episodes(tworoom_data):
    store = EpisodeStore(tworoom_data)
    protocol = get_protocol("paper-v3")
    a = sample_pairs(store, protocol, seed=0, val_fraction=0.2, split_seed=1)
    b = sample_pairs(store, protocol, seed=0, val_fraction=0.2, split_seed=1)
    c = sample_pairs(store, protocol, seed=1, val_fraction=0.2, split_seed=1)
    for field in ("episode", "start", "goal", "start_state", "goal_state"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.start, c.start)
    train, val = split_episodes(store.num_episodes, 0.2, 1)
    assert set(a.episode) <= set(val) and not set(a.episode) & set(train)
    assert len(a.episode) == protocol.num_episodes == 50
    assert np.array_equal(a.goal - a.start, np.full(50, protocol.goal_offset))
    steps = store.episode_length[a.episode] - 1
    assert (a.start >= 0).all() and (a.goal <= steps).all()
    # the states are the dataset's rows for those steps
    rows = store.episode_offset[a.episode] + a.goal
    assert np.array_equal(a.goal_state, store.read("state", rows))
    # 12 validation episodes for 50 pairs: every validation episode is used
    assert set(a.episode) == set(val)


def test_protocol_presets_and_overrides():
    v3 = get_protocol("paper-v3")
    assert (v3.num_episodes, v3.goal_offset, v3.budget, v3.split) == (50, 25, 50, "val")
    v1 = get_protocol("paper-v1-tworoom")
    assert (v1.goal_offset, v1.budget) == (100, 150)
    small = v3.replace(num_episodes=4)
    assert small.name == "paper-v3+num_episodes=4" and small.num_episodes == 4 and small.version == v3.version
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("paper-v2")


def test_goal_offset_longer_than_every_episode_is_a_clear_error(tworoom_data):
    with pytest.raises(ValueError, match="goal offset"):
        sample_pairs(EpisodeStore(tworoom_data), EvalProtocol("long", 1, 5, 500, 600), seed=0)


# ------------------------------------------------------------------------------------------ summaries
def test_wilson_interval_against_closed_form():
    for k, n in ((0, 50), (49, 50), (25, 50), (7, 9)):
        lo, hi = wilson_interval(k, n)
        p, z = k / n, 1.959963984540054
        # the interval's ends are the roots of (p - q)^2 = z^2 q (1 - q) / n
        for q in (lo, hi):
            if 0 < q < 1:
                assert math.isclose((p - q) ** 2, z * z * q * (1 - q) / n, rel_tol=1e-3, abs_tol=1e-9)
        assert lo <= p <= hi


def test_summary_counts_already_successful_starts_separately():
    success = np.array([1, 1, 0, 1, 0], bool)
    already = np.array([1, 0, 0, 0, 0], bool)
    s = summarize(success, already)
    assert (s["successes"], s["episodes"], s["already_successful"]) == (3, 5, 1)
    assert s["rate"] == 0.6 and s["excluding_already"]["rate"] == 0.5 and s["excluding_already"]["episodes"] == 4


# ------------------------------------------------------------------------------------------ exact model
class AnalyticTwoRoom(torch.nn.Module):
    """An exact Two-Room world model: embedding = agent position / 224, dynamics = the env's own.

    `encode` finds the red dot's centroid in the frame; `rollout` steps the env's collision code
    for every sampled action sequence. Planning with it tests the planner and the MPC loop alone.
    """

    def __init__(self, env: TwoRoomBatch, frameskip: int = 5):
        super().__init__()
        self.env = env
        self.config = SimpleNamespace(action_dim=2, frameskip=frameskip, history=1)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, T, C, H, W) uint8 -> (B, T, 2)
        x = pixels.double()
        red = (x[:, :, 0] - x[:, :, 1]).clamp_min(0)  # (B, T, H, W): the dot is red, walls and floor grey
        R = pixels.shape[-1]
        u = (torch.arange(R, dtype=torch.float64) + 0.5) / R  # pixel centres in [0, 1]
        mass = red.sum((-1, -2))
        return torch.stack([(red.sum(-2) * u).sum(-1) / mass, (red.sum(-1) * u).sum(-1) / mass], -1).float()

    def normalize_actions(self, a):
        return a

    def denormalize_actions(self, a):
        return a

    def rollout(self, context, blocks, context_actions=None):  # (B, 1, 2), (B, S, T, fs*2) -> (B, S, T, 2)
        B, S, T, _ = blocks.shape
        pos = (context[:, -1:, :].expand(B, S, 2).reshape(B * S, 2).double() * 224).numpy()
        acts = blocks.reshape(B * S, T, self.config.frameskip, 2).clamp(-1, 1).double().numpy()
        out = np.empty((B * S, T, 2))
        for t in range(T):
            for k in range(self.config.frameskip):
                d = acts[:, t, k] * (self.env.speed / self.env._substeps)
                for _ in range(self.env._substeps):
                    pos = self.env._move(pos, d)
            out[:, t] = pos
        return torch.from_numpy(out / 224).float().view(B, S, T, 2)


def test_analytic_encoder_finds_the_agent():
    env = envs.make_batch("tworoom", 16, resolution=RES, seed=3)
    obs = env.reset()
    model = AnalyticTwoRoom(env)
    emb = model.encode(torch.as_tensor(obs["pixels"]).permute(0, 3, 1, 2)[:, None])[:, 0] * 224
    err = np.linalg.norm(emb.numpy() - env.agent_pos, axis=1)
    assert err.max() < 4.0, err  # world px; the success radius is 16


def test_mpc_with_an_exact_model_crosses_the_door(tworoom_data):
    """Pairs whose goal is in the other room: planning alone (no learning) must reach >= 90%."""
    store = EpisodeStore(tworoom_data)
    protocol = EvalProtocol("cross-door", 1, 400, 25, 50, "all")
    pairs = sample_pairs(store, protocol, seed=0)
    left = lambda s: s[:, 0] < WALL[0]  # noqa: E731
    cross = np.flatnonzero(left(pairs.start_state) != left(pairs.goal_state))[:20]
    assert len(cross) >= 10, "too few door crossings among the sampled pairs"
    for field in ("episode", "start", "goal", "start_state", "goal_state"):
        setattr(pairs, field, getattr(pairs, field)[cross])
    env = envs.make_batch("tworoom", len(cross), resolution=RES, seed=0)
    model = AnalyticTwoRoom(env)
    policy = MPCPolicy(model, CEM(num_samples=100, topk=10, iterations=5), horizon=5)  # execute all 5 blocks
    result = run_episodes(env, policy, pairs, budget=50, progress=False)
    fresh = ~result.already
    assert fresh.sum() == len(cross)  # none starts solved: start and goal are in different rooms
    assert result.success.mean() >= 0.9, f"exact-model MPC crossed the door in {result.success.mean():.0%}"
    # and the straight line, which ignores the wall, does worse on the same pairs
    straight = run_episodes(env, make_baseline("straight", "tworoom"), pairs, 50, progress=False)
    assert straight.success.mean() < result.success.mean()


def test_baselines_on_identical_pairs(tworoom_data):
    store = EpisodeStore(tworoom_data)
    pairs = sample_pairs(store, get_protocol("paper-v1-tworoom").replace(num_episodes=24), seed=0,
                         val_fraction=0.5)
    env = envs.make_batch("tworoom", 24, resolution=RES, seed=0)
    rates = {b: run_episodes(env, make_baseline(b, "tworoom", seed=0), pairs, 150, progress=False).success.mean()
             for b in ("random", "straight", "expert")}
    assert rates["expert"] == 1.0  # the noiseless expert reaches every dataset goal within 150 steps
    assert rates["random"] < rates["expert"]
    again = run_episodes(env, make_baseline("random", "tworoom", seed=0), pairs, 150, progress=False)
    assert again.success.mean() == rates["random"]  # seeded


def test_an_episode_takes_exactly_its_budget_of_env_steps(tworoom_data):
    """The policy acts `budget` times; a recording holds the start and every step's frame."""
    store = EpisodeStore(tworoom_data)
    pairs = sample_pairs(store, get_protocol("paper-v3").replace(num_episodes=3), seed=0)

    class Counting:
        calls = 0

        def reset(self, env):
            pass

        def act(self, env, obs):
            Counting.calls += 1
            return np.zeros((env.num_envs, 2), np.float32)

    env = envs.make_batch("tworoom", 3, resolution=RES, seed=0)
    res = run_episodes(env, Counting(), pairs, 7, record=True, progress=False)
    assert Counting.calls == 7 and res.env_steps == 21 and res.frames.shape[:2] == (3, 8)


def test_pairs_do_not_repeat_an_episode_while_unused_ones_remain(tworoom_data):
    store = EpisodeStore(tworoom_data)
    for n in (5, 12):  # 12 validation episodes at val_fraction 0.2
        pairs = sample_pairs(store, get_protocol("paper-v3").replace(num_episodes=n), seed=3, val_fraction=0.2)
        assert len(set(pairs.episode.tolist())) == n


def test_more_pairs_than_episodes_spread_over_every_episode_and_never_repeat_a_pair(tworoom_data):
    """50 pairs from 12 validation episodes: each episode gives 4 or 5 of them, at distinct starts
    (a repeated pair would count one start twice in the success rate and narrow its interval)."""
    store = EpisodeStore(tworoom_data)
    _, val = split_episodes(store.num_episodes, 0.2, 1)
    for seed in range(3):
        pairs = sample_pairs(store, get_protocol("paper-v3"), seed=seed, val_fraction=0.2, split_seed=1)
        keys = list(zip(pairs.episode.tolist(), pairs.start.tolist()))
        assert len(set(keys)) == len(keys) == 50
        counts = np.unique(pairs.episode, return_counts=True)
        assert set(counts[0].tolist()) == set(val.tolist()) and set(counts[1].tolist()) == {4, 5}
        steps = store.episode_length[pairs.episode] - 1
        assert (pairs.start >= 0).all() and (pairs.goal <= steps).all()
    # episodes with fewer starts than their share leave the rest to the others: episodes of 30, 27 and
    # 60 steps have 6, 3 and 36 starts 25 steps before an end
    from types import SimpleNamespace

    rows = np.array([31, 28, 61])
    store = SimpleNamespace(path="lengths.h5", num_episodes=3, episode_length=rows,
                            episode_offset=np.concatenate([[0], np.cumsum(rows)[:-1]]),
                            read=lambda field, at: np.asarray(at, np.float64)[:, None])
    pairs = sample_pairs(store, EvalProtocol("uneven", 1, 20, 25, 50, split="all"), seed=0)
    keys = set(zip(pairs.episode.tolist(), pairs.start.tolist()))
    assert len(keys) == 20 and {(0, s) for s in range(6)} | {(1, s) for s in range(3)} <= keys
    assert (pairs.goal <= rows[pairs.episode] - 1).all()
    np.testing.assert_array_equal(pairs.start_state[:, 0], store.episode_offset[pairs.episode] + pairs.start)
    with pytest.raises(ValueError, match="only 45 distinct start/goal pairs 25 steps apart in the 3 episode"):
        sample_pairs(store, EvalProtocol("uneven", 1, 46, 25, 50, split="all"), seed=0)


def test_straight_line_baselines_head_for_the_goal_agent_position():
    tworoom = envs.make_batch("tworoom", 2, resolution=RES, seed=0)
    tworoom.set_state([[50.0, 100.0, 52.0, 90.0], [150.0, 100.0, 100.0, 100.0]])
    action = make_baseline("straight", "tworoom").act(tworoom, None)
    np.testing.assert_allclose(action, [[0.4, -1.0], [-1.0, 0.0]])  # (target - agent) / 5 px per step, clipped
    pusht = envs.make_batch("pusht", 1, resolution=16, seed=0)
    pusht.reset_to([[100.0, 100.0, 300.0, 300.0, 0.0, 0.0, 0.0]], [[150.0, 80.0, 400.0, 400.0, 1.0, 0.0, 0.0]])
    from envs.push_t_physics import ACTION_SCALE

    want = np.clip(np.array([[50.0, -20.0]]) / ACTION_SCALE, -1, 1)  # toward the goal's agent, not its block
    np.testing.assert_allclose(make_baseline("straight", "pusht").act(pusht, None), want, rtol=1e-6)


def test_episode_errors_track_the_distance_to_the_goal(tworoom_data):
    """run_episodes reports each episode's final and smallest distance to the goal: the final one
    is that of the final state, the smallest one decides success (Two-Room: < 16 px)."""
    store = EpisodeStore(tworoom_data)
    pairs = sample_pairs(store, get_protocol("paper-v1-tworoom").replace(num_episodes=24), seed=0, val_fraction=0.5)
    env = envs.make_batch("tworoom", 24, resolution=RES, seed=0)
    res = run_episodes(env, make_baseline("random", "tworoom", seed=0), pairs, 60, progress=False)
    final = np.hypot(res.final_state[:, 0] - res.final_state[:, 2], res.final_state[:, 1] - res.final_state[:, 3])
    np.testing.assert_allclose(res.final_errors["agent_px"], final, rtol=1e-12)
    # how far each goal was at the start, from the pairs' own states (Two-Room state: agent xy, target xy)
    start = np.hypot(pairs.start_state[:, 0] - pairs.goal_state[:, 0], pairs.start_state[:, 1] - pairs.goal_state[:, 1])
    np.testing.assert_allclose(res.start_errors["agent_px"], start, rtol=1e-9, atol=1e-9)
    assert (res.min_errors["agent_px"] <= res.start_errors["agent_px"]).all() and start.max() > 1
    assert (res.min_errors["agent_px"] <= res.final_errors["agent_px"]).all()
    np.testing.assert_array_equal(res.success, res.min_errors["agent_px"] < env.success_radius)
    assert 0 < res.success.sum() < 24 and (res.min_errors["agent_px"] < res.final_errors["agent_px"]).any()


# ------------------------------------------------------------------------------------------ plan.py
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tworoom_data) -> Path:
    torch.manual_seed(0)
    cfg = LeWMConfig(encoder="cnn", image_size=RES, cnn_channels=(8, 16, 16), enc_width=32, embed_dim=16,
                     proj_hidden=32, history=2, pred_depth=1, pred_heads=2, pred_head_dim=8, pred_mlp=32,
                     action_hidden=16, action_dim=2, frameskip=5)
    model = LeWorldModel(cfg)
    with torch.no_grad():  # off its initialisation, whose zeroed action conditioning ignores actions
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("model")
    export_model(model, d, extra={"dataset": {"env": "tworoom"},
                                  "data": {"path": str(tworoom_data), "val_fraction": 0.1, "split_seed": 0}})
    return d


def run_plan(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "plan.py"), *args, "--no-progress"], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_plan_cli_writes_complete_results(tmp_path, tiny_model_dir):
    out = tmp_path / "res.json"
    proc = run_plan("--model", str(tiny_model_dir), "--num-episodes", "3", "--iterations", "2", "--num-samples",
                    "16", "--topk", "4", "--video", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    digest = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert f"model: {tiny_model_dir} (sha256 {digest[:12]})" in proc.stdout  # which model, said before the table
    assert "paper-v3+num_episodes=3" in proc.stdout and "straight" in proc.stdout
    res = json.loads(out.read_text())
    for key in ("protocol", "env", "env_params", "data", "model", "planner", "seed", "pairs", "results",
                "leworld_version", "torch_version", "device", "command", "wall_seconds"):
        assert key in res, key
    assert res["protocol"]["goal_offset"] == 25 and res["protocol"]["version"] == 1
    assert res["planner"]["planner"] == "cem" and res["planner"]["iterations"] == 2 and res["planner"]["horizon"] == 5
    assert len(res["model"]["sha256"]) == 64 and res["model"]["config"]["history"] == 2
    assert [r["policy"] for r in res["results"]] == ["model (cem)", "random", "straight", "expert"]
    model_row = res["results"][0]
    assert model_row["planning"]["calls"] == 2 and model_row["planning"]["plans"] == 6  # 50 steps: 2 x 25
    # steps/s of the whole evaluation include planning; those inside env.step alone are faster
    assert model_row["env_only_steps_per_s"] > model_row["env_steps_per_s"] > 0
    assert model_row["env_steps_per_s"] == pytest.approx(3 * 50 / model_row["seconds"])
    assert len(model_row["per_episode"]) == 3 and len(res["pairs"]) == 3
    for e in model_row["per_episode"]:
        assert set(e["final_errors"]) == set(e["min_errors"]) == set(e["start_errors"]) == {"agent_px"}
        assert e["min_errors"]["agent_px"] <= min(e["final_errors"]["agent_px"], e["start_errors"]["agent_px"])
        assert e["success"] == (e["min_errors"]["agent_px"] < 16)
    assert "median distance to the goal" in proc.stdout
    gifs = sorted(Path(res["videos"]).glob("ep*.gif"))
    assert len(gifs) == 3
    outcome = {f"ep{i:03d}": ("success" if e["success"] else "failure") for i, e in enumerate(model_row["per_episode"])}
    assert all(g.stem.split("_")[1] == outcome[g.stem.split("_")[0]] for g in gifs)
    # same seed, same numbers
    out2 = tmp_path / "res2.json"
    assert run_plan("--model", str(tiny_model_dir), "--num-episodes", "3", "--iterations", "2", "--num-samples", "16",
                    "--topk", "4", "--no-baselines", "--out", str(out2), cwd=tmp_path).returncode == 0
    res2 = json.loads(out2.read_text())
    assert res2["results"][0]["per_episode"] == model_row["per_episode"] and res2["pairs"] == res["pairs"]


def test_plan_cli_draws_pairs_from_the_models_own_validation_split(tmp_path, tiny_model_dir, tworoom_data):
    """The split settings a model records (here val_fraction 0.3, split_seed 3) choose the episodes
    that plan.py draws its pairs from, and the results say so."""
    model_dir = tmp_path / "seed3"
    export_model(load_model(tiny_model_dir), model_dir, extra={
        "dataset": {"env": "tworoom"}, "data": {"path": str(tworoom_data), "val_fraction": 0.3, "split_seed": 3}})
    out = tmp_path / "res.json"
    proc = run_plan("--model", str(model_dir), "--policy", "random", "--num-episodes", "30", "--no-baselines",
                    "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["data"]["split_seed"] == 3 and res["data"]["val_fraction"] == 0.3
    episodes = {p["episode"] for p in res["pairs"]}
    assert episodes <= set(split_episodes(60, 0.3, 3)[1].tolist())
    assert not episodes <= set(split_episodes(60, 0.3, 0)[1].tolist())  # seed 0 would give other episodes
    # 30 pairs from 18 validation episodes: said beside the table, whose intervals count 30 independent pairs
    assert len(episodes) == 18 and "note: the 30 pairs come from 18 dataset episodes" in proc.stdout


def test_plan_cli_passes_every_planning_option_on_and_runs_baselines_on_the_same_pairs(tmp_path, tiny_model_dir,
                                                                                       tworoom_data):
    """Non-default values of every MPC option reach the policy (its recorded settings), --seed draws
    the pairs and names the file, and every baseline starts from the model's pairs."""
    proc = run_plan("--model", str(tiny_model_dir), "--num-episodes", "3", "--seed", "1", "--iterations", "2",
                    "--num-samples", "16", "--topk", "4", "--init-std", "0.5", "--horizon", "3", "--receding-horizon",
                    "2", "--cost", "sum", "--deadline", "--warm-start", "--hold-actions", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "runs" / "plan" / f"{tiny_model_dir.name}-paper-v3+num_episodes=3-seed1.json"
    res = json.loads(out.read_text())
    want = {"num_samples": 16, "topk": 4, "iterations": 2, "init_std": 0.5, "horizon": 3, "receding_horizon": 2,
            "cost": "sum", "deadline": 50, "warm_start": True, "hold_actions": True, "seed": 1,
            "replan_every": 10}  # 2 blocks of 5 env steps
    assert {k: res["planner"][k] for k in want} == want
    assert res["seed"] == 1 and res["policy"] == "model"
    store = EpisodeStore(tworoom_data)
    protocol = get_protocol("paper-v3").replace(num_episodes=3)
    pairs = sample_pairs(store, protocol, seed=1, val_fraction=0.1, split_seed=0)
    assert res["pairs"] == pairs.to_records()
    assert res["pairs"] != sample_pairs(store, protocol, seed=0, val_fraction=0.1, split_seed=0).to_records()
    starts = [[e["start_errors"] for e in row["per_episode"]] for row in res["results"]]
    assert len(starts) == 4 and all(s == starts[0] for s in starts)  # model, random, straight, expert: same pairs
    every = tmp_path / "every.json"
    assert run_plan("--model", str(tiny_model_dir), "--num-episodes", "2", "--iterations", "1", "--num-samples", "8",
                    "--topk", "2", "--replan-every", "2", "--no-baselines", "--out", str(every),
                    cwd=tmp_path).returncode == 0
    assert json.loads(every.read_text())["planner"]["replan_every"] == 2


@pytest.mark.parametrize("args, ok", [(["--horizon", "3", "--receding-horizon", "3"], True),
                                      (["--topk", "1"], False), (["--replan-every", "0"], False)])
def test_plan_cli_option_limits_are_where_the_planner_needs_them(tmp_path, tiny_model_dir, args, ok):
    proc = run_plan("--model", str(tiny_model_dir), "--num-episodes", "1", "--iterations", "1", "--num-samples", "8",
                    "--topk", "2", "--no-baselines", "--out", str(tmp_path / "r.json"), *args, cwd=tmp_path)
    assert (proc.returncode == 0) == ok and (ok or proc.returncode == 2), proc.stderr


def test_plan_cli_plans_an_ensemble_of_models(tmp_path, tiny_model_dir, tworoom_data):
    torch.manual_seed(1)
    second = load_model(tiny_model_dir)
    for p in second.parameters():  # another model of the same data
        p.data.add_(0.1 * torch.randn_like(p))
    extra = {"dataset": {"env": "tworoom"}, "data": {"path": str(tworoom_data), "val_fraction": 0.1, "split_seed": 0}}
    export_model(second, tmp_path / "second", extra=extra)
    proc = run_plan("--model", str(tiny_model_dir), str(tmp_path / "second"), "--num-episodes", "2", "--iterations",
                    "2", "--num-samples", "16", "--topk", "4", "--no-baselines", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # without --out the file is named after the members, so planning another model does not overwrite it
    out = tmp_path / "runs" / "plan" / f"{tiny_model_dir.name}+second-paper-v3+num_episodes=2-seed0.json"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    res = json.loads(out.read_text())
    assert res["model"]["ensemble"] == 2 and len(res["model"]["path"]) == 2
    assert res["model"]["sha256"][0] == hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert res["model"]["sha256"][0] != res["model"]["sha256"][1]
    assert [c["embed_dim"] for c in res["model"]["config"]] == [16, 16]
    assert res["results"][0]["planning"]["plans"] == 4
    # a model of other data cannot join: the pairs are drawn from its training split
    export_model(second, tmp_path / "other", extra={**extra, "data": {**extra["data"], "split_seed": 1}})
    proc = run_plan("--model", str(tiny_model_dir), str(tmp_path / "other"), "--num-episodes", "2", cwd=tmp_path)
    assert proc.returncode != 0 and "ensemble mismatch" in proc.stderr and "split_seed" in proc.stderr


def test_plan_cli_says_when_it_replaces_another_models_results(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Default file names name the run, so two versions of one run write the same file: replacing
    another model's results is said; rerunning the same model is not."""
    monkeypatch.setenv("LEWORLD_KEEP_FREED_MEMORY", "0")
    plan_script = load_plan_script()
    other = tmp_path / "other"
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        next(model.parameters()).add_(0.1)
    export_model(model, other, extra=json.loads((tiny_model_dir / "config.json").read_text())["extra"])
    out = tmp_path / "r.json"
    small = ["--num-episodes", "1", "--iterations", "1", "--num-samples", "8", "--topk", "2", "--no-baselines",
             "--no-progress", "--out", str(out)]
    for model_dir, replaced in ((tiny_model_dir, None), (tiny_model_dir, None), (other, tiny_model_dir)):
        assert plan_script.main(["--model", str(model_dir), *small]) == 0
        err = capsys.readouterr().err
        assert ("held the results of another model" in err) == (replaced is not None)
        if replaced is not None:
            assert f"({replaced})" in err
    assert json.loads(out.read_text())["model"]["path"] == str(other)


def test_plan_cli_interrupted_says_so_in_a_line_and_writes_nothing(tmp_path, tiny_model_dir):
    import signal

    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "plan.py"), "--model", str(tiny_model_dir),
                             "--iterations", "30", "--num-episodes", "50", "--no-progress", "--video", "--out", str(out)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("model: ")  # planning starts next
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: no results file was written" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no results, no videos, no temporary folder


def test_plan_cli_baseline_without_a_model(tmp_path, tworoom_data):
    proc = run_plan("--policy", "expert", "--env", "tworoom", "--data", str(tworoom_data), "--num-episodes", "4",
                    "--no-baselines", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "runs" / "plan" / "tworoom-paper-v3+num_episodes=4-expert-seed0.json"  # no model: the policy
    res = json.loads(out.read_text())
    assert res["results"][0]["policy"] == "expert" and res["results"][0]["rate"] == 1.0
    assert res["policy"] == "expert"


def test_plan_cli_clear_errors(tmp_path, tiny_model_dir, tworoom_data):
    proc = run_plan("--model", str(tmp_path / "nope"), cwd=tmp_path)
    assert proc.returncode != 0 and "no model at" in proc.stderr and "configs/<preset>.yaml" in proc.stderr
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "pusht_tiny.yaml").write_text("")  # a run is named after the config that trains it
    proc = run_plan("--model", "runs/pusht_tiny", cwd=tmp_path)
    assert proc.returncode != 0 and "--config configs/pusht_tiny.yaml" in proc.stderr
    proc = run_plan("--model", str(tiny_model_dir), "--env", "pusht", cwd=tmp_path)
    assert proc.returncode != 0 and "env/model mismatch" in proc.stderr
    other = tmp_path / "d32.h5"
    collect("tworoom", episodes=4, steps=30, resolution=32, policy="expert", seed=0, out=other, workers=1,
            progress=False)
    proc = run_plan("--model", str(tiny_model_dir), "--data", str(other), cwd=tmp_path)
    assert proc.returncode != 0 and "32 px" in proc.stderr and "64 px" in proc.stderr
    proc = run_plan("--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.h5"), cwd=tmp_path)
    assert proc.returncode != 0 and "no dataset at" in proc.stderr
    # the collect command with this env and the model's size, not the collector's default 224 px
    assert f"`python -m leworld.data.collect --env tworoom --resolution {RES} --out" in proc.stderr
    proc = run_plan("--policy", "straight", "--env", "tworoom", "--data", str(tmp_path / "missing.h5"), cwd=tmp_path)
    assert proc.returncode != 0 and "--env tworoom --resolution <frame size in px> --out" in proc.stderr  # no model


def load_plan_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_script", ROOT / "plan.py")
    plan_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_script)
    return plan_script


@pytest.mark.parametrize("args, message", [
    (["--iterations", "0"], "--iterations must be at least 1, got 0"),  # was silently replaced by the default
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--topk", "8", "--num-samples", "4"], "--topk (8) elites are chosen among --num-samples (4)"),
    (["--init-std", "-1"], "--init-std must be a positive number"),
    (["--init-std", "inf"], "--init-std must be a positive number"),
    (["--horizon", "2", "--receding-horizon", "3"], "it can be at most 2"),
    (["--receding-horizon", "2", "--replan-every", "3"], "both say when to replan: give one of them"),
    (["--num-episodes", "-3"], "--num-episodes must be at least 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    # a warm start needs a rest of the plan, which plans executed to their end never leave
    (["--warm-start"], "--warm-start starts each plan from the unexecuted rest of the previous one"),
    (["--warm-start", "--receding-horizon", "5"], "every plan runs to its end"),
    # options the chosen policy would not read
    (["--policy", "oracle", "--planner", "mppi", "--cost", "sum"], "--policy oracle does not use --planner, --cost"),
    (["--policy", "straight", "--topk", "2", "--deadline"], "--policy straight does not use --topk, --deadline"),
    (["--policy", "random", "--oracle-cost", "terminal"], "--policy random does not use --oracle-cost"),
    (["--oracle-cost", "terminal"], "--policy model does not use --oracle-cost"),
    # elites: only CEM and iCEM (and the oracle's CEM) keep them, and the default must fit the samples
    (["--planner", "mppi", "--topk", "3"], "the mppi planner keeps none: drop --topk"),
    (["--planner", "gradient", "--topk", "3"], "the gradient planner keeps none"),
    (["--planner", "icem", "--num-samples", "10"], "--num-samples 10 is below the 30 elites the planner keeps"),
    (["--policy", "oracle", "--num-samples", "6"], "--num-samples 6 is below the 10 elites"),
])
def test_plan_cli_rejects_option_values_before_any_work(tmp_path, tiny_model_dir, capsys, args, message):
    plan_script = load_plan_script()
    with pytest.raises(SystemExit) as exit_info:
        plan_script.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "r.json"), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # the same model twice is not an ensemble
        plan_script.main(["--model", str(tiny_model_dir), str(tiny_model_dir)])
    assert "the same model is given twice" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_plan_cli_refuses_a_dataset_other_than_the_one_the_model_trained_on(tmp_path, tworoom_data):
    """The validation episodes of a file generated again with other settings (here: fewer episodes
    recorded by the model) can be episodes the model trained on: refused when the file is the one
    the model records, used with a note when given with --data, silent when it is the model's."""
    store = EpisodeStore(tworoom_data)
    torch.manual_seed(0)
    cfg = LeWMConfig(encoder="cnn", image_size=RES, cnn_channels=(8, 16, 16), enc_width=32, embed_dim=16,
                     proj_hidden=32, history=2, pred_depth=1, pred_heads=2, pred_head_dim=8, pred_mlp=32,
                     action_hidden=16, action_dim=2, frameskip=5)
    data = {"path": str(tworoom_data), "val_fraction": 0.1, "split_seed": 0}
    for name, episodes in (("same", store.metadata["episodes"]), ("other", 30)):
        export_model(LeWorldModel(cfg), tmp_path / name,
                     extra={"dataset": {**store.metadata, "episodes": episodes}, "data": data})
    small = ("--num-episodes", "2", "--iterations", "1", "--num-samples", "8", "--topk", "2", "--no-baselines")
    proc = run_plan("--model", str(tmp_path / "other"), *small, cwd=tmp_path)
    assert proc.returncode == 1 and not list(tmp_path.glob("runs/plan/*.json"))
    assert (f"error: {tworoom_data} is not the dataset the model trained on: episodes 60 (the model's: 30). Its "
            "validation episodes may be episodes the model trained on") in proc.stderr
    proc = run_plan("--model", str(tmp_path / "other"), "--data", str(tworoom_data), *small, cwd=tmp_path)
    assert proc.returncode == 0 and f"note: {tworoom_data} is not the dataset the model trained on" in proc.stderr
    proc = run_plan("--model", str(tmp_path / "same"), *small, cwd=tmp_path)
    assert proc.returncode == 0 and "not the dataset" not in proc.stderr, proc.stderr


def test_plan_cli_refuses_what_would_mislabel_or_lose_results(tmp_path, tiny_model_dir, tworoom_data, monkeypatch,
                                                              capsys):
    monkeypatch.setenv("LEWORLD_KEEP_FREED_MEMORY", "0")
    plan_script = load_plan_script()
    small = ["--num-episodes", "2", "--iterations", "1", "--num-samples", "8", "--topk", "2", "--no-progress"]
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    # a given --out that cannot be written: a usage error before planning, and before the model is
    # even loaded (or found)
    for model, out, message in ((tiny_model_dir, tmp_path / "adir", "adir is a directory"),
                                (tmp_path / "no_such_model", tmp_path / "afile" / "r.json", "afile is a file")):
        with pytest.raises(SystemExit) as exit_info:
            plan_script.main(["--model", str(model), "--out", str(out), *small])
        assert exit_info.value.code == 2 and re.search(f"--out: .*{message}", capsys.readouterr().err)
    with pytest.raises(SystemExit, match="unknown device 'bogus'"):
        plan_script.main(["--model", str(tiny_model_dir), "--device", "bogus", *small])
    # a held-out protocol measured on other episodes would print its name beside the wrong numbers
    with pytest.raises(SystemExit, match="is not the held-out set of far-tworoom-v1.*noise 2.0 .the protocol's: 0.5"):
        plan_script.main(["--model", str(tiny_model_dir), "--protocol", "far-tworoom-v1", "--data",
                          str(tworoom_data), *small])
    # a Two-Room protocol does not apply to a Push-T model
    pusht = tmp_path / "pusht_model"
    export_model(load_model(tiny_model_dir), pusht, extra={"dataset": {"env": "pusht"},
                                                           "data": {"path": str(tmp_path / "p.h5")}})
    with pytest.raises(SystemExit, match="paper-v1-tworoom.* is for tworoom, not pusht: choose one of paper-v3"):
        plan_script.main(["--model", str(pusht), "--protocol", "paper-v1-tworoom", *small])
    baseline = ["--num-episodes", "2", "--no-progress"]  # a baseline takes no planning options
    with pytest.raises(SystemExit, match="without --model: pass --env and --data"):
        plan_script.main(["--policy", "random", *baseline])
    with pytest.raises(SystemExit, match="without --model: pass --data, the dataset the pairs come from"):
        plan_script.main(["--policy", "random", "--env", "tworoom", *baseline])
    with pytest.raises(SystemExit, match="pass --data .or --model. to choose the resolution of far-tworoom-v1"):
        plan_script.main(["--policy", "straight", "--env", "tworoom", "--protocol", "far-tworoom-v1", *baseline])
    assert list((tmp_path / "adir").iterdir()) == []


def test_plan_cli_videos_hold_only_the_last_run(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LEWORLD_KEEP_FREED_MEMORY", "0")
    plan_script = load_plan_script()
    out = tmp_path / "r.json"
    small = ["--model", str(tiny_model_dir), "--num-episodes", "3", "--iterations", "1", "--num-samples", "8",
             "--topk", "2", "--no-baselines", "--no-progress", "--video", "--out", str(out)]
    assert plan_script.main([*small, "--amp"]) == 0
    first = json.loads(out.read_text())
    assert first["planner"]["amp"] is torch.cuda.is_available()  # recorded as it ran: bf16 on CUDA only
    assert len(list(Path(first["videos"]).iterdir())) == 3
    assert plan_script.main(["--model", str(tiny_model_dir), "--policy", "random", "--num-episodes", "2",
                             "--no-baselines", "--no-progress", "--video", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    outcome = ["success" if e["success"] else "failure" for e in res["results"][0]["per_episode"]]
    gifs = sorted(p.name for p in Path(res["videos"]).iterdir())
    assert len(outcome) == 2 and gifs == [f"ep{i:03d}_{o}.gif" for i, o in enumerate(outcome)]  # none of the first run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r_videos"]  # no temporary folder left
    # shared like the results file (0o644), not private like the temporary folder they were written to
    assert (tmp_path / "r_videos").stat().st_mode & 0o777 == 0o755
    assert {(tmp_path / "r_videos" / g).stat().st_mode & 0o777 for g in gifs} == {0o644}
    # a run without --video removes the GIFs of the results it replaces (the JSON no longer names them)
    assert plan_script.main(["--model", str(tiny_model_dir), "--policy", "random", "--num-episodes", "2",
                             "--no-baselines", "--no-progress", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"] and json.loads(out.read_text())["videos"] is None
    (tmp_path / "r_videos").mkdir()
    (tmp_path / "r_videos" / "notes.txt").write_text("mine")  # a folder of anything else is left alone
    assert plan_script.main(["--model", str(tiny_model_dir), "--policy", "random", "--num-episodes", "2",
                             "--no-baselines", "--no-progress", "--out", str(out)]) == 0
    assert (tmp_path / "r_videos" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["tworoom", "pusht"])
def test_reset_to_replays_a_start_goal_pair(name):
    env = envs.make_batch(name, 3, resolution=32, seed=0)
    env.reset(seed=1)
    starts = env.get_state()
    env.reset(seed=2)
    goals = env.get_state()
    env.set_colour((0, 255, 0), index=0)
    obs = env.reset_to(starts, goals)
    state = env.get_state()
    if name == "tworoom":
        assert np.array_equal(state[:, :2], starts[:, :2]) and np.array_equal(state[:, 2:], goals[:, :2])
    else:
        assert np.allclose(state[:, :5], starts[:, :5]) and np.allclose(env.goal, goals)
    fresh = envs.make_batch(name, 3, resolution=32, seed=0)
    fresh.reset_to(starts, goals)
    assert np.array_equal(obs["pixels"], fresh.render())  # colours restored as by reset
    env.reset_to(goals, goals)
    assert env.success().all()  # the goal state itself passes the success test
    with pytest.raises(ValueError):
        env.reset_to(starts[:2], goals[:2])


def test_heldout_protocol_collects_its_dataset_once(tmp_path, tiny_model_dir):
    out = tmp_path / "far.json"
    args = ("--model", str(tiny_model_dir), "--protocol", "far-tworoom-v1", "--num-episodes", "2", "--iterations", "1",
            "--num-samples", "8", "--topk", "2", "--no-baselines", "--out", str(out))
    proc = run_plan(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = tmp_path / "data" / "eval" / f"far-tworoom-v1-{RES}px.h5"
    store = EpisodeStore(data)
    spec = get_protocol("far-tworoom-v1").dataset
    assert store.num_episodes == spec["episodes"] and store.metadata["noise"] == spec["noise"]
    assert store.metadata["env_params"]["target_mode"] == "other_room"
    res = json.loads(out.read_text())
    assert res["protocol"]["split"] == "all" and res["data"]["path"].endswith(data.name)
    mtime = data.stat().st_mtime_ns
    assert run_plan(*args, cwd=tmp_path).returncode == 0
    assert data.stat().st_mtime_ns == mtime  # reused, not collected again


def test_plan_cli_plans_a_training_checkpoint_like_the_exported_model(tmp_path, tiny_model_dir, tworoom_data):
    """A Lightning .ckpt (as training writes it: the config in hyper_parameters, the data module's
    settings beside it) plans without --env or --data, exactly as the exported model with the same weights."""
    model = load_model(tiny_model_dir)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"global_step": 7, "epoch": 0, "hyper_parameters": {"model": model.config.to_dict(), "lr": 1e-3},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "datamodule_hyper_parameters": {"path": str(tworoom_data), "val_fraction": 0.1, "split_seed": 0,
                                                "num_frames": 3, "frameskip": 5,
                                                "generate": {"env": "tworoom", "episodes": 10}}}, ckpt)
    common = ("--num-episodes", "3", "--iterations", "2", "--num-samples", "16", "--topk", "4", "--no-baselines")
    results = {}
    for name, path in (("ckpt", ckpt), ("export", tiny_model_dir)):
        out = tmp_path / f"{name}.json"
        proc = run_plan("--model", str(path), *common, "--out", str(out), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        results[name] = json.loads(out.read_text())
    assert results["ckpt"]["env"] == "tworoom" and results["ckpt"]["pairs"] == results["export"]["pairs"]
    assert results["ckpt"]["results"][0]["per_episode"] == results["export"]["results"][0]["per_episode"]
    assert results["ckpt"]["model"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_plan_env_draws_frames_like_the_data_it_plans_on(tmp_path):
    """plan.py's env takes its rendering (here Push-T's supersample) from the dataset's metadata."""
    plan_script = load_plan_script()
    path = tmp_path / "pusht.h5"
    collect("pusht", episodes=1, steps=6, resolution=RES, policy="mix", seed=0, out=path, workers=1,
            progress=False, supersample=4)
    store = EpisodeStore(path)
    env = plan_script.make_env(store, "pusht", 2)
    assert env.supersample == 4
    episode = store.episode(0)
    env.set_state(np.repeat(episode["state"][4][None], 2, axis=0))
    np.testing.assert_array_equal(env.render()[1], episode["pixels"][4])


def test_protocols_pairs_and_baselines_refuse_values_that_would_measure_something_else(tworoom_data):
    with pytest.raises(ValueError, match="goal_offset must be a whole number >= 1"):
        get_protocol("paper-v3").replace(goal_offset=-5)
    with pytest.raises(ValueError, match="budget must be a whole number >= 1"):
        EvalProtocol("x", 1, 5, 25, 0)
    store = EpisodeStore(tworoom_data)
    for episodes in ([-1], [], [0.5], [store.num_episodes]):
        with pytest.raises(ValueError, match="episode indices"):
            sample_pairs(store, get_protocol("paper-v3"), episodes=episodes)
    with pytest.raises(ValueError, match="unknown env 'TwoRoom'"):
        make_baseline("expert", "TwoRoom")


# ------------------------------------------------------------------------------------------ baselines
def test_random_baseline_draws_seeded_uniform_actions_again_after_every_reset():
    """Call by call the actions are default_rng(seed).uniform(-1, 1, (N, A)); another seed gives
    others, and reset starts the same stream again."""
    env = envs.make_batch("tworoom", 3, resolution=RES, seed=0)
    obs = env.reset()
    policy = make_baseline("random", "tworoom", seed=7)
    for _ in range(2):  # the second pass after a reset repeats the first
        policy.reset(env)
        rng = np.random.default_rng(7)
        for _ in range(4):
            want = rng.uniform(-1.0, 1.0, (3, 2)).astype(np.float32)
            np.testing.assert_array_equal(policy.act(env, obs), want)
    other = make_baseline("random", "tworoom", seed=8)
    other.reset(env)
    policy.reset(env)
    assert not np.array_equal(other.act(env, obs), policy.act(env, obs))


def test_noise_free_expert_baselines_do_not_depend_on_their_seed():
    env = envs.make_batch("tworoom", 4, resolution=RES, seed=0)
    obs = env.reset(seed=5)
    experts = [make_baseline("expert", "tworoom", seed=s) for s in (0, 1)]
    for e in experts:
        e.reset(env)
    for _ in range(5):
        a, b = (e.act(env, obs) for e in experts)
        np.testing.assert_array_equal(a, b)
        obs = env.step(a)


def test_push_t_expert_pushes_toward_the_env_goal_and_stops_there():
    """Its actions are the noiseless PusherPolicy's with use_env_goal=True (not its own random goals);
    with the block at the env's goal it holds still."""
    from envs.policies.push_t import PusherPolicy

    env = envs.make_batch("pusht", 3, resolution=16, seed=0)
    env.reset(seed=1)
    starts = env.get_state()
    env.reset(seed=2)
    goals = env.get_state()
    obs = env.reset_to(starts, goals)
    expert = make_baseline("expert", "pusht", seed=0)
    expert.reset(env)
    reference = PusherPolicy(env, noise=0.0, seed=123, use_env_goal=True)
    for _ in range(5):
        a = expert.act(env, obs)
        np.testing.assert_array_equal(a, reference.act(env))
        obs = env.step(a)
    obs = env.reset_to(goals, goals)
    expert.reset(env)
    np.testing.assert_array_equal(expert.act(env, obs), np.zeros((3, 2), np.float32))


def test_replay_baseline_holds_still_once_the_recording_ends():
    from leworld.evaluation.baselines import ReplayBaseline

    actions = np.array([[[0.5, -0.5], [1.0, 0.25]], [[-1.0, 0.0], [0.75, 0.75]]], np.float32)  # (N=2, K=2, A=2)
    env = SimpleNamespace(num_envs=2, action_dim=2)
    replay = ReplayBaseline(actions)
    replay.reset(env)
    np.testing.assert_array_equal(replay.act(env, None), actions[:, 0])
    np.testing.assert_array_equal(replay.act(env, None), actions[:, 1])
    for _ in range(2):
        np.testing.assert_array_equal(replay.act(env, None), np.zeros((2, 2), np.float32))


# ------------------------------------------------------- summaries: the interval at 0 and n successes
def test_wilson_interval_stays_in_the_unit_interval_and_is_uninformative_without_episodes():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for n in range(1, 200):  # the interval holds the observed rate, 0 and 1 included, whatever the rounding
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0 and lo < hi
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0


# ---------------------------------------------- protocols: the presets never change under their names
def test_protocol_presets_keep_their_published_definitions():
    """A protocol name must always mean the same definition: results are compared by name. These
    literals are the spec (LEWM.md section 6: paper-v3 is 50 episodes, goal 25 steps ahead, budget 50;
    v1 Two-Room goal 100 ahead, budget 150). Changing a definition needs a new version name, not an
    edit of this test."""
    want = {
        "paper-v3": {"name": "paper-v3", "version": 1, "num_episodes": 50, "goal_offset": 25, "budget": 50,
                     "split": "val", "description": "LeWM paper v3: goal 25 steps ahead in a validation episode, "
                                                    "50-step budget", "dataset": None, "env": None},
        "paper-v1-tworoom": {"name": "paper-v1-tworoom", "version": 1, "num_episodes": 50, "goal_offset": 100,
                             "budget": 150, "split": "val",
                             "description": "LeWM paper v1 for Two-Room: goal 100 steps ahead, 150-step budget",
                             "dataset": None, "env": "tworoom"},
        "far-tworoom-v1": {"name": "far-tworoom-v1", "version": 1, "num_episodes": 50, "goal_offset": 25,
                           "budget": 50, "split": "all",
                           "description": "held-out low-noise (0.5) expert episodes toward the other room: goal 25 "
                                          "steps ahead (~80 px, over half across the wall), 50-step budget",
                           "dataset": {"env": "tworoom", "episodes": 200, "steps": 50, "policy": "expert",
                                       "noise": 0.5, "seed": 1_000_003,
                                       "env_kwargs": {"target_mode": "other_room"}},
                           "env": "tworoom"},
    }
    from leworld.evaluation import PROTOCOLS

    assert sorted(PROTOCOLS) == sorted(want)
    for name, definition in want.items():
        assert get_protocol(name).to_dict() == definition, name


# ------------------------------------------------------------------------------------------ plan.py rows
class _StubPlanner(MPCPolicy):
    """An MPCPolicy by type only: fixed planning times, and full speed right in env 1 (none elsewhere)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def reset(self, env):
        self.plan_seconds, self.plans = list(self.seconds), env.num_envs * len(self.seconds)

    def act(self, env, obs):
        return np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], np.float32)


def _three_hand_made_pairs():
    """Two-Room pairs (agent xy, target xy) in the left room: solved at the start, 30 px to the right
    of the agent, 80 px below it."""
    from leworld.evaluation import Pairs

    start = np.array([[50.0, 50.0, 0, 0], [40.0, 120.0, 0, 0], [60.0, 60.0, 0, 0]])
    goal = np.array([[50.0, 50.0, 0, 0], [70.0, 120.0, 0, 0], [60.0, 140.0, 0, 0]])
    idx = np.arange(3)
    return Pairs(idx, idx, idx + 25, start, goal)


def test_plan_rows_count_already_solved_starts_and_median_errors_per_episode():
    """Episode 0 starts solved, episode 1 reaches its goal at step 3 (5 px a step, radius 16), episode 2
    never moves: one already-successful start, two successes, medians over the episodes' own errors."""
    plan_script = load_plan_script()
    env = envs.make_batch("tworoom", 3, resolution=RES, seed=0)
    row, _ = plan_script.run_policy("stub", _StubPlanner([1.0, 2.0, 10.0]), env, _three_hand_made_pairs(), 10,
                                    False, False)
    episodes = row["per_episode"]
    assert [e["already"] for e in episodes] == [True, False, False]
    assert [e["success"] for e in episodes] == [True, True, False]
    assert [e["first_success_step"] for e in episodes] == [0, 3, -1]  # (30 - 15) px < 16 after 3 steps
    assert row["already_successful"] == sum(e["already"] for e in episodes) == 1
    rest = row["excluding_already"]
    assert row["successes"] == 2 and (rest["episodes"], rest["successes"]) == (2, 1)
    final = [e["final_errors"]["agent_px"] for e in episodes]
    assert final == pytest.approx([0.0, 20.0, 80.0], abs=1e-3)  # 50 px moved, 20 past the goal
    assert row["median_final_errors"]["agent_px"] == pytest.approx(np.median(final), abs=1e-3)
    assert row["median_min_errors"]["agent_px"] == pytest.approx(
        np.median([e["min_errors"]["agent_px"] for e in episodes]), abs=1e-3)


def test_plan_rows_time_a_plan_as_a_call_over_the_envs_it_planned():
    """An MPC call plans the whole batch of 3: calls of 1, 2 and 10 s are plans of 1/3, 2/3 and 10/3 s
    (mean 13/9 s, median 2/3 s). An oracle call plans only the rows not yet solved (here 3, 2, 1):
    13 s over 6 plans, per-plan times 1/3, 1 and 10 s (median 1 s)."""
    from leworld.evaluation.oracle import SimulatorOracle

    plan_script = load_plan_script()
    env = envs.make_batch("tworoom", 3, resolution=RES, seed=0)
    pairs = _three_hand_made_pairs()
    row, _ = plan_script.run_policy("stub", _StubPlanner([1.0, 2.0, 10.0]), env, pairs, 2, False, False)
    p = row["planning"]
    assert p["calls"] == 3 and p["plans"] == 9 and p["batch"] == 3
    assert p["call_ms_mean"] == pytest.approx(13000 / 3)
    assert p["ms_per_plan_mean"] == pytest.approx(p["call_ms_mean"] / 3) == pytest.approx(13000 / 9)
    assert p["ms_per_plan_median"] == pytest.approx(2000 / 3)

    class StubOracle(SimulatorOracle):
        def __init__(self):
            pass

        def reset(self, env):
            self.plan_seconds, self.plan_rows, self.plans = [1.0, 2.0, 10.0], [3, 2, 1], 6

        def act(self, env, obs):
            return np.zeros((env.num_envs, 2), np.float32)

    row, _ = plan_script.run_policy("oracle", StubOracle(), env, pairs, 2, False, False)
    p = row["planning"]
    assert p["calls"] == 3 and p["plans"] == 6 and p["call_ms_mean"] == pytest.approx(13000 / 3)
    assert p["ms_per_plan_mean"] == pytest.approx(p["call_ms_mean"] * 3 / 6) == pytest.approx(13000 / 6)
    assert p["ms_per_plan_median"] == pytest.approx(1000.0)


def test_plan_oracle_without_search_options_records_its_documented_defaults(tmp_path, monkeypatch):
    """--policy oracle alone: CEM of 100 samples, 10 elites, 5 iterations (its --help), horizon 5."""
    plan_script = load_plan_script()
    monkeypatch.setattr(plan_script, "make_env", lambda *a, **k: None)
    monkeypatch.setattr(plan_script, "run_policy", lambda *a, **k: ({}, None))
    args = plan_script.build_parser().parse_args(["--policy", "oracle", "--env", "pusht", "--no-progress"])
    protocol = get_protocol("paper-v3")
    _, settings, _ = plan_script.run_one("oracle", args, None, None, "pusht", protocol, None, torch.device("cpu"),
                                         tmp_path / "r.json", None)
    want = {"num_samples": 100, "topk": 10, "iterations": 5, "init_std": 1.0, "horizon": 5, "frameskip": 5,
            "deadline": None, "seed": 0}
    assert {k: settings[k] for k in want} == want


def test_plan_random_baseline_follows_the_seed_option(tmp_path, tworoom_data):
    """--seed 3 makes the random row that of make_baseline("random", seed=3) on the same pairs (not seed 0's)."""
    plan_script = load_plan_script()
    store = EpisodeStore(tworoom_data)
    protocol = get_protocol("paper-v3").replace(num_episodes=4)
    pairs = sample_pairs(store, protocol, seed=3, val_fraction=0.1, split_seed=0)
    args = plan_script.build_parser().parse_args(["--policy", "straight", "--env", "tworoom", "--seed", "3",
                                                  "--no-progress"])
    row, settings, _ = plan_script.run_one("random", args, None, store, "tworoom", protocol, pairs,
                                           torch.device("cpu"), tmp_path / "r.json", None)
    assert settings is None and row["policy"] == "random"
    final = {}
    for seed in (3, 0):
        env = plan_script.make_env(store, "tworoom", 4)
        res = run_episodes(env, make_baseline("random", "tworoom", seed=seed), pairs, protocol.budget, progress=False)
        final[seed] = np.round(res.final_errors["agent_px"], 3)
    got = np.array([e["final_errors"]["agent_px"] for e in row["per_episode"]])
    np.testing.assert_array_equal(got, final[3])
    assert not np.array_equal(final[3], final[0])
