"""The privileged Push-T upper bound (`plan.py --policy oracle`): its cost is the success test,
its rollouts are the env's own physics, and it reaches goals that need the block pushed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import envs
from envs.push_t_physics import is_success
from leworld.data.collect import collect
from leworld.evaluation import run_episodes
from leworld.evaluation.oracle import SimulatorOracle, SimulatorProblem, success_margin

ROOT = Path(__file__).resolve().parents[1]


def test_success_margin_is_below_one_exactly_when_the_test_passes():
    rng = np.random.default_rng(0)
    goals = rng.uniform(100, 400, (2000, 7))
    goals[:, 4] = rng.uniform(-np.pi, np.pi, 2000)
    states = goals.copy()
    states[:, :4] += rng.normal(0, 12, (2000, 4))  # around the 20 px boundary
    states[:, 4] += rng.normal(0, 0.4, 2000) + rng.choice([0, 2 * np.pi, -2 * np.pi], 2000)  # wrap-around too
    margins = np.array([success_margin(s, g) for s, g in zip(states, goals)])
    passed = is_success(states, goals)
    assert 0.2 < passed.mean() < 0.8  # both outcomes are exercised
    np.testing.assert_array_equal(margins < 1.0, passed)
    # and the margin is the larger of the two normalised errors
    pos = np.linalg.norm(states[:, :4] - goals[:, :4], axis=1) / 20.0
    ang = np.abs(np.angle(np.exp(1j * (states[:, 4] - goals[:, 4])))) / np.radians(20.0)
    np.testing.assert_allclose(margins, np.maximum(pos, ang), rtol=1e-9)


def _pushed_pairs(n: int = 4, steps: int = 12):
    """Starts with the agent beside the block, goals after `steps` steps of a steady push into it."""
    env = envs.make_batch("pusht", num_envs=n, resolution=32)
    starts = np.zeros((n, 7))
    starts[:, 2:4] = [[200, 250], [300, 220], [260, 300], [230, 200]][:n]
    starts[:, 4] = [0.0, 0.6, -0.9, 2.0][:n]
    starts[:, 0] = starts[:, 2] - 90.0  # left of the T, level with its centre
    starts[:, 1] = starts[:, 3] + 10.0
    env.set_state(starts)
    for _ in range(steps):
        env.step(np.tile([[0.7, 0.05]], (n, 1)))
    return starts, env.get_state()


def test_rollout_cost_matches_stepping_the_env():
    starts, goals = _pushed_pairs(2)
    env = envs.make_batch("pusht", num_envs=2, resolution=32)
    env.reset_to(starts, goals)
    problem = SimulatorProblem(env.clone_sim, goals, horizon=2, frameskip=5)
    actions = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (2, 3, 2, 10)))
    cost = problem.cost(actions)
    assert cost.shape == (2, 3) and problem.rollouts == 6
    for s in range(3):  # brute force: a fresh env at the start, stepped with the same actions
        ref = envs.make_batch("pusht", num_envs=2, resolution=32)
        ref.reset_to(starts, goals)
        best = np.full(2, np.inf)
        for a in actions[:, s].reshape(2, 10, 2).numpy().transpose(1, 0, 2):
            ref.step(a)
            best = np.minimum(best, [success_margin(x, g) for x, g in zip(ref.get_state(), goals)])
        np.testing.assert_allclose(cost[:, s].numpy(), best, rtol=1e-12)


def test_clone_sim_copies_the_block_motion():
    env = envs.make_batch("pusht", num_envs=1, resolution=32)
    starts, _ = _pushed_pairs(1, steps=0)
    env.set_state(starts)
    for _ in range(4):
        env.step(np.array([[1.0, 0.0]]))
    src, sim = env._sims[0], env.clone_sim(0)
    assert np.hypot(*src.block.velocity) > 1.0  # the block is moving
    assert tuple(sim.block.velocity) == tuple(src.block.velocity)
    assert sim.block.angular_velocity == src.block.angular_velocity
    np.testing.assert_array_equal(sim.state(), src.state())
    assert sim is not src and sim.space is not src.space


class _Zero:
    def reset(self, env):
        pass

    def act(self, env, obs):
        return np.zeros((env.num_envs, 2), np.float32)


def test_oracle_reaches_goals_that_need_a_push_and_is_seeded():
    starts, goals = _pushed_pairs(4)
    pairs = SimpleNamespace(episode=np.arange(4), start_state=starts, goal_state=goals)
    env = envs.make_batch("pusht", num_envs=4, resolution=32)
    still = run_episodes(env, _Zero(), pairs, budget=20, progress=False)
    assert not still.success.any()  # the goals need the block moved
    runs = []
    for _ in range(2):
        oracle = SimulatorOracle(num_samples=40, topk=6, iterations=3, horizon=4, deadline=20, seed=3)
        res = run_episodes(env, oracle, pairs, budget=20, progress=False)
        runs.append((res.success.copy(), res.final_state.copy(), oracle.plans))
    assert runs[0][0].sum() >= 3, runs[0][0]
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])  # same seed, same run
    assert runs[0][2] < 4 * 4  # envs that passed the test are not planned for again


def test_oracle_plans_each_env_in_its_own_world_shortens_to_the_deadline_and_warm_starts():
    """Env 0 starts at its goal: only envs 1 and 2 are planned, each in a copy of its own world.
    With a 12-step deadline and 5-step blocks, plans hold 3, 2, then 1 blocks, each warm-started
    from the unexecuted rest of the previous plan; a reset starts over."""
    starts, goals = _pushed_pairs(3)
    goals[0] = starts[0]  # already there
    env = envs.make_batch("pusht", num_envs=3, resolution=32)
    env.reset_to(starts, goals)
    cloned, calls = [], []
    clone = env.clone_sim
    env.clone_sim = lambda i: cloned.append(i) or clone(i)
    oracle = SimulatorOracle(num_samples=8, topk=2, iterations=1, horizon=5, deadline=12, seed=3)
    plan = oracle.cem.plan
    oracle.cem.plan = lambda problem, init, g: calls.append((init.clone(), plan(problem, init, g))) or calls[-1][1]
    for _ in range(2):
        oracle.reset(env)
        cloned.clear()
        calls.clear()
        horizons = []
        for step in range(12):
            if step % 5 == 0:
                horizons.append(oracle.plan_horizon())
            env.step(oracle.act(env, None))
        assert horizons == [3, 2, 1]
        assert set(cloned) == {1, 2}  # the worlds of the envs planned for, never env 0's
        assert [init.shape[1] for init, _ in calls] == [3, 2, 1]
        assert not calls[0][0].any()  # the first plan starts from zeros, also after a reset
        for (_, before), (init, _) in zip(calls, calls[1:]):
            torch.testing.assert_close(init, before[:, 1:1 + init.shape[1]])  # the rest of the last plan
        env.reset_to(starts, goals)
    oracle.reset(env)
    oracle.act(env, None)  # a plan of 3 blocks: 2 left over
    oracle.reset(env)  # a new episode forgets them
    calls.clear()
    oracle.act(env, None)
    assert calls[0][0].shape[1] == 3 and not calls[0][0].any()


def test_oracle_seed_changes_its_plans():
    starts, goals = _pushed_pairs(2)
    actions = []
    for seed in (0, 0, 1):
        env = envs.make_batch("pusht", num_envs=2, resolution=32)
        env.reset_to(starts, goals)
        oracle = SimulatorOracle(num_samples=8, topk=2, iterations=1, horizon=2, seed=seed)
        oracle.reset(env)
        actions.append(oracle.act(env, None))
    assert np.array_equal(actions[0], actions[1]) and not np.array_equal(actions[0], actions[2])


def test_oracle_refuses_two_room():
    env = envs.make_batch("tworoom", num_envs=1, resolution=32)
    with pytest.raises(ValueError, match="--policy expert"):
        SimulatorOracle().reset(env)


def test_plan_cli_runs_the_oracle(tmp_path):
    path = tmp_path / "pusht.h5"
    collect("pusht", episodes=6, steps=40, resolution=32, policy="mix", seed=0, out=path, workers=1, progress=False)
    out = tmp_path / "oracle.json"
    proc = subprocess.run([sys.executable, str(ROOT / "plan.py"), "--policy", "oracle", "--env", "pusht",
                           "--data", str(path), "--num-episodes", "2", "--num-samples", "8", "--topk", "2",
                           "--iterations", "1", "--deadline", "--no-baselines", "--no-progress", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert [r["policy"] for r in res["results"]] == ["oracle"]
    assert res["planner"]["planner"] == "cem-simulator" and res["planner"]["num_samples"] == 8
    assert res["planner"]["deadline"] == 50 and res["results"][0]["planning"]["plans"] >= 1
    proc = subprocess.run([sys.executable, str(ROOT / "plan.py"), "--policy", "oracle", "--env", "pusht",
                           "--data", str(path), "--num-episodes", "2", "--num-samples", "8", "--topk", "2",
                           "--iterations", "1", "--horizon", "2", "--seed", "3", "--oracle-cost", "terminal",
                           "--no-baselines", "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "runs" / "plan" / "pusht-paper-v3+num_episodes=2-oracle-terminal-seed3.json").read_text())
    assert res["planner"]["horizon"] == 2 and res["planner"]["seed"] == 3 and res["seed"] == 3
    assert res["planner"]["deadline"] is None and res["policy"] == "oracle"


@pytest.mark.parametrize("env_name", ["tworoom", "pusht"])
def test_replay_of_the_recorded_actions_reaches_the_goals(tmp_path, env_name):
    """Two-Room's state is all there is, so a replay is exact; Push-T's reset puts the block at rest."""
    path = tmp_path / f"{env_name}.h5"
    policy = "expert" if env_name == "tworoom" else "mix"
    collect(env_name, episodes=20, steps=60, resolution=32, policy=policy, seed=0, out=path, workers=1, progress=False)
    out = tmp_path / "replay.json"
    proc = subprocess.run([sys.executable, str(ROOT / "plan.py"), "--policy", "replay", "--env", env_name,
                           "--data", str(path), "--no-progress", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    rows = {r["policy"]: r for r in res["results"]}
    assert list(rows) == ["replay", "random", "straight", "expert"]  # the baselines ran beside it
    if env_name == "tworoom":
        firsts = [e["first_success_step"] for e in rows["replay"]["per_episode"]]
        assert rows["replay"]["rate"] == 1.0 and max(firsts) <= 25  # reached by the goal step at the latest
    else:
        assert rows["replay"]["rate"] >= 0.8 and rows["replay"]["rate"] > rows["random"]["rate"]  # 20 pairs


def test_replay_checks_its_shapes():
    from leworld.evaluation.baselines import ReplayBaseline

    with pytest.raises(ValueError, match=r"\(N, K, A\)"):
        ReplayBaseline(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="copies"):
        ReplayBaseline(np.zeros((3, 5, 2))).reset(envs.make_batch("pusht", num_envs=2, resolution=32))


def test_terminal_cost_is_the_margin_at_the_last_step():
    starts, goals = _pushed_pairs(2)
    env = envs.make_batch("pusht", num_envs=2, resolution=32)
    env.reset_to(starts, goals)
    actions = torch.from_numpy(np.random.default_rng(2).uniform(-1, 1, (2, 3, 2, 10)))
    terminal = SimulatorProblem(env.clone_sim, goals, horizon=2, cost="terminal").cost(actions)
    lowest = SimulatorProblem(env.clone_sim, goals, horizon=2).cost(actions)
    for s in range(3):
        ref = envs.make_batch("pusht", num_envs=2, resolution=32)
        ref.reset_to(starts, goals)
        for a in actions[:, s].reshape(2, 10, 2).numpy().transpose(1, 0, 2):
            ref.step(a)
        end = [success_margin(x, g) for x, g in zip(ref.get_state(), goals)]
        np.testing.assert_allclose(terminal[:, s].numpy(), end, rtol=1e-12)
    assert (lowest <= terminal).all() and (lowest < terminal).any()


def test_render_states_draws_like_the_env():
    env = envs.make_batch("pusht", num_envs=3, resolution=32, seed=4, supersample=2)
    np.testing.assert_array_equal(env.render_states(env.get_state()), env.render())
    overlay = envs.make_batch("pusht", num_envs=3, resolution=32, seed=4, goal_overlay=True)
    np.testing.assert_array_equal(overlay.render_states(overlay.get_state(), overlay.goal), overlay.render())
    with pytest.raises(ValueError, match="pass goals"):
        overlay.render_states(overlay.get_state())


def _tiny_pusht_model():
    from leworld.model import LeWMConfig, LeWorldModel

    torch.manual_seed(0)
    cfg = LeWMConfig(encoder="cnn", image_size=32, cnn_channels=(8, 16, 16), enc_width=32, embed_dim=16,
                     proj_hidden=32, history=2, pred_depth=1, pred_heads=2, pred_head_dim=8, pred_mlp=32,
                     action_hidden=16, action_dim=2, frameskip=5)
    return LeWorldModel(cfg).eval()


@pytest.mark.parametrize("rows", [[1], [0, 1]])
@pytest.mark.parametrize("overlay", [False, True])
def test_latent_cost_is_the_models_distance_between_rendered_frames(overlay, rows):
    """The latent oracle scores a true rollout's last state by the model's embedding distance to the goal image
    (drawn as the env draws, the goal overlay included), each planned row against its own env's goal."""
    model = _tiny_pusht_model()
    starts, goals = _pushed_pairs(2)
    env = envs.make_batch("pusht", num_envs=2, resolution=32, goal_overlay=overlay)
    env.reset_to(starts, goals)
    oracle = SimulatorOracle(num_samples=4, topk=2, iterations=1, horizon=1, cost="latent", model=model)
    oracle.reset(env)
    rows = np.array(rows)  # [1]: the cost of env 1's samples only, as when env 0 has already succeeded
    problem = SimulatorProblem(lambda i: env.clone_sim(int(rows[i])), goals[rows], horizon=1, cost="latent",
                               final_cost=oracle._latent_cost(env, rows))
    actions = torch.from_numpy(np.random.default_rng(3).uniform(-1, 1, (len(rows), 3, 1, 10)))
    cost = problem.cost(actions)
    with torch.no_grad():  # brute force: step a fresh env, draw it, encode both frames
        for b, row in enumerate(rows):
            goal_frame = env.goal_pixels()[row]
            for s in range(3):
                ref = envs.make_batch("pusht", num_envs=2, resolution=32, goal_overlay=overlay)
                ref.reset_to(starts, goals)
                for a in actions[b, s].reshape(5, 2).numpy():
                    ref.step(np.stack([a, a]))
                frames = torch.from_numpy(np.stack([ref.render()[row], goal_frame])).permute(0, 3, 1, 2)[:, None]
                emb = model.encode(frames)[:, 0].double()
                np.testing.assert_allclose(cost[b, s].item(), (emb[0] - emb[1]).square().sum().item(), rtol=1e-5)
    assert cost.std() > 0  # the samples differ


def test_oracle_cost_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a model"):
        SimulatorOracle(cost="latent")
    with pytest.raises(ValueError, match="unknown oracle cost"):
        SimulatorOracle(cost="sum")
    path = tmp_path / "pusht.h5"
    collect("pusht", episodes=4, steps=40, resolution=32, policy="mix", seed=0, out=path, workers=1, progress=False)
    proc = subprocess.run([sys.executable, str(ROOT / "plan.py"), "--policy", "oracle", "--oracle-cost", "latent",
                           "--env", "pusht", "--data", str(path), "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "needs --model" in proc.stderr
    # its one validation episode of 40 steps holds 16 starts 25 steps before its end: not 50 distinct pairs
    proc = subprocess.run([sys.executable, str(ROOT / "plan.py"), "--policy", "straight", "--env", "pusht",
                           "--data", str(path), "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "error: " in proc.stderr and "only 16 distinct start/goal pairs" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_oracle_never_replans_an_env_that_passed_and_counts_every_row_it_plans():
    """Env 0 starts at its goal: it is done from step 0 and never planned again, even after it is moved
    off its goal (the protocol counts success at any step); `plans` counts the rows of every call."""
    starts, goals = _pushed_pairs(3)
    goals[0] = starts[0]
    env = envs.make_batch("pusht", num_envs=3, resolution=32)
    env.reset_to(starts, goals)
    cloned, sizes = [], []
    clone = env.clone_sim
    env.clone_sim = lambda i: cloned.append(i) or clone(i)
    oracle = SimulatorOracle(num_samples=4, topk=2, iterations=1, horizon=2, seed=0)
    plan = oracle.cem.plan
    oracle.cem.plan = lambda problem, init, g: sizes.append(problem.batch_size) or plan(problem, init, g)
    oracle.reset(env)
    env.step(oracle.act(env, None))
    away = env.get_state()[0].copy()
    away[2] += 80.0  # the block of env 0 leaves its goal
    env.set_state(away, index=0)
    assert not env.success()[0]
    for _ in range(9):
        env.step(oracle.act(env, None))
    assert sizes == [2, 2] and oracle.plan_rows == [2, 2]  # plans at steps 0 and 5, envs 1 and 2 only
    assert set(cloned) == {1, 2}
    assert oracle.plans == sum(sizes) == 4


@pytest.mark.parametrize("deadline", [13, 14, 15, 16])
def test_oracle_plan_horizon_is_the_blocks_left_to_the_deadline(deadline):
    """frameskip 3, horizon 5: the plan at step t has min(5, ceil((deadline - t) / 3)) blocks, at least one,
    for deadlines on and off a block boundary."""
    starts, _ = _pushed_pairs(1, steps=0)
    goals = starts.copy()
    goals[0, 2:5] += [150.0, 0.0, 1.5]  # far out of reach of these short runs
    env = envs.make_batch("pusht", num_envs=1, resolution=32)
    env.reset_to(starts, goals)
    oracle = SimulatorOracle(num_samples=2, topk=2, iterations=1, horizon=5, frameskip=3, deadline=deadline)
    horizons = []
    plan = oracle.cem.plan
    oracle.cem.plan = lambda problem, init, g: horizons.append(problem.horizon) or plan(problem, init, g)
    oracle.reset(env)
    for _ in range(21):
        env.step(oracle.act(env, None))
    assert horizons == [max(1, min(5, -(-(deadline - t) // 3))) for t in range(0, 21, 3)]


def test_oracle_samples_its_first_plan_with_init_std():
    """init_std is recorded and is the spread of the first plan's samples: zeros + 0.3 * the seeded
    generator's first standard-normal draw, clipped to [-1, 1]."""
    starts, goals = _pushed_pairs(2)
    env = envs.make_batch("pusht", num_envs=2, resolution=32)
    env.reset_to(starts, goals)
    oracle = SimulatorOracle(num_samples=4, topk=2, iterations=1, horizon=2, init_std=0.3, seed=7)
    assert oracle.settings()["init_std"] == 0.3
    seen = []

    class Recording:
        def __init__(self, problem):
            self.problem = problem
            self.batch_size, self.horizon, self.action_dim = problem.batch_size, problem.horizon, problem.action_dim
            self.low, self.high = problem.low, problem.high

        def cost(self, actions):
            seen.append(actions.clone())
            return self.problem.cost(actions)

    plan = oracle.cem.plan
    oracle.cem.plan = lambda problem, init, g: plan(Recording(problem), init, g)
    oracle.reset(env)
    oracle.act(env, None)
    noise = torch.randn((2, 4, 2, 10), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(seen[0], (0.3 * noise).clamp(-1, 1), rtol=0, atol=1e-12)
