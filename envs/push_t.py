"""Push-T: a round agent pushes a T-shaped block to a goal pose (pymunk physics, pygame pixels).

Example:
    >>> import numpy as np, envs
    >>> env = envs.make_batch("pusht", num_envs=4, resolution=64, seed=0)
    >>> obs = env.reset()
    >>> obs = env.step(np.zeros((4, 2), dtype=np.float32))
    >>> obs["pixels"].shape, obs["proprio"].shape, env.get_state().shape, env.success().shape
    ((4, 64, 64, 3), (4, 4), (4, 7), (4,))

Physics (the reference implementation's geometry) lives in `envs.push_t_physics` (one pymunk space per env), drawing in
`envs.push_t_render` (pygame, off-screen, at `resolution` directly). Actions a in [-1, 1]^2 are
relative: the agent's PD target is agent + 100 a. State (7 numbers): agent xy, block xy (its
centre of mass), block angle in [-pi, pi), agent velocity. Success (the LeWM paper's test):
||(agent xy, block xy) - goal|| < 20 px and the wrapped block angle error < pi/9. The goal is a
state, sampled at reset like a start and settable with `set_goal`. `PushTBatch` steps `num_envs`
independent pymunk spaces in one process; `PushTEnv` is its `num_envs=1` gymnasium view,
registered as `leworld/PushT-v0`.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np

from envs.push_t_physics import (
    ACTION_SCALE, AGENT_RADIUS, T_BOXES, T_OUTLINE, WALL, WORLD_SIZE, PushTSim, block_distance, block_polygon,
    is_success, pose_error, wrap_angle,
)
from envs.push_t_render import PushTRenderer
from envs.view import BatchView, single

__all__ = [  # the Push-T vocabulary, re-exported from envs.push_t_physics
    "PushTBatch", "PushTEnv", "ACTION_SCALE", "AGENT_RADIUS", "T_BOXES", "T_OUTLINE", "WALL", "WORLD_SIZE",
    "block_distance", "block_polygon", "is_success", "pose_error", "wrap_angle", "ROYAL_BLUE", "LIGHT_SLATE_GRAY",
]

ROYAL_BLUE, LIGHT_SLATE_GRAY = (65, 105, 225), (119, 136, 153)


class PushTBatch:
    """`num_envs` independent Push-T copies stepped in one process (the batched env of docs/architecture.md).

    Args:
        num_envs: number of independent copies N.
        resolution: side R of the rendered square frames, in pixels.
        seed: seed of the batch's one np.random.Generator (starts and goals).
        goal_overlay: draw the goal T (light green) under the block.
        damping: pymunk space damping, the fraction of block velocity kept after 1 s (0: the block
            moves only while pushed; above 0 it glides, and its velocity is not in the state).
        supersample: draw at `resolution` x S and box-filter down (1: draw at `resolution`; 4: the
            block's outline and angle move smoothly instead of in whole-pixel steps).
    """

    env_id = "leworld/PushT-v0"
    action_dim, proprio_dim, state_dim = 2, 4, 7

    def __init__(self, num_envs: int, resolution: int = 224, seed: int = 0, goal_overlay: bool = False,
                 damping: float = 0.0, supersample: int = 1):
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if not 0.0 <= float(damping) <= 1.0:
            raise ValueError(f"damping must be in [0, 1], got {damping}")
        self.num_envs, self.resolution, self.seed = int(num_envs), int(resolution), int(seed)
        self.goal_overlay, self.damping = bool(goal_overlay), float(damping)
        self.rng = np.random.default_rng(self.seed)
        self.renderer = PushTRenderer(self.resolution, T_OUTLINE, AGENT_RADIUS, self.goal_overlay, supersample)
        self.supersample = self.renderer.supersample
        self._block_rgb = [LIGHT_SLATE_GRAY] * self.num_envs
        self._agent_rgb = [ROYAL_BLUE] * self.num_envs
        self._sims: list[PushTSim] = []
        self._goal = np.zeros((self.num_envs, self.state_dim))
        self._frames: np.ndarray | None = None  # cache of the current frames, None when stale
        self.set_state(self._sample_states(self.num_envs))
        self.set_goal(self._sample_states(self.num_envs))

    def params(self) -> dict:
        """JSON-serialisable constructor arguments."""
        return {"num_envs": self.num_envs, "resolution": self.resolution, "seed": self.seed,
                "goal_overlay": self.goal_overlay, "damping": self.damping, "supersample": self.supersample}

    # ----------------------------------------------------------------------------------- episodes
    def _sample_states(self, n: int) -> np.ndarray:
        """Reset distribution: block ~ U[100, 400]^2, angle ~ U[-pi, pi), agent ~ U[50, 450]^2 off the block."""
        states = np.zeros((n, self.state_dim))
        states[:, 2:4] = self.rng.uniform(100.0, 400.0, size=(n, 2))
        states[:, 4] = self.rng.uniform(-np.pi, np.pi, size=n)
        for i in range(n):
            for _ in range(1000):  # rejection sampling; the T covers well under half of the agent's range
                agent = self.rng.uniform(50.0, 450.0, size=2)
                if block_distance(agent, states[i, 2:5]) > AGENT_RADIUS + 5.0:
                    break
            states[i, :2] = agent
        return states

    def reset(self, seed: int | None = None) -> dict:
        """New start and goal for every env, default colours; `seed` reseeds the batch generator."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self._block_rgb = [LIGHT_SLATE_GRAY] * self.num_envs
        self._agent_rgb = [ROYAL_BLUE] * self.num_envs
        self.set_state(self._sample_states(self.num_envs))
        self.set_goal(self._sample_states(self.num_envs))
        return self._obs()

    def reset_to(self, starts, goals) -> dict:
        """Start each env at `starts` (N, 7) with goal `goals` (N, 7), default colours (dataset replay)."""
        idx = self._indices(None)
        self._check_positions(self._rows(starts, idx, "reset_to starts"), "reset_to starts")  # both checked
        self._rows(goals, idx, "reset_to goals", widths=(7, 5))  # before anything changes
        self._block_rgb = [LIGHT_SLATE_GRAY] * self.num_envs
        self._agent_rgb = [ROYAL_BLUE] * self.num_envs
        self.set_state(starts)
        self.set_goal(goals)
        return self._obs()

    def _indices(self, index) -> np.ndarray:
        """Env indices of `index`: None (all), an int, a sequence of ints, or a boolean mask over the envs."""
        if index is None:
            return np.arange(self.num_envs)
        raw = np.atleast_1d(np.asarray(index))
        if raw.dtype == bool:  # a mask, as numpy indexing reads it (Two-Room's setters index numpy arrays)
            if raw.shape != (self.num_envs,):
                raise IndexError(f"a boolean env mask must have one entry per env ({self.num_envs}), got shape "
                                 f"{raw.shape}")
            return np.flatnonzero(raw)
        if raw.size and raw.dtype.kind not in "iu":
            raise IndexError(f"env index must be int(s) or a boolean mask, got {index!r}")
        idx = raw.astype(np.int64)
        if idx.size and (idx.min() < -self.num_envs or idx.max() >= self.num_envs):
            raise IndexError(f"env index {index} out of range for num_envs={self.num_envs}")
        return idx % self.num_envs

    def _rows(self, values, idx, what: str, widths=(7,)) -> np.ndarray:
        rows = np.asarray(values, dtype=np.float64)
        rows = rows.reshape(1, -1) if rows.ndim == 1 else rows
        if rows.shape[0] != len(idx) or rows.shape[1] not in widths or not np.all(np.isfinite(rows)):
            raise ValueError(f"{what}: expected {len(idx)} finite rows of {' or '.join(map(str, widths))} numbers, "
                             f"got shape {np.shape(values)}")
        return rows

    @staticmethod
    def _check_positions(states: np.ndarray, what: str) -> np.ndarray:
        outside = (states[:, :4] < 0) | (states[:, :4] > WORLD_SIZE)
        if outside.any():
            raise ValueError(f"{what}: agent and block positions must lie in [0, {WORLD_SIZE:g}]^2, "
                             f"got {states[outside.any(1), :4].tolist()}")
        return states

    def set_state(self, states, index=None) -> None:
        """Teleport envs `index` (default all) to `states` (n, 7); the block is at rest afterwards.

        Each env gets a fresh pymunk space (no contact memory), so envs set to the same state evolve
        identically. An env that got there by pushing may then evolve differently (a median 0.3 px after
        one step, at times over 10 px): its block may have been moving, and that velocity is not part of
        the state (`envs/push_t_physics.py`)."""
        idx = self._indices(index)
        states = self._check_positions(self._rows(states, idx, "set_state"), "set_state")
        sims = self._sims or [None] * self.num_envs
        for i, s in zip(idx, states):
            sims[i] = PushTSim(s, self.damping)
        self._sims = sims
        self._frames = None

    def get_state(self) -> np.ndarray:
        """(N, 7) float64: agent xy, block xy, block angle in [-pi, pi), agent velocity."""
        out = np.stack([sim.state() for sim in self._sims])  # (N, 7)
        out[:, 4] = wrap_angle(out[:, 4])
        return out

    def render_states(self, states, goals=None) -> np.ndarray:
        """Frames (n, R, R, 3) uint8 of any states (n, 7), drawn as this env draws (default colours).

        With `goal_overlay`, frame i shows goals[i] (n, 7) under the block, as `render` shows each
        env's own goal; `goals` is required then, since the overlay is part of what the env draws."""
        states = np.asarray(states, dtype=np.float64).reshape(-1, self.state_dim)
        if self.goal_overlay:
            if goals is None:
                raise ValueError("render_states: this env draws the goal under the block (goal_overlay=True): "
                                 "pass goals, one goal state per state")
            goals = self._rows(goals, range(len(states)), "render_states goals")
        frames = np.empty((len(states), self.resolution, self.resolution, 3), dtype=np.uint8)
        for i, s in enumerate(states.tolist()):
            goal = goals[i] if self.goal_overlay else None
            self.renderer.draw(s, LIGHT_SLATE_GRAY, ROYAL_BLUE, goal, out=frames[i])
        return frames

    def clone_sim(self, index: int) -> PushTSim:
        """A fresh copy of env `index`'s world (for a privileged planner that searches the true physics).

        It has the env's state and damping and also the block's velocity and spin, which the 7-number
        state leaves out; only the solver's contact memory is not copied.
        """
        src = self._sims[int(self._indices(index)[0])]
        sim = PushTSim(src.state(), self.damping)
        sim.block.velocity, sim.block.angular_velocity = src.block.velocity, src.block.angular_velocity
        return sim

    def set_goal(self, states, index=None) -> None:
        """Set the goal states (n, 7) of envs `index` (default all); success compares against them."""
        idx = self._indices(index)
        goals = self._rows(states, idx, "set_goal", widths=(7, 5))  # a state, or agent xy + block pose
        self._goal[idx] = 0.0
        self._goal[idx, : goals.shape[1]] = goals
        self._frames = None

    @property
    def goal(self) -> np.ndarray:
        """(N, 7) goal states."""
        return self._goal.copy()

    def success(self) -> np.ndarray:
        """(N,) bool: the LeWM paper's success test against the current goals."""
        return is_success(self.get_state(), self._goal)

    def goal_errors(self) -> dict[str, np.ndarray]:
        """Per env, the distances to the goal that the success test combines: the norm of the
        4-vector (agent xy, block xy) ("pose_px", < 20 for success), its agent and block parts,
        and the wrapped block angle error in degrees ("angle_deg", < 20 for success)."""
        state, goal = self.get_state(), self._goal
        pose, angle = pose_error(state, goal)
        return {"pose_px": pose, "agent_px": np.linalg.norm(state[:, :2] - goal[:, :2], axis=1),
                "block_px": np.linalg.norm(state[:, 2:4] - goal[:, 2:4], axis=1), "angle_deg": np.degrees(angle)}

    # -------------------------------------------------------------------------------- dynamics
    def step(self, actions) -> dict:
        """Advance every env by one control step (10 sub-steps); actions (N, 2) are clipped to [-1, 1]."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.shape != (self.num_envs, self.action_dim):
            raise ValueError(f"step: actions must have shape ({self.num_envs}, {self.action_dim}), got {actions.shape}")
        if not np.all(np.isfinite(actions)):
            raise ValueError("step: actions must be finite")
        actions = np.clip(actions, -1.0, 1.0)
        for sim, (ax, ay) in zip(self._sims, actions.tolist()):
            sim.step(ax, ay)
        self._frames = None
        return self._obs()

    # ------------------------------------------------------------------------------- rendering
    def _obs(self) -> dict:
        state = self.get_state()
        return {"pixels": self._render_current(state), "proprio": state[:, [0, 1, 5, 6]].astype(np.float32)}

    def _render_states(self, states) -> np.ndarray:
        frames = np.empty((len(states), self.resolution, self.resolution, 3), dtype=np.uint8)  # (N, R, R, 3)
        for i, s in enumerate(states.tolist()):
            self.renderer.draw(s, self._block_rgb[i], self._agent_rgb[i], self._goal[i], out=frames[i])
        return frames

    def _render_current(self, state=None) -> np.ndarray:
        if self._frames is None:
            self._frames = self._render_states(self.get_state() if state is None else state)
            self._frames.flags.writeable = False  # observations share this cache: edit a copy, not the env
        return self._frames

    def render(self) -> np.ndarray:
        """(N, R, R, 3) uint8 frames of the current states."""
        return self._render_current().copy()

    def goal_pixels(self) -> np.ndarray:
        """(N, R, R, 3) uint8 frames of the goal states (the goal images), in the current colours."""
        return self._render_states(self._goal)

    def set_colour(self, rgb, index=None, part: str = "block") -> None:
        """Perturbation: paint the block (default) or the agent of envs `index` (default all) until the next reset."""
        if part not in ("block", "agent"):
            raise ValueError(f"set_colour: part must be 'block' or 'agent', got {part!r}")
        values = np.asarray(rgb, dtype=np.float64).reshape(-1)
        if len(values) != 3 or not ((values >= 0) & (values <= 255) & (values == np.round(values))).all():
            raise ValueError(f"set_colour: rgb must be 3 integers in [0, 255], got {rgb!r}")
        rgb = tuple(int(c) for c in values)
        colours = self._block_rgb if part == "block" else self._agent_rgb
        for i in self._indices(index):
            colours[i] = rgb
        self._frames = None


class PushTEnv(BatchView):
    """Gymnasium view of Push-T (`PushTBatch` with num_envs=1), id `leworld/PushT-v0`.

    reward = float(success); `terminated` and `truncated` are always False (give a time limit with
    `max_episode_steps`). `reset(options={"state": (7,), "goal": (7,)})` teleports and/or sets the
    goal after the reset. `info` holds state, goal and success. Without a seed every reset continues
    the generator seeded with `seed` (default 0), whose first draw built the env, so the first
    unseeded reset differs from `reset(seed=seed)` but is the same on every run. The observed
    pixels are read-only (they are the env's frame cache). Other keyword arguments go to `PushTBatch`.
    """

    def __init__(self, resolution: int = 224, render_mode: str | None = "rgb_array", seed: int = 0, **kwargs):
        self._set_render_mode(render_mode)
        self.batch = PushTBatch(num_envs=1, resolution=resolution, seed=seed, **kwargs)
        self._np_random, self._np_random_seed = self.batch.rng, seed  # one generator, shared
        r = self.batch.resolution
        self.observation_space = gym.spaces.Dict({
            "pixels": gym.spaces.Box(0, 255, (r, r, 3), np.uint8),
            "proprio": gym.spaces.Box(np.array([0, 0, -1e3, -1e3], np.float32),  # agent xy, agent velocity
                                      np.array([WORLD_SIZE, WORLD_SIZE, 1e3, 1e3], np.float32)),
        })
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        self.batch.rng = self.np_random
        obs = self.batch.reset()
        if options.get("state") is not None:
            self.set_state(options["state"])
        if options.get("goal") is not None:
            self.set_goal(options["goal"])
        if options.get("state") is not None or options.get("goal") is not None:
            obs = self.batch._obs()
        return single(obs), self._info()

    def set_goal(self, state) -> None:
        """Set the goal to a (7,) state (or 5 numbers: agent xy, block pose)."""
        self.batch.set_goal(np.asarray(state, np.float64).reshape(1, -1))

    def set_colour(self, rgb, part: str = "block") -> None:
        """Paint the block (or the agent, `part="agent"`) `rgb` (0-255) from now on (until the next reset)."""
        self.batch.set_colour(rgb, part=part)

    def _info(self) -> dict:
        return {"state": self.batch.get_state()[0], "goal": self.batch.goal[0],
                "success": bool(self.batch.success()[0])}
