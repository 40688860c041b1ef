"""Two-Room: gymnasium compliance, determinism, wall collisions, rendering, perturbations, policies."""
from __future__ import annotations

import re

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.policies import make_policy
from envs.two_room import HIGH, LOW, WALL, TwoRoomBatch, TwoRoomEnv

MID = 0.5 * (WALL[0] + WALL[1])  # x = 112


def test_check_env_and_gym_make():
    env = gym.make("leworld/TwoRoom-v0", resolution=64)
    check_env(env.unwrapped)
    obs, info = env.reset(seed=0)
    assert obs["pixels"].shape == (64, 64, 3) and obs["pixels"].dtype == np.uint8
    assert obs["proprio"].dtype == np.float32 and set(info) == {"agent_pos", "target_pos", "success"}
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert reward == float(info["success"]) and not terminated and not truncated
    assert env.render().shape == (64, 64, 3)
    obs, info = env.reset(options={"state": np.array([60.0, 60.0, 70.0, 60.0])})
    assert info["success"] and np.allclose(obs["proprio"], [60, 60])
    for _ in range(20):
        env.reset(options={"target_mode": "other_room"})
        state = env.unwrapped.get_state()
        assert (state[0] < MID) != (state[2] < MID)
    base = env.unwrapped  # the perturbations and the goal image are on the gym view too
    base.set_state([150.0, 150.0, 40.0, 150.0])
    base.set_colour((0, 255, 0))
    i, j = int(150 * 64 / 224), int(40 * 64 / 224)
    assert env.render()[i, i, 1] > 200 and env.render()[i, i, 0] < 60
    assert base.goal_pixels()[i, j, 1] > 200 and base.goal_pixels()[i, i, 1] == 255


def _rollout(seed, steps=20):
    env = TwoRoomBatch(num_envs=8, resolution=32, seed=seed)
    obs = [env.reset()]
    actions = np.random.default_rng(seed).uniform(-1.5, 1.5, (steps, 8, 2))
    states = [env.get_state()]
    for a in actions:
        obs.append(env.step(a))
        states.append(env.get_state())
    return np.stack([o["pixels"] for o in obs]), np.stack(states)


def test_same_seed_same_trajectory():
    pixels_a, states_a = _rollout(3)
    pixels_b, states_b = _rollout(3)
    np.testing.assert_array_equal(pixels_a, pixels_b)
    np.testing.assert_array_equal(states_a, states_b)
    assert not np.array_equal(_rollout(4)[1][0], states_a[0])
    env = TwoRoomBatch(num_envs=5, resolution=32)
    first = env.reset(seed=7)["pixels"]
    env.reset()
    np.testing.assert_array_equal(env.reset(seed=7)["pixels"], first)


def _starts(rng, n, lo, hi):
    """Starts in the rooms, on the wall faces, in the doors and right next to the door edges."""
    eps = rng.choice([0.0, 1e-9, 0.01, 0.5, 2.0, 4.9], n)
    face = np.where(rng.random(n) < 0.5, WALL[0] - eps, WALL[1] + eps)
    r = rng.random(n)
    x = np.select([r < 0.5, r < 0.7], [face, rng.uniform(WALL[0], WALL[1], n)], rng.uniform(LOW, HIGH, n))
    y = rng.choice(np.concatenate([lo, hi]), n) + rng.choice([-1, 1], n) * eps
    y = np.where(rng.random(n) < 0.3, rng.uniform(LOW, HIGH, n), y)
    # Agents inside the slab must be inside a door: move them onto a door's edge or into it.
    k = rng.integers(0, len(lo), n)
    in_slab = (x > WALL[0]) & (x < WALL[1])
    y = np.where(in_slab, np.clip(y, lo[k], hi[k]), y)
    return np.clip(np.stack([x, y], 1), LOW, HIGH)


def _actions(rng, n):
    """Random moves, moves along the wall, straight into it and diagonals into the door edges."""
    kind = rng.integers(0, 4, n)
    a = rng.uniform(-1, 1, (n, 2))
    along = np.stack([rng.uniform(-0.05, 0.05, n), rng.choice([-1.0, 1.0], n)], 1)
    straight = np.stack([rng.choice([-1.0, 1.0], n), rng.uniform(-0.02, 0.02, n)], 1)
    diagonal = rng.choice([-1.0, 1.0], (n, 2)) * rng.uniform(0.7, 1.3, (n, 1))
    return np.select([kind[:, None] == i for i in range(4)], [a, along, straight, diagonal])


@pytest.mark.parametrize("doors,speed", [(((49.0, 14.0),), 5.0), (((40.0, 8.0), (170.0, 10.0)), 5.0),
                                         (((120.0, 3.0),), 3.0), (((120.0, 3.0),), 12.0)])
def test_wall_is_never_crossed_outside_a_door(doors, speed):
    rng = np.random.default_rng(0)
    env = TwoRoomBatch(num_envs=256, resolution=8, doors=doors, speed=speed)
    lo, hi = env.door_lo, env.door_hi
    crossings = 0
    for episode in range(6):
        start = _starts(rng, 256, lo, hi)
        env.set_state(np.concatenate([start, start], 1))
        for t in range(40):
            old = env.agent_pos
            env.step(_actions(rng, 256))
            new = env.agent_pos
            assert ((new >= LOW) & (new <= HIGH)).all()
            # Never inside the wall slab outside a door.
            in_slab = (new[:, 0] > WALL[0]) & (new[:, 0] < WALL[1])
            in_door = ((new[:, 1, None] >= lo) & (new[:, 1, None] <= hi)).any(1)
            assert not (in_slab & ~in_door).any(), new[in_slab & ~in_door]
            crossed = (old[:, 0] - MID) * (new[:, 0] - MID) < 0
            crossings += crossed.sum()
            # Far from every door (further than one step), nobody changes side.
            far = (np.abs(old[:, 1, None] - env.doors[:, 0]) > env.doors[:, 1] + speed * 1.5).all(1)
            assert not (crossed & far).any(), old[crossed & far]
            if speed > 5.0:
                continue  # several sub-steps per step: the path from old to new is not straight
            # A change of side crosses x = 112 at a y inside a door.
            frac = (MID - old[crossed, 0]) / (new[crossed, 0] - old[crossed, 0])
            y = old[crossed, 1] + frac * (new[crossed, 1] - old[crossed, 1])
            ok = ((y[:, None] >= lo - 1e-9) & (y[:, None] <= hi + 1e-9)).any(1)
            assert ok.all(), (old[crossed][~ok], new[crossed][~ok])
    assert crossings > 50  # the property was exercised, not vacuous


def test_moves_into_the_wall_stop_at_the_face_and_slide():
    env = TwoRoomBatch(num_envs=3, resolution=32)
    env.set_state([[100.0, 150.0, 20, 20], [121.0, 150.0, 20, 20], [104.0, 100.0, 20, 20]])
    env.step([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    env.step([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(env.agent_pos, [[107.0, 150.0], [117.0, 150.0], [107.0, 110.0]])
    env.set_state([[110.0, 36.0, 20, 20], [104.0, 40.0, 20, 20], [112.0, 60.0, 20, 20]])
    env.step([[0.0, -1.0], [1.0, 0.0], [1.0, 1.0]])  # slide on the door edge / enter / slide
    np.testing.assert_allclose(env.agent_pos, [[110.0, 35.0], [109.0, 40.0], [117.0, 63.0]])


def test_border_clamping():
    env = TwoRoomBatch(num_envs=2, resolution=32)
    env.set_state([[20.0, 20.0, 50, 50], [200.0, 205.0, 50, 50]])
    for _ in range(5):
        env.step([[-1.0, -1.0], [3.0, 3.0]])  # out-of-range actions are clipped to 1
    np.testing.assert_array_equal(env.agent_pos, [[LOW, LOW], [HIGH, HIGH]])
    assert (env.background[0, 0] == 255).all() and (env.background[1, 1] == 0).all()  # ring at 10-14 px


def test_success_radius():
    env = TwoRoomBatch(num_envs=4, resolution=32)
    env.set_state([[50, 50, 50 + 15.9, 50], [50, 50, 50 + 16.1, 50], [50, 50, 50, 50],
                   [150, 150, 150 + 11.4, 150 + 11.4]])  # 16.12 px away
    np.testing.assert_array_equal(env.success(), [True, False, True, False])


def _centroid(frames, background):
    """Dot centroid (x, y) in pixel coordinates from how much the green channel dropped on white."""
    white = background[..., 1] == 255
    w = np.where(white, 255.0 - frames[..., 1], 0.0)  # (N, R, R)
    rows, cols = np.indices(w.shape[1:])
    total = w.sum((1, 2))
    return np.stack([(w * cols).sum((1, 2)) / total, (w * rows).sum((1, 2)) / total], 1)


def _blended_frame(env, x, y, colour):
    """Full-frame float64 blend of the dot over the background, before rounding: an independent
    reference for the windowed renderer."""
    r = env.resolution
    u = (np.arange(r) + 0.5) * 224 / r
    w = np.exp(-((u[None, :] - x) ** 2 + (u[:, None] - y) ** 2) / (2 * env.agent_std**2))[..., None]
    bg = env.background.astype(np.float64)
    return bg + w * (np.asarray(colour, float) - bg)


def _brute_force_frame(env, x, y, colour):
    """The reference frame, rounded to nearest."""
    return np.floor(_blended_frame(env, x, y, colour) + 0.5)


def _near_rounding_tie(env, x, y, colour, tol=1e-3):
    """Where the exact blended value lies within `tol` of a .5, float32 may round either way."""
    value = _blended_frame(env, x, y, colour)
    return np.abs(value - np.floor(value) - 0.5) < tol


@pytest.mark.parametrize("resolution", [64, 96, 224])
def test_render_shape_and_dot_position(resolution):
    env = TwoRoomBatch(num_envs=3, resolution=resolution)
    pos = np.array([[50.0, 100.0], [160.3, 170.7], [80.2, 60.9]])
    env.set_state(np.concatenate([pos, pos], 1))
    frames = env.render()
    assert frames.shape == (3, resolution, resolution, 3) and frames.dtype == np.uint8
    scale = resolution / 224
    np.testing.assert_allclose(_centroid(frames, env.background), pos * scale - 0.5, atol=0.05)
    for i, (x, y) in enumerate([(50.0, 100.0), (112.0, 49.0), (16.0, 208.0)]):  # incl. door, corner
        env.set_state(np.tile([x, y, x, y], (3, 1)))
        diff = np.abs(env.render()[0].astype(float) - _brute_force_frame(env, x, y, (255, 0, 0)))
        tie = _near_rounding_tie(env, x, y, (255, 0, 0))
        assert diff.max() <= 1.0 and (diff[~tie] == 0).all()  # rounded to nearest, as the reference
    assert (frames[:, :, int(112 * scale)] == 0).all(-1).any()  # the wall is drawn black


def test_teleport_and_colour_change_show_in_pixels():
    env = TwoRoomBatch(num_envs=2, resolution=64)
    state = np.array([[40.0, 150.0, 180.0, 40.0], [170.0, 120.0, 60.0, 60.0]])
    env.set_state(state)
    np.testing.assert_array_equal(env.get_state(), state)  # exact round trip
    i, j = (state[0, :2] * 64 / 224).astype(int)
    before = env.render()
    assert before[0, j, i, 0] > 200 and before[0, j, i, 2] < 60  # red at the agent
    env.set_colour((0, 0, 255), index=0)
    after = env.render()
    assert after[0, j, i, 2] > 200 and after[0, j, i, 0] < 60  # now blue
    np.testing.assert_array_equal(after[1], before[1])  # the other env is untouched
    env.set_state([[150.0, 190.0, 180.0, 40.0], state[1]])
    np.testing.assert_allclose(_centroid(env.render(), env.background)[0], [150 * 64 / 224 - 0.5,
                                                                            190 * 64 / 224 - 0.5], atol=0.05)
    goal = env.goal_pixels()
    env.set_state(np.concatenate([env.target_pos, env.target_pos], 1))
    np.testing.assert_array_equal(goal, env.render())
    env.reset()
    assert (env._colour == [255, 0, 0]).all()  # reset restores the colour


def test_bad_inputs_fail_loudly():
    env = TwoRoomBatch(num_envs=2, resolution=32)
    with pytest.raises(ValueError, match="inside the wall"):
        env.set_state([[112.0, 150.0, 50, 50], [50, 50, 50, 50]])
    with pytest.raises(ValueError, match="finite"):
        env.step([[np.nan, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="doors"):
        TwoRoomBatch(num_envs=1, doors=((50.0, 20.0), (60.0, 5.0)))
    with pytest.raises(ValueError, match="target_mode"):
        TwoRoomBatch(num_envs=1, target_mode="elsewhere")
    with pytest.raises(ValueError, match="colour"):
        env.set_colour((300, 0, 0))
    with pytest.raises(ValueError, match="whole numbers"):  # a dataset records integers: a rebuilt env would differ
        TwoRoomBatch(num_envs=1, colour=(127.5, 0, 0))
    assert TwoRoomBatch(num_envs=1, colour=(127, 0, 0)).params()["colour"] == [127, 0, 0]


def _crosses_at(doors, y):
    env = TwoRoomBatch(num_envs=len(y), resolution=8, doors=doors)
    env.set_state(np.stack([np.full(len(y), 95.0), y, np.full(len(y), 50.0), y], 1))
    for _ in range(10):
        env.step(np.tile([1.0, 0.0], (len(y), 1)))
    return env.agent_pos[:, 0] > WALL[1]


def test_doors_are_configurable():
    y = np.array([49.0, 100.0, 150.0, 40.0, 170.0, 176.0])
    np.testing.assert_array_equal(_crosses_at(((49.0, 14.0),), y), [1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(_crosses_at(((150.0, 10.0),), y), [0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(_crosses_at(((40.0, 8.0), (170.0, 10.0)), y), [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(_crosses_at((), y), [0] * 6)
    frame = TwoRoomBatch(num_envs=1, resolution=224, doors=((150.0, 10.0),)).background
    assert (frame[150, 112] == 255).all() and (frame[49, 112] == 0).all()


def _run_expert(noise, target_mode, n=200, steps=150, seed=0, doors=((49.0, 14.0),)):
    env = envs.make_batch("tworoom", num_envs=n, resolution=8, target_mode=target_mode, doors=doors)
    env.reset(seed=seed)
    start_dist = np.linalg.norm(env.agent_pos - env.target_pos, axis=1)
    policy = make_policy("tworoom", "expert", env, noise=noise, seed=seed)
    policy.reset(env)
    reached = np.zeros(n, bool)
    for _ in range(steps):
        action = policy.act(env)
        assert action.shape == (n, 2) and action.dtype == np.float32 and np.abs(action).max() <= 1
        env.step(action)
        reached |= env.success()
    return reached, start_dist, np.linalg.norm(env.agent_pos - env.target_pos, axis=1)


@pytest.mark.parametrize("target_mode,doors", [("other_room", ((49.0, 14.0),)), ("any", ((49.0, 14.0),)),
                                                ("other_room", ((40.0, 6.0), (170.0, 10.0))),
                                                # doors narrower than a step (5 px): 2% and 80% reached
                                                # when the expert stepped past the waypoint at the door
                                                ("other_room", ((120.0, 0.5),)), ("other_room", ((120.0, 2.0),))])
def test_noiseless_expert_reaches_the_target(target_mode, doors):
    reached, _, _ = _run_expert(0.0, target_mode, doors=doors)
    assert reached.mean() >= 0.95


@pytest.mark.parametrize("key", ["speed", "agent_std", "success_radius"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_speed_spread_and_success_radius_must_be_positive_and_finite(key, value):
    with pytest.raises(ValueError, match=re.escape(f"must be positive finite numbers, got {{'{key}': {value}}}")):
        envs.make_batch("tworoom", num_envs=1, resolution=8, **{key: value})


def test_noisy_expert_makes_progress_and_beats_random():
    reached, start, end = _run_expert(2.0, "other_room", steps=150)
    assert np.median(end) < 0.5 * np.median(start) and reached.mean() > 0.6
    env = envs.make_batch("tworoom", num_envs=200, resolution=8, target_mode="other_room")
    env.reset(seed=0)
    random = make_policy("tworoom", "random", env, seed=0)
    random.reset(env)
    hits = np.zeros(200, bool)
    for _ in range(150):
        action = random.act(env)
        assert action.dtype == np.float32 and action.min() >= -1 and action.max() <= 1
        env.step(action)
        hits |= env.success()
    assert reached.mean() > hits.mean() + 0.3


def test_policies_accept_the_gym_view_and_reject_unknown_names():
    env = TwoRoomEnv(resolution=32)
    env.reset(seed=0)
    assert make_policy("tworoom", "expert", env, noise=0.0).act(env).shape == (1, 2)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("tworoom", "teleport", env)


def test_actions_are_clipped_to_one_step_of_speed():
    env = TwoRoomBatch(num_envs=3, resolution=32)
    env.set_state([[50.0, 100.0, 20, 20], [50.0, 100.0, 20, 20], [160.0, 100.0, 200, 200]])
    env.step([[10.0, 0.0], [-3.0, 0.5], [0.4, -7.0]])
    np.testing.assert_allclose(env.agent_pos, [[55.0, 100.0], [45.0, 102.5], [162.0, 95.0]])


def test_reset_seed_chooses_the_episodes():
    """reset(seed=s) draws what a fresh env built with seed s draws, and another seed draws others."""
    env = TwoRoomBatch(num_envs=6, resolution=32, seed=0)
    env.reset()
    env.reset(seed=1)
    one = env.get_state().copy()  # agents and targets
    fresh = TwoRoomBatch(num_envs=6, resolution=32, seed=1)
    fresh.reset()
    np.testing.assert_array_equal(fresh.get_state(), one)
    env.reset(seed=2)
    assert not np.array_equal(env.get_state(), one)


@pytest.mark.parametrize("noise", [0.3, None])  # None: the expert's default, 2.0
def test_expert_noise_is_gaussian_with_the_given_std_before_clipping(noise):
    """Targets straight to the right: the noiseless action is (1, 0), so the y action is the noise
    alone, clipped to [-1, 1]; its variance is that of a clipped N(0, noise^2), in closed form."""
    import math

    n = 4000
    env = TwoRoomBatch(num_envs=n, resolution=8)
    env.set_state(np.tile([[40.0, 100.0, 90.0, 100.0]], (n, 1)))
    kwargs = {} if noise is None else {"noise": noise}
    y = make_policy("tworoom", "expert", env, seed=2, **kwargs).act(env)[:, 1].astype(np.float64)
    sigma = 2.0 if noise is None else noise
    c = 1.0 / sigma  # the clip in units of sigma
    phi, inside = math.exp(-c * c / 2) / math.sqrt(2 * math.pi), math.erf(c / math.sqrt(2))
    var = sigma**2 * (inside - 2 * c * phi) + (1 - inside)  # E[clip(sigma z, -1, 1)^2]
    assert y.var() == pytest.approx(var, rel=0.06) and abs(y.mean()) < 4 * math.sqrt(var / n)
    from envs.policies.two_room import ExpertPolicy

    assert ExpertPolicy().noise == 2.0  # the class's own default is make_policy's


def test_policies_with_another_seed_act_otherwise():
    env = TwoRoomBatch(num_envs=8, resolution=8)
    env.reset(seed=0)
    for name in ("expert", "random"):
        a, b, c = (make_policy("tworoom", name, env, seed=s).act(env) for s in (1, 1, 2))
        assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_success_needs_strictly_less_than_16_px():
    """Spec: success when the agent is within 16 px of the target, strictly: 16 px exactly is a miss."""
    env = TwoRoomBatch(num_envs=4, resolution=8)
    env.set_state([[50.0, 50.0, 66.0, 50.0], [50.0, 50.0, 50.0, 34.0], [150.0, 100.0, 150.0 - 15.999, 100.0],
                   [150.0, 100.0, 150.0, 100.0 + 15.999]])
    d = np.hypot(*(env.target_pos - env.agent_pos).T)
    assert d[0] == 16.0 and d[1] == 16.0  # exactly on the threshold (whole numbers are exact in float64)
    np.testing.assert_array_equal(env.success(), [False, False, True, True])


def test_reset_samples_starts_and_targets_uniformly_over_the_free_space_of_each_room():
    """10^4 resets: every start and target lies inside the border [14, 210]^2 and outside the wall
    slab 107 < x < 117 (resets never use the door); room 0 spans x in [14, 107], room 1 x in [117, 210]."""
    n = 10_000
    env = TwoRoomBatch(num_envs=n, resolution=8, seed=1)
    env.reset()
    points = np.concatenate([env.agent_pos, env.target_pos])  # (2n, 2)
    x, y = points[:, 0], points[:, 1]
    assert ((points >= 14.0) & (points <= 210.0)).all()
    assert not ((x > 107.0) & (x < 117.0)).any(), x[(x > 107.0) & (x < 117.0)]
    left, right = x[x <= 107.0], x[x >= 117.0]
    # ~10^4 uniform points per room over 93 px: the gap at either end exceeds 0.2 px with prob. e^-20
    for xs, lo, hi in ((left, 14.0, 107.0), (right, 117.0, 210.0)):
        assert len(xs) > 9000 and xs.min() - lo < 0.2 and hi - xs.max() < 0.2
        assert abs(xs.mean() - (lo + hi) / 2) < 5 * 93 / np.sqrt(12 * len(xs))  # uniform: mean at the centre
    assert y.min() - 14.0 < 0.2 and 210.0 - y.max() < 0.2


def test_target_mode_any_puts_half_the_targets_in_the_other_room():
    """"any": the target's room is a fair coin independent of the start's room."""
    n = 10_000
    env = TwoRoomBatch(num_envs=n, resolution=8, seed=2, target_mode="any")
    env.reset()
    start_left, target_left = env.agent_pos[:, 0] < MID, env.target_pos[:, 0] < MID
    tol = 5 * 0.5 / np.sqrt(n)  # 5 binomial standard deviations
    assert abs((start_left != target_left).mean() - 0.5) < tol
    for side in (start_left, ~start_left):  # the same share from either room
        assert abs((target_left[side] != start_left[side]).mean() - 0.5) < 5 * 0.5 / np.sqrt(side.sum())


def _free(p, lo, hi):
    """Inside the border and not inside the wall slab outside a door (closed intervals), per point."""
    in_box = ((p >= LOW) & (p <= HIGH)).all(1)
    in_slab = (p[:, 0] > WALL[0]) & (p[:, 0] < WALL[1])
    in_door = ((p[:, 1, None] >= lo) & (p[:, 1, None] <= hi)).any(1)
    return in_box & (~in_slab | in_door)


def _continuous_move(p, move, lo, hi, micro=1000):
    """Reference: the move in `micro` tiny straight pieces; a piece that would enter the wall keeps
    whichever axis part stays free (slides along faces and door edges), else stops."""
    d = move / micro
    p = p.copy()
    for _ in range(micro):
        q = np.clip(p + d, LOW, HIGH)
        qx, qy = np.stack([q[:, 0], p[:, 1]], 1), np.stack([p[:, 0], q[:, 1]], 1)
        p = np.where(_free(q, lo, hi)[:, None], q, np.where(_free(qx, lo, hi)[:, None], qx,
                                                            np.where(_free(qy, lo, hi)[:, None], qy, p)))
    return p


@pytest.mark.parametrize("speed", [12.0, 20.0])
def test_fast_moves_near_the_door_follow_the_continuous_slide_within_one_sub_step(speed):
    """A step faster than half the wall thickness is split into sub-steps of at most 5 px per axis
    (half the 10 px wall, under half the 28 px door): sliding along a door edge is then lost for at
    most one sub-step, so the end point lies within speed / ceil(speed / 5) of the continuous slide."""
    import math

    rng = np.random.default_rng(0)
    lo, hi = np.array([35.0]), np.array([63.0])
    p = np.stack([rng.uniform(WALL[0] - speed, WALL[1] + speed, 4000), rng.uniform(lo[0] - speed, hi[0] + speed, 4000)], 1)
    p = p[_free(p, lo, hi)][:1500]
    env = TwoRoomBatch(num_envs=len(p), resolution=8, speed=speed)
    env.set_state(np.concatenate([p, p], 1))
    a = rng.uniform(-1, 1, p.shape)
    env.step(a)
    deviation = np.abs(env.agent_pos - _continuous_move(p, a * speed, lo, hi)).max(1)
    assert deviation.max() <= speed / math.ceil(speed / 5.0) + 0.05, deviation.max()
    # the exact case worked by hand: from inside the door up-right, slide on y = 63 until x = 117
    env = TwoRoomBatch(num_envs=1, resolution=8, speed=20.0)
    env.set_state([[110.0, 60.0, 20.0, 20.0]])
    env.step([[1.0, 1.0]])  # continuous: (113, 63) after 3 px, slide to (117, 63), then 13 px free
    assert np.abs(env.agent_pos[0] - [130.0, 76.0]).max() <= 5.0


def test_leaving_the_door_exactly_through_its_edge_is_allowed():
    """Doors are closed intervals: a move out of the slab that crosses the face exactly at y = 35 or
    y = 63 (the default door's edges) goes through. Action 0.8 at speed 5 moves 4 px per axis (one
    sub-step): from x = 114 the face x = 117 is reached after 3/4 of the move, at y = py -+ 3."""
    env = TwoRoomBatch(num_envs=4, resolution=8)
    env.set_state([[114.0, 38.0, 20, 20], [114.0, 60.0, 20, 20], [110.0, 38.0, 200, 20], [110.0, 60.0, 200, 20]])
    env.step([[0.8, -0.8], [0.8, 0.8], [-0.8, -0.8], [-0.8, 0.8]])
    np.testing.assert_array_equal(env.agent_pos, [[118.0, 34.0], [118.0, 64.0], [106.0, 34.0], [106.0, 64.0]])
