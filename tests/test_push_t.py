"""Push-T: gymnasium API, determinism, physics sanity, success test, rendering and data policies.

Run: pytest tests/test_push_t.py -q
"""
from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.policies import make_policy
from envs.policies.push_t import segment_clearance
from envs.push_t import LIGHT_SLATE_GRAY, ROYAL_BLUE, PushTBatch, block_distance, block_polygon, is_success
from envs.push_t_physics import AGENT_RADIUS, T_BOXES, T_OUTLINE, WALL, WORLD_SIZE, PushTSim, wrap_angle
from envs.push_t_render import PushTRenderer

LIGHT_GREEN = (144, 238, 144)
# Written out rather than imported, so that a changed constant in envs/push_t_physics.py shows: the
# agent may sink at most 3 px into the block (MAX_OVERLAP) and the block at most 1 px into a wall (WALL_SLOP).
MOST_SUNK_INTO_BLOCK, MOST_SUNK_INTO_WALL = 3.0, 1.0


def make(num_envs=1, resolution=64, **kw) -> PushTBatch:
    return envs.make_batch("pusht", num_envs=num_envs, resolution=resolution, **kw)


def state(agent, block, angle, vel=(0.0, 0.0)) -> np.ndarray:
    return np.array([[*agent, *block, angle, *vel]], dtype=np.float64)


def pixel(frame, world_xy, resolution):
    """Colour of the pixel containing a world point (row = y)."""
    s = resolution / WORLD_SIZE
    return tuple(int(c) for c in frame[int(world_xy[1] * s), int(world_xy[0] * s)])


def block_point(pose, local):
    c, s = math.cos(pose[2]), math.sin(pose[2])
    return pose[0] + c * local[0] - s * local[1], pose[1] + s * local[0] + c * local[1]


# ------------------------------------------------------------------------------------- API
def test_check_env_and_gym_make():
    env = gym.make("leworld/PushT-v0", resolution=64)
    check_env(env.unwrapped, skip_render_check=False)
    obs, info = env.reset(seed=1)
    assert obs["pixels"].shape == (64, 64, 3) and obs["pixels"].dtype == np.uint8
    assert obs["proprio"].shape == (4,) and obs["proprio"].dtype == np.float32
    assert info["state"].shape == (7,) and isinstance(info["success"], bool)
    np.testing.assert_allclose(obs["proprio"], info["state"][[0, 1, 5, 6]], rtol=1e-6)
    obs, reward, terminated, truncated, info = env.step(np.array([0.5, -0.5], np.float32))
    assert reward == float(info["success"]) and not terminated and not truncated


def test_batch_interface_and_params():
    env = make(3, resolution=32, seed=4)
    assert (env.env_id, env.action_dim, env.proprio_dim, env.state_dim) == ("leworld/PushT-v0", 2, 4, 7)
    params = json.loads(json.dumps(env.params()))
    assert PushTBatch(**params).params() == params
    obs = env.reset(seed=1)
    assert obs["pixels"].shape == (3, 32, 32, 3) and obs["proprio"].shape == (3, 4)
    assert env.render().shape == (3, 32, 32, 3) and env.goal_pixels().shape == (3, 32, 32, 3)
    assert env.get_state().dtype == np.float64 and env.success().shape == (3,)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="finite"):
        env.step(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="part"):
        env.set_colour((1, 2, 3), part="wall")
    with pytest.raises(ValueError, match="0, 512"):
        env.set_state(np.tile(state((600, 10), (200, 200), 0.0), (3, 1)))


def test_same_seed_same_trajectory():
    actions = np.random.default_rng(0).uniform(-1, 1, size=(40, 4, 2))
    runs = []
    for seed in (7, 7, 8):
        env = make(4, seed=seed)
        env.reset()
        frames = [env.step(a)["pixels"] for a in actions]
        runs.append((env.get_state(), np.stack(frames)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert not np.allclose(runs[0][0], runs[2][0])


def test_reset_distribution():
    env = make(64, seed=3)
    env.reset()
    s = env.get_state()
    assert np.all((s[:, :2] >= 50) & (s[:, :2] <= 450)) and np.all((s[:, 2:4] >= 100) & (s[:, 2:4] <= 400))
    assert np.all((s[:, 4] >= -np.pi) & (s[:, 4] < np.pi)) and np.all(s[:, 5:] == 0)
    assert all(block_distance(a, p) > AGENT_RADIUS for a, p in zip(s[:, :2], s[:, 2:5]))  # agent not in the block
    assert not np.allclose(env.goal, s)


def test_set_state_round_trip_and_teleport_forgets_history():
    rng = np.random.default_rng(2)
    states = np.concatenate([rng.uniform(50, 450, (5, 2)), rng.uniform(100, 400, (5, 2)),
                             rng.uniform(-9, 9, (5, 1)), rng.uniform(-50, 50, (5, 2))], axis=1)
    env = make(5)
    env.set_state(states)
    got = env.get_state()
    np.testing.assert_allclose(got[:, [0, 1, 2, 3, 5, 6]], states[:, [0, 1, 2, 3, 5, 6]], atol=1e-9)
    np.testing.assert_allclose(np.cos(got[:, 4]), np.cos(states[:, 4]), atol=1e-9)  # wrapped, same angle
    assert np.all((got[:, 4] >= -np.pi) & (got[:, 4] < np.pi))
    # after a teleport what happens next depends on the state only, not on the history
    other = make(5)
    other.reset(seed=9)
    for _ in range(10):
        other.step(rng.uniform(-1, 1, (5, 2)))
    other.set_state(got)
    env.set_state(got)
    a = rng.uniform(-1, 1, (5, 2))
    np.testing.assert_array_equal(env.step(a)["pixels"], other.step(a)["pixels"])
    np.testing.assert_array_equal(env.get_state(), other.get_state())


# --------------------------------------------------------------------------------- physics
def test_agent_follows_the_pd_law():
    """Far from the block the agent obeys the spec: target = agent + 100 a, accel = 100 (target - pos)
    + 20 (0 - vel) integrated into the velocity, then the position, over 10 sub-steps of 0.01 s.
    The numbers are the spec's literals, not the module's constants, so a changed gain or step shows."""
    sim = PushTSim(state((200, 150), (400, 400), 0.0, vel=(30.0, -10.0))[0])
    pos, vel = np.array([200.0, 150.0]), np.array([30.0, -10.0])
    for a in ([0.3, 0.8], [-1.0, 0.2]):
        target = pos + 100.0 * np.array(a)
        for _ in range(10):
            vel = vel + (100.0 * (target - pos) + 20.0 * (0.0 - vel)) * 0.01
            pos = pos + vel * 0.01
        sim.step(*a)
        np.testing.assert_allclose(sim.state()[[0, 1]], pos, atol=1e-9)
        np.testing.assert_allclose(sim.state()[[5, 6]], vel, atol=1e-9)


def test_actions_are_clipped():
    env1, env2 = make(1), make(1)
    for env in (env1, env2):
        env.set_state(state((100, 100), (400, 400), 0.0))
    env1.step(np.array([[5.0, -3.0]]))
    env2.step(np.array([[1.0, -1.0]]))
    np.testing.assert_array_equal(env1.get_state(), env2.get_state())


def test_push_moves_block_in_push_direction_and_agent_stays_behind():
    env = make(1)
    env.set_state(state((100, 256), (256, 256), -np.pi / 2))  # the bar's flat face looks at the agent
    start = env.get_state()[0]
    for _ in range(6):
        env.step(np.array([[1.0, 0.0]]))
        s = env.get_state()[0]
        assert s[0] < block_polygon(s[2:5])[:, 0].min()  # agent centre behind the block's leftmost point
        assert block_distance(s[:2], s[2:5]) >= 15.0 - MOST_SUNK_INTO_BLOCK - 1e-6
    moved = s[2:5] - start[2:5]
    assert moved[0] > 100 and abs(moved[1]) < 5 and abs(moved[2]) < 0.05
    # pushing up from below the stem moves the block up
    env.set_state(state((256, 400), (256, 256), 0.0))
    for _ in range(4):
        env.step(np.array([[0.0, -1.0]]))
    moved = env.get_state()[0, 2:5] - np.array([256, 256, 0.0])
    assert moved[1] < -30 and abs(moved[0]) < 5 and abs(moved[2]) < 0.05


def test_off_centre_push_rotates_block():
    """Pushing the right end of the bar up (-y) turns the T anticlockwise on screen: the angle decreases."""
    env = make(1)
    env.set_state(state((306, 290), (256, 256), 0.0))  # below the bar, right of the stem
    for _ in range(4):
        env.step(np.array([[0.0, -0.6]]))
    assert env.get_state()[0, 4] < -0.1


@pytest.mark.parametrize("angle", [0.0, -np.pi / 2, np.pi / 2, 2.5])
def test_agent_never_passes_through_a_jammed_block(angle):
    """Drive straight at the block until it jams against the right wall, then keep driving.

    A jammed T may turn away and let the agent slide past it, but the agent never enters it.
    """
    env = make(1)
    env.set_state(state((100, 256), (300, 256), angle))
    for _ in range(60):
        env.step(np.array([[1.0, 0.0]]))
        s = env.get_state()[0]
        assert block_distance(s[:2], s[2:5]) >= 15.0 - MOST_SUNK_INTO_BLOCK - 1e-6  # never in the T
        poly = block_polygon(s[2:5])  # inner wall faces at 5 and 507
        assert poly.max() <= 507.0 + MOST_SUNK_INTO_WALL + 1e-6 and poly.min() >= 5.0 - MOST_SUNK_INTO_WALL - 1e-6


def test_block_stays_in_arena_under_aggressive_actions():
    env = make(16, seed=5)
    env.reset()
    rng = np.random.default_rng(0)
    for t in range(150):
        if t % 3 == 0:  # charge through the block, often pinning it against a wall
            s = env.get_state()
            actions = np.clip((s[:, 2:4] - s[:, :2] + rng.normal(0, 30, (16, 2))) / 10, -1, 1)
        env.step(actions)
        s = env.get_state()
        polys = np.stack([block_polygon(p) for p in s[:, 2:5]])
        assert polys.min() >= 5.0 - MOST_SUNK_INTO_WALL - 1e-6 and polys.max() <= 507.0 + MOST_SUNK_INTO_WALL + 1e-6
        assert np.all((s[:, :2] >= WALL) & (s[:, :2] <= WORLD_SIZE - WALL))
        assert all(block_distance(a, p) > 0 for a, p in zip(s[:, :2], s[:, 2:5]))


def test_block_rests_when_contact_ends():
    env = make(1)
    env.set_state(state((150, 256), (256, 256), -np.pi / 2))
    for _ in range(3):
        env.step(np.array([[1.0, 0.0]]))
    pushed = env.get_state()[0, 2:5]
    assert pushed[0] > 280
    env.step(np.array([[-1.0, 0.0]]))  # back off: the agent brakes (pushing a little more), contact ends
    rest = env.get_state()[0]
    assert np.abs(rest[2:5] - pushed).max() < 10.0 and block_distance(rest[:2], rest[2:5]) > AGENT_RADIUS
    for _ in range(3):
        env.step(np.array([[-0.5, 0.3]]))
    np.testing.assert_allclose(env.get_state()[0, 2:5], rest[2:5], atol=1e-9)


def test_block_has_mass_one_spread_uniformly_and_every_shape_has_friction_one():
    """Spec: T-block of mass 1 (uniform: moment of inertia of the two boxes about the centre of mass,
    in closed form), friction 1 on the block and on the agent's circle."""
    import pymunk

    sim = PushTSim(state((100, 100), (256, 256), 0.3)[0])
    com_y = (120 * 30 * 15.0 + 30 * 90 * 75.0) / (120 * 30 + 30 * 90)  # bar on top (y 0-30), stem below (30-120)
    moment = sum(m * ((w * w + h * h) / 12.0 + (cy - com_y) ** 2)
                 for m, w, h, cy in ((3600 / 6300, 120, 30, 15.0), (2700 / 6300, 30, 90, 75.0)))
    assert sim.block.mass == pytest.approx(1.0, rel=1e-12) and sim.block.moment == pytest.approx(moment, rel=1e-9)
    assert sim.agent.body_type == pymunk.Body.KINEMATIC
    assert [shape.friction for shape in sim.agent.shapes] == [1.0]
    assert [shape.friction for shape in sim.block.shapes] == [1.0, 1.0]
    assert [shape.radius for shape in sim.agent.shapes] == [15.0]


def _diagonal_push(agent_friction=None, block_friction=None):
    """Block state after pushing the bar's flat face at 39 degrees off its normal, with the frictions
    optionally overwritten; tangent/normal = 0.8 lies between 0.5 and 1, so sticking depends on them."""
    sim = PushTSim(state((150, 256), (256, 256), -np.pi / 2)[0])
    for shape in sim.agent.shapes if agent_friction is not None else ():
        shape.friction = agent_friction
    for shape in sim.block.shapes if block_friction is not None else ():
        shape.friction = block_friction
    for _ in range(4):
        sim.step(1.0, 0.8)
    return sim.state()[2:5]


def test_a_diagonal_push_moves_the_block_as_with_friction_one():
    """The env's block moves exactly as in a world whose frictions the test sets to the spec's 1, and
    friction matters here: at 0.5 on either shape the block slides less along the face."""
    default = _diagonal_push()
    np.testing.assert_array_equal(default, _diagonal_push(1.0, 1.0))
    for frictions in ((0.5, 1.0), (1.0, 0.5)):
        assert default[1] - _diagonal_push(*frictions)[1] > 1.0  # px less along the face (+y)


def test_with_damping_a_released_block_glides_and_its_speed_decays_by_damping_per_second():
    """damping d = fraction of the block's velocity kept after 1 s: gliding freely (no contact), the
    block's displacement over each 0.1 s control step shrinks by exactly d ** 0.1; with d = 0 it rests."""
    moves = {}
    for d in (0.0, 0.01):
        env = make(1, resolution=8, damping=d)
        env.set_state(state((150, 256), (256, 256), -np.pi / 2))
        for _ in range(3):
            env.step(np.array([[1.0, 0.0]]))  # push the bar to the right
        xs = []
        for _ in range(6):
            env.step(np.array([[-1.0, 0.0]]))  # back off: contact ends during the first of these steps
            s = env.get_state()[0]
            xs.append(s[2])
            assert block_distance(s[:2], s[2:5]) > 15.0 and block_polygon(s[2:5])[:, 0].max() < 500  # no contact
        moves[d] = np.diff(xs)
    np.testing.assert_array_equal(moves[0.0], 0.0)
    assert moves[0.01][0] > 5.0
    np.testing.assert_allclose(moves[0.01][1:] / moves[0.01][:-1], 0.01 ** 0.1, rtol=1e-6)


# ------------------------------------------------------------------------------ success test
def test_success_threshold_and_angle_wrap_around():
    base = np.array([100.0, 120.0, 250.0, 260.0, np.pi - 0.01, 0.0, 0.0])
    goal = base.copy()
    goal[4] = -np.pi + 0.01  # 0.02 rad away across the wrap
    assert is_success(base, goal)[0]
    far_angle = goal.copy()
    far_angle[4] = base[4] - np.pi / 9 - 0.01
    assert not is_success(base, far_angle)[0]
    for d, expect in ((19.0, True), (21.0, False)):  # L2 over (agent xy, block xy): split over the 4 numbers
        g = goal.copy()
        g[:4] += d / 2.0
        assert is_success(base, g)[0] == expect
    env = make(2)
    env.set_state(np.stack([base, base]))
    env.set_goal(np.stack([goal, far_angle]))
    assert env.success().tolist() == [True, False]


def test_goal_errors_are_the_parts_of_the_success_test():
    rng = np.random.default_rng(0)
    env = make(64)
    env.reset()
    goals = env.get_state() + np.c_[rng.normal(0, 12, size=(64, 4)), rng.normal(0, 0.4, size=64), np.zeros((64, 2))]
    env.set_goal(goals)
    err, state = env.goal_errors(), env.get_state()
    for i in range(64):  # against a direct computation, one env at a time
        d = state[i, :4] - goals[i, :4]
        assert math.isclose(err["pose_px"][i], math.sqrt((d ** 2).sum()), rel_tol=1e-12)
        assert math.isclose(err["agent_px"][i], math.hypot(*d[:2]), rel_tol=1e-12)
        assert math.isclose(err["block_px"][i], math.hypot(*d[2:]), rel_tol=1e-12)
        wrapped = abs((state[i, 4] - goals[i, 4] + math.pi) % (2 * math.pi) - math.pi)
        assert math.isclose(err["angle_deg"][i], math.degrees(wrapped), rel_tol=1e-9, abs_tol=1e-9)
    np.testing.assert_array_equal(env.success(), (err["pose_px"] < 20) & (err["angle_deg"] < 20))
    assert 0 < env.success().sum() < 64  # both outcomes occur: the comparison above can fail


def test_success_needs_a_pose_error_strictly_under_20_px():
    """Spec: ||(agent xy, block xy) - goal|| < 20, strictly: exactly 20 px (exact in float64: 20^2 and
    4 * 10^2 are whole numbers) is a miss. The angle test (< pi/9) cannot tie: wrapped angle errors
    near pi/9 are multiples of 2^-51 and float64 pi/9 is not, so only values either side are checked."""
    base = np.array([100.0, 120.0, 250.0, 260.0, 0.5, 0.0, 0.0])
    cases = [([20.0, 0, 0, 0], False), ([0, 0, 0, -20.0], False), ([10.0, -10.0, 10.0, 10.0], False),
             ([19.999, 0, 0, 0], True), ([9.999, -9.999, 9.999, 9.999], True)]
    for offset, expect in cases:
        goal = base.copy()
        goal[:4] += offset
        assert expect or math.sqrt(sum((base[:4] - goal[:4]) ** 2)) == 20.0  # the misses are exact ties
        assert bool(is_success(base, goal)[0]) == expect, offset
    for d, expect in ((math.pi / 9 - 1e-12, True), (math.pi / 9 + 1e-12, False)):
        goal = base.copy()
        goal[4] -= d
        assert bool(is_success(base, goal)[0]) == expect


# --------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("resolution, supersample", [(64, 1), (64, 4), (96, 1), (224, 1), (224, 4)])
def test_the_agent_disc_covers_what_the_renderer_documents(resolution, supersample):
    """The agent is a filled circle of radius r = round(15 x scale) surface pixels, which covers about
    pi (r + 1/2)^2 of them (envs/push_t_render.py); its coverage is summed from the frame's red
    channel (white 255, RoyalBlue 65), partly covered edge pixels counting in part."""
    renderer = PushTRenderer(resolution, T_OUTLINE, supersample=supersample)
    frame = renderer.draw(state((150, 150), (400, 400), 0.3)[0], LIGHT_SLATE_GRAY, ROYAL_BLUE)
    c, half = int(150 * resolution / 512), 12 * resolution // 64
    red = frame[c - half:c + half, c - half:c + half, 0].astype(np.float64)
    coverage = ((255.0 - red) / (255.0 - ROYAL_BLUE[0])).sum()
    r = round(15.0 * resolution * supersample / 512)
    assert coverage == pytest.approx(math.pi * (r + 0.5) ** 2 / supersample ** 2, rel=0.05)


@pytest.mark.parametrize("resolution", [64, 96, 224])
def test_render_draws_objects_at_scaled_places(resolution):
    pose = (300.0, 200.0, 0.8)
    env = make(1, resolution=resolution, goal_overlay=True)
    env.set_state(state((100, 380), pose[:2], pose[2]))
    goal_pose = (150.0, 120.0, 2.5)
    env.set_goal(np.array([[400, 400, *goal_pose, 0, 0]]))
    frame = env.render()[0]
    assert frame.shape == (resolution, resolution, 3) and frame.dtype == np.uint8
    inside = (0.0, -12.0)  # where bar and stem meet: >= 15 px from every edge of the T
    assert pixel(frame, (100, 380), resolution) == ROYAL_BLUE
    assert pixel(frame, block_point(pose, inside), resolution) == LIGHT_SLATE_GRAY
    assert pixel(frame, block_point(goal_pose, inside), resolution) == LIGHT_GREEN
    for far in ((45.0, -12.0), (-45.0, -12.0), (0.0, 55.0)):  # 15 px inside the bar's ends and the stem's:
        assert pixel(frame, block_point(pose, far), resolution) == LIGHT_SLATE_GRAY  # the drawn angles show here
        assert pixel(frame, block_point(goal_pose, far), resolution) == LIGHT_GREEN
    assert pixel(frame, (480, 30), resolution) == (255, 255, 255)
    goal = env.goal_pixels()[0]  # the goal image: agent and block at the goal state
    assert pixel(goal, (400, 400), resolution) == ROYAL_BLUE
    assert pixel(goal, block_point(goal_pose, inside), resolution) == LIGHT_SLATE_GRAY
    assert pixel(goal, (100, 380), resolution) == (255, 255, 255)


def _block_shape_errors(supersample: int, resolution: int = 64, n: int = 40) -> tuple[float, float]:
    """Worst errors of the block's drawn centroid (world px) and second moments (relative), over random poses.

    Measured from the pixels' block coverage (red channel between white and the block's grey) and
    compared with the closed-form centroid (the pose's position) and the T's exact second moments.
    """
    renderer = PushTRenderer(resolution, T_OUTLINE, AGENT_RADIUS, supersample=supersample)
    area = [(x1 - x0) * (y1 - y0) for x0, x1, y0, y1 in T_BOXES]
    exx = sum(a * (x1 ** 3 - x0 ** 3) / (3 * (x1 - x0)) for a, (x0, x1, _, _) in zip(area, T_BOXES)) / sum(area)
    eyy = sum(a * (y1 ** 3 - y0 ** 3) / (3 * (y1 - y0)) for a, (_, _, y0, y1) in zip(area, T_BOXES)) / sum(area)
    size = WORLD_SIZE / resolution
    ys, xs = (np.mgrid[0:resolution, 0:resolution] + 0.5) * size  # pixel centres in world px
    rng = np.random.default_rng(0)
    centroid_err, moment_err = 0.0, 0.0
    for _ in range(n):
        (x, y), angle = rng.uniform(200.0, 312.0, 2), rng.uniform(-math.pi, math.pi)
        frame = renderer.draw(np.array([30.0, 30.0, x, y, angle, 0.0, 0.0]), LIGHT_SLATE_GRAY, ROYAL_BLUE)
        cover = (255.0 - frame[..., 0]) / (255.0 - LIGHT_SLATE_GRAY[0]) * (np.hypot(xs - x, ys - y) < 150.0)
        dx, dy = xs - x, ys - y
        cx, cy = (cover * dx).sum() / cover.sum(), (cover * dy).sum() / cover.sum()
        drawn = np.array([[(cover * dx * dx).sum(), (cover * dx * dy).sum()],
                          [(cover * dx * dy).sum(), (cover * dy * dy).sum()]]) / cover.sum()
        c, s = math.cos(angle), math.sin(angle)
        rot = np.array([[c, -s], [s, c]])
        exact = rot @ np.diag([exx, eyy]) @ rot.T
        centroid_err = max(centroid_err, math.hypot(cx, cy))
        moment_err = max(moment_err, float(np.abs(drawn - exact).max() / max(exx, eyy)))
    return centroid_err, moment_err


def test_supersampled_frames_are_the_box_filtered_fine_drawing():
    state_ = np.array([120.0, 330.0, 260.0, 240.0, 0.7, 0.0, 0.0])
    for s in (2, 3, 4):
        fine = PushTRenderer(64 * s, T_OUTLINE, AGENT_RADIUS).draw(state_, LIGHT_SLATE_GRAY, ROYAL_BLUE)
        mean = fine.astype(np.float64).reshape(64, s, 64, s, 3).mean(axis=(1, 3))  # (64, 64, 3)
        frame = PushTRenderer(64, T_OUTLINE, AGENT_RADIUS, supersample=s).draw(state_, LIGHT_SLATE_GRAY, ROYAL_BLUE)
        assert frame.dtype == np.uint8 and np.array_equal(frame, np.floor(mean + 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match="supersample"):
        PushTRenderer(64, T_OUTLINE, AGENT_RADIUS, supersample=0)


def test_supersampling_draws_the_block_pose_closer_to_the_exact_shape():
    plain_centroid, plain_moments = _block_shape_errors(1)
    centroid, moments = _block_shape_errors(4)
    # one 64 px pixel is 8 world px: supersampled, the drawn T sits within a quarter pixel of its
    # true centre and its second moments (which carry the angle) within 8% of the exact ones
    assert centroid < 2.0 and moments < 0.08
    assert centroid < plain_centroid / 2 and moments < plain_moments / 2


def test_supersample_is_an_env_parameter_and_keeps_the_episodes():
    plain, fine = make(2, seed=3), make(2, seed=3, supersample=4)
    assert fine.params()["supersample"] == 4 and plain.params()["supersample"] == 1
    assert np.array_equal(plain.get_state(), fine.get_state())
    frames, fine_frames = plain.render(), fine.render()
    assert frames.shape == fine_frames.shape and not np.array_equal(frames, fine_frames)
    assert gym.make("leworld/PushT-v0", resolution=64, supersample=2).unwrapped.batch.supersample == 2


def test_colour_changes_show_in_pixels():
    env = make(2, resolution=96)
    s = np.concatenate([state((100, 380), (300, 200), 0.3)] * 2)
    env.set_state(s)
    where_block, where_agent = block_point(s[0, 2:5], (0.0, -12.0)), (100, 380)
    env.set_colour((255, 0, 0), index=0)
    frames = env.render()
    assert pixel(frames[0], where_block, 96) == (255, 0, 0) and pixel(frames[1], where_block, 96) == LIGHT_SLATE_GRAY
    env.step(np.zeros((2, 2)))
    env.set_colour((0, 200, 0), part="agent")
    frames = env.render()
    assert pixel(frames[0], where_agent, 96) == (0, 200, 0) and pixel(frames[1], where_agent, 96) == (0, 200, 0)
    assert pixel(frames[0], where_block, 96) == (255, 0, 0)
    env.reset()
    env.set_state(s)
    assert pixel(env.render()[0], where_block, 96) == LIGHT_SLATE_GRAY  # reset restores the colours


# ----------------------------------------------------------------------------------- policies
def test_segment_clearance_matches_dense_sampling():
    rng = np.random.default_rng(1)
    pose = np.array([250.0, 260.0, 0.7])
    a, b = rng.uniform(100, 400, (200, 2)), rng.uniform(100, 400, (200, 2))
    t = np.linspace(0, 1, 2001)[None, :, None]
    sampled = np.maximum(block_distance(a[:, None] + t * (b - a)[:, None], pose).min(1), 0.0)  # (200,)
    np.testing.assert_allclose(segment_clearance(a, b, pose), sampled, atol=0.3)


@pytest.mark.parametrize("name", ["contact", "pusher", "random", "mix"])
def test_policies_return_bounded_actions_and_are_seeded(name):
    outs = []
    for _ in range(2):
        env = make(6, seed=1)
        env.reset()
        policy = make_policy("pusht", name, env, seed=3)
        policy.reset(env)
        acts = []
        for _ in range(15):
            a = policy.act(env)
            assert a.shape == (6, 2) and a.dtype == np.float32 and np.all(np.abs(a) <= 1)
            env.step(a)
            acts.append(a)
        outs.append(np.stack(acts))
    np.testing.assert_array_equal(outs[0], outs[1])
    env = make(6, seed=1)
    env.reset()
    other = make_policy("pusht", name, env, seed=4)
    other.reset(env)
    assert not np.array_equal(np.stack([other.act(env) for _ in range(3)]), outs[0][:3])  # another seed


@pytest.mark.parametrize("noise, std", [(None, 0.05), (0.2, 0.2)])  # None: the contact policy's default
def test_contact_policy_noise_is_gaussian_with_the_given_std(noise, std):
    """Same seed, with and without noise: the first actions differ by the noise draws (away from the clip)."""
    env = make(3000, resolution=8, seed=0)
    env.reset()
    quiet = make_policy("pusht", "contact", env, noise=0.0, seed=5)
    noisy = make_policy("pusht", "contact", env, noise=noise, seed=5)
    a, b = quiet.act(env), noisy.act(env)
    inside = np.abs(a) < 1 - 3 * std  # where clipping (beyond 3 std) almost never touches the noisy action
    d = (b - a)[inside].astype(np.float64)
    assert inside.sum() > 1000 and abs(d.mean()) < 4 * std / np.sqrt(inside.sum())
    assert d.std() == pytest.approx(std, rel=0.06)


def test_mix_policy_draws_sub_policies_with_its_weights():
    env = make(4000, resolution=8, seed=0)
    env.reset()
    mix = make_policy("pusht", "mix", env, seed=0, weights={"contact": 0.25, "pusher": 0.0, "random": 0.75})
    counts = np.bincount(mix.choice, minlength=3) / 4000
    assert mix.names == ["contact", "pusher", "random"]
    assert counts[1] == 0 and counts[0] == pytest.approx(0.25, abs=0.03) and counts[2] == pytest.approx(0.75, abs=0.03)
    default = make_policy("pusht", "mix", env, seed=0)  # pusher 0.6, contact 0.3, random 0.1
    shares = dict(zip(default.names, np.bincount(default.choice, minlength=3) / 4000))
    assert shares == pytest.approx({"pusher": 0.6, "contact": 0.3, "random": 0.1}, abs=0.03)


def test_policy_errors():
    env = make(2)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("pusht", "expert", env)
    with pytest.raises(ValueError, match="unknown"):
        make_policy("pusht", "mix", env, weights={"pusher": 1.0, "teleport": 1.0})


def test_contact_policy_moves_the_block():
    env = make(16, seed=2)
    env.reset()
    policy = make_policy("pusht", "contact", env, seed=0)
    policy.reset(env)
    start = env.get_state()[:, 2:4]
    for _ in range(60):
        env.step(policy.act(env))
    assert np.mean(np.linalg.norm(env.get_state()[:, 2:4] - start, axis=1) > 10) >= 0.7


def test_pusher_reduces_pose_error_to_the_env_goal():
    env = make(24, seed=11)
    env.reset()
    policy = make_policy("pusht", "pusher", env, noise=0.1, seed=0, use_env_goal=True)
    policy.reset(env)

    def error():  # block position error + radius of gyration * angle error, in px
        s, g = env.get_state(), env.goal
        return np.linalg.norm(s[:, 2:4] - g[:, 2:4], axis=1) + 44.0 * np.abs(
            (s[:, 4] - g[:, 4] + np.pi) % (2 * np.pi) - np.pi)

    before = error()
    for _ in range(120):
        env.step(policy.act(env))
    after = error()
    assert np.mean(after < 0.5 * before) >= 0.7, (before.round(), after.round())


def test_pusher_pushes_blocks_off_walls():
    """Blocks start touching a wall (where most pushes are out of reach): the pusher still gets them home."""
    n, rng = 16, np.random.default_rng(3)
    env = make(n, seed=3)
    env.reset()
    s = env.get_state()
    for i in range(n):
        s[i, 2:4] = rng.uniform(150, 362, 2)
        poly, axis = block_polygon(s[i, 2:5]), rng.integers(2)
        s[i, 2 + axis] += (WALL + 1 - poly[:, axis].min()) if rng.uniform() < 0.5 else (
            WORLD_SIZE - WALL - 1 - poly[:, axis].max())  # slide it against the near or far wall
        while block_distance(s[i, :2], s[i, 2:5]) < 2 * AGENT_RADIUS:
            s[i, :2] = rng.uniform(50, 450, 2)
    env.set_state(s)
    policy = make_policy("pusht", "pusher", env, noise=0.1, seed=0, use_env_goal=True)
    policy.reset(env)

    def error():
        st, g = env.get_state(), env.goal
        return np.linalg.norm(st[:, 2:4] - g[:, 2:4], axis=1) + 44.0 * np.abs(
            (st[:, 4] - g[:, 4] + np.pi) % (2 * np.pi) - np.pi)

    before = error()
    for _ in range(200):
        env.step(policy.act(env))
    assert np.mean(error() < 0.5 * before) >= 0.7, (before.round(), error().round())


def test_wedged_block_is_not_flung():
    """Pins a pymunk blow-up: a block wedged between a wall and the (kinematic) agent was once thrown
    ~390 px in one step (seed 1, env 4, step 39 of this run); block speeds are now capped."""
    env = make(16, resolution=8, seed=1)
    env.reset()
    policy = make_policy("pusht", "contact", env, seed=1, noise=0.3)
    policy.reset(env)
    for _ in range(60):
        before = env.get_state()
        env.step(policy.act(env))
        jump = np.linalg.norm(env.get_state()[:, 2:4] - before[:, 2:4], axis=1)
        assert jump.max() < 80.0, jump.max()


def test_pusher_does_not_park_at_a_fallback_push_point():
    """Pins a bug: with the best pushes out of reach (block in a corner) the agent walked to the next
    best push point and then stood there for ever instead of pushing."""
    env = make(1)
    env.set_state(state((300, 300), (70, 78), -2.0))
    env.set_goal(np.array([[200, 200, 250, 250, 0.5, 0, 0]]))
    policy = make_policy("pusht", "pusher", env, noise=0.0, seed=0, use_env_goal=True)
    policy.reset(env)
    for _ in range(60):
        env.step(policy.act(env))
    assert np.linalg.norm(env.get_state()[0, 2:4] - [70, 78]) > 20


def test_observed_pixels_are_read_only_and_the_gym_view_checks_the_action_shape():
    import gymnasium as gym

    env = gym.make("leworld/PushT-v0", resolution=32)
    obs, _ = env.reset(seed=0)
    frame = obs["pixels"].copy()
    with pytest.raises(ValueError, match="read-only"):
        obs["pixels"][:] = 0  # the env's frame cache: editing it must not change what the env shows
    np.testing.assert_array_equal(env.unwrapped.render(), frame)
    for bad in ([0.1, 0.2, 0.3], [[0.1, 0.2]], 0.5):
        with pytest.raises(ValueError, match=r"action must have shape \(2,\)"):
            env.step(bad)
    env.step(np.array([0.1, -0.2]))


def test_set_colour_refuses_what_it_cannot_paint():
    env = envs.make_batch("pusht", 2, resolution=32)
    for bad in ((float("nan"), 0, 0), (-0.5, 0, 0), (255.9, 0, 0), (1, 2)):
        with pytest.raises(ValueError, match="3 integers in \\[0, 255\\]"):
            env.set_colour(bad)
    plain = env.render()
    env.set_colour((220, 20, 60), index=1)  # only env 1 is painted
    frames = env.render()
    assert np.array_equal(frames[0], plain[0]) and not np.array_equal(frames[1], plain[1])


@pytest.mark.parametrize("name", ["pusht", "tworoom"])
def test_a_boolean_env_mask_selects_the_envs_it_marks(name):
    """Both envs read index=[False, False, True] as env 2 (as numpy does), not as envs 0 and 1."""
    env, by_int = envs.make_batch(name, 3, resolution=32, seed=0), envs.make_batch(name, 3, resolution=32, seed=0)
    plain = env.render()
    env.set_colour((0, 200, 0), index=[False, False, True])
    by_int.set_colour((0, 200, 0), index=2)
    frames = env.render()
    np.testing.assert_array_equal(frames, by_int.render())
    assert np.array_equal(frames[:2], plain[:2]) and not np.array_equal(frames[2], plain[2])
    if name == "pusht":  # Push-T's state setter takes an index too
        state = env.get_state()
        moved = state[2:].copy()
        moved[0, 0] += 20.0
        env.set_state(moved, index=np.array([False, False, True]))
        np.testing.assert_allclose(env.get_state()[:2], state[:2])
        np.testing.assert_allclose(env.get_state()[2, 0], moved[0, 0])
        for bad in ([True, False], [0.0, 2.0]):  # a mask of the wrong length, or indices that are not integers
            with pytest.raises(IndexError, match="boolean env mask|int\\(s\\) or a boolean mask"):
                env.set_colour((0, 200, 0), index=bad)


def test_reset_to_checks_starts_and_goals_before_changing_anything():
    env = envs.make_batch("pusht", 2, resolution=32, seed=0)
    env.set_colour((220, 20, 60))
    before, frames = env.get_state(), env.render()
    with pytest.raises(ValueError, match="reset_to goals"):
        env.reset_to(before, before[:1])  # a goal for one env only
    np.testing.assert_array_equal(env.get_state(), before)
    np.testing.assert_array_equal(env.render(), frames)  # colours untouched too
    outside = before.copy()
    outside[0, 0] = 600.0  # an agent beyond the 512 px world
    with pytest.raises(ValueError, match=r"reset_to starts: agent and block positions must lie in \[0, 512\]"):
        env.reset_to(outside, before)
    np.testing.assert_array_equal(env.get_state(), before)
    env.step(np.zeros((2, 2)))  # frames drawn afresh: the block keeps its colour
    assert ((env.render() == (220, 20, 60)).all(-1).sum((1, 2)) > 0).all()


def test_wrapped_angles_lie_in_minus_pi_to_pi():
    """Angles a rounding step below -pi came back as +pi, outside the half-open range."""
    below = np.nextafter(-np.pi, -np.inf)
    angles = np.array([below, -np.pi, np.pi, 3 * np.pi, -3 * np.pi, np.nextafter(np.pi, 0), 0.5, 7.0])
    wrapped = wrap_angle(angles)
    assert ((wrapped >= -np.pi) & (wrapped < np.pi)).all()
    np.testing.assert_allclose(np.cos(wrapped), np.cos(angles), atol=1e-12)
    np.testing.assert_allclose(np.sin(wrapped), np.sin(angles), atol=1e-12)
    env = envs.make_batch("pusht", 1, resolution=8)
    state = env.get_state()
    state[0, 4] = below
    env.set_state(state)
    assert -np.pi <= env.get_state()[0, 4] < np.pi


def test_reset_seed_chooses_the_episodes():
    """reset(seed=s) draws the same starts and goals whatever the env's own seed and history, and
    another seed draws others."""
    env = make(4, resolution=16, seed=0)
    env.reset()
    env.reset(seed=1)
    one, goal = env.get_state().copy(), env.goal.copy()
    other = make(4, resolution=16, seed=5)
    other.reset(seed=1)
    np.testing.assert_array_equal(other.get_state(), one)
    np.testing.assert_array_equal(other.goal, goal)
    env.reset(seed=2)
    assert not np.allclose(env.get_state(), one)


def test_block_speed_cap_is_one_and_a_half_times_the_pusher_plus_twenty():
    """The cap against solver blow-ups (`PushTSim._limit_block_speed`): direction kept, speed and
    spin clipped to 1.5 x the reference speed + 20 px/s (spin: that over a 20 px lever)."""
    from envs.push_t_physics import PushTSim

    sim = PushTSim([100.0, 100.0, 256.0, 256.0, 0.0, 0.0, 0.0])
    sim.block.velocity, sim.block.angular_velocity = (600.0, -800.0), -50.0
    sim._limit_block_speed(100.0 ** 2)
    np.testing.assert_allclose(tuple(sim.block.velocity), (170.0 * 0.6, -170.0 * 0.8), rtol=1e-12)
    assert sim.block.angular_velocity == pytest.approx(-170.0 / 20.0, rel=1e-12)
    sim.block.velocity, sim.block.angular_velocity = (100.0, 0.0), 1.0  # under the cap: untouched
    sim._limit_block_speed(100.0 ** 2)
    assert tuple(sim.block.velocity) == (100.0, 0.0) and sim.block.angular_velocity == 1.0
