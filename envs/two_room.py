"""Two-Room: a point agent drawn as a red Gaussian dot, two rooms joined by door(s) in a wall.

Example:
    >>> import numpy as np
    >>> from envs.two_room import TwoRoomBatch
    >>> env = TwoRoomBatch(num_envs=4, resolution=64, seed=0)
    >>> obs = env.reset()
    >>> obs["pixels"].shape, obs["proprio"].shape
    ((4, 64, 64, 3), (4, 2))
    >>> obs = env.step(np.ones((4, 2), np.float32))
    >>> env.get_state().shape  # (N, S): agent x, agent y, target x, target y
    (4, 4)

Geometry (world pixels, 224 x 224, x to the right, y down; the reference implementation's geometry): a black border
ring from 10 to 14 px inside every edge (outside it is white), so the agent lives in the square
[14, 210]^2; a black vertical wall at x = 112 of thickness 10 (the slab 107 < x < 117) with door
gaps given as (centre_y, half_extent), default one door at y in [35, 63]. The agent is a point:
`position += clip(action, -1, 1) * speed`, clamped to the border; a move into the wall outside a
door stops at the wall face (the along-wall part of the move is kept), and inside a door the
agent slides along the door edges. Success: the agent within `success_radius` (16) of the target.
Frames are drawn at `resolution` directly (world coordinates scaled by resolution / 224): a
precomputed background plus the dot blended in a small window around each agent.
"""
from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
from numpy.lib.stride_tricks import as_strided
from envs.view import BatchView, single

WORLD = 224.0  # world size in px
BORDER = (10.0, 14.0)  # the border ring spans [10, 14] and [210, 214] on each axis
LOW, HIGH = BORDER[1], WORLD - BORDER[1]  # the agent's box: [14, 210]^2
WALL = (107.0, 117.0)  # the wall slab: 107 < x < 117 (x = 112, thickness 10)
TARGET_MODES = ("any", "other_room", "same_room")
_CUTOFF = 3.6  # dot window half-width in std: beyond it the dot changes no uint8 value


class TwoRoomBatch:
    """`num_envs` Two-Room copies stepped at once (the batched-env seam of docs/architecture.md).

    Args:
        num_envs: number of environments N.
        resolution: frame side R in pixels (the world is 224 px; it is scaled, not resized).
        seed: seed of the batch's one `np.random.Generator` (`reset(seed=...)` reseeds it).
        doors: door gaps in the wall as (centre_y, half_extent) pairs; `()` seals the wall.
        speed: world px moved per step by an action of 1.
        target_mode: where reset puts the target: "any" (default: uniform over both rooms,
            independent of the start), "other_room" or "same_room" (relative to the start).
        agent_std: std of the Gaussian dot in world px.
        success_radius: success when the agent is closer than this to the target (world px).
        colour: RGB (0-255) of the agent; `reset` restores it after `set_colour`.
    """

    env_id = "leworld/TwoRoom-v0"
    action_dim, proprio_dim, state_dim = 2, 2, 4

    def __init__(self, num_envs: int, resolution: int = 224, seed: int = 0,
                 doors=((49.0, 14.0),), speed: float = 5.0, target_mode: str = "any",
                 agent_std: float = 7.0, success_radius: float = 16.0, colour=(255, 0, 0)):
        if int(num_envs) < 1 or int(resolution) < 8:
            raise ValueError(f"need num_envs >= 1 and resolution >= 8, got {num_envs} and {resolution}")
        bad = {k: v for k, v in (("speed", speed), ("agent_std", agent_std), ("success_radius", success_radius))
               if not (np.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"speed, agent_std and success_radius must be positive finite numbers, got {bad}")
        self.num_envs, self.resolution, self.seed = int(num_envs), int(resolution), int(seed)
        self.speed, self.agent_std = float(speed), float(agent_std)
        self.success_radius = float(success_radius)
        self.target_mode = _check_mode(target_mode)
        self.doors = np.array(doors, np.float64).reshape(-1, 2)  # (K, 2): centre_y, half_extent
        self.door_lo, self.door_hi = self.doors[:, 0] - self.doors[:, 1], self.doors[:, 0] + self.doors[:, 1]
        order = np.argsort(self.door_lo)
        if (self.doors[:, 1] <= 0).any() or (self.door_lo < LOW).any() or (self.door_hi > HIGH).any() \
                or (self.door_lo[order][1:] <= self.door_hi[order][:-1]).any():
            raise ValueError(f"bad doors {doors}: give (centre_y, half_extent > 0) pairs inside "
                             f"[{LOW}, {HIGH}] that do not overlap, e.g. ((49.0, 14.0),)")
        self.default_colour = _check_colour(colour)
        # Door bounds for lookups; a sealed wall gets one empty door so indexing stays valid.
        sealed = len(self.doors) == 0
        self._lo, self._hi = (np.array([np.inf]), np.array([-np.inf])) if sealed else (self.door_lo, self.door_hi)
        # Each sub-step moves less than half the wall and half the smallest door per axis, so a
        # sub-step never jumps over the slab and the door clamp below is exact.
        limit = min([WALL[1] - WALL[0]] + list(2 * self.doors[:, 1])) / 2
        self._substeps = max(1, math.ceil(self.speed / limit))
        self.background = self._background()  # (R, R, 3) uint8
        self._state = np.zeros((self.num_envs, 4))  # (N, S)
        self._colour = np.tile(self.default_colour, (self.num_envs, 1))  # (N, 3) float32
        self._sample(np.random.default_rng(self.seed), self.target_mode)  # valid before any reset
        self.rng = np.random.default_rng(self.seed)  # so that reset() == reset(seed=seed) here

    # ----- the seam -------------------------------------------------------------------------
    def params(self) -> dict:
        """JSON-serialisable constructor arguments (stored as dataset metadata)."""
        return dict(num_envs=self.num_envs, resolution=self.resolution, seed=self.seed,
                    doors=self.doors.tolist(), speed=self.speed, target_mode=self.target_mode,
                    agent_std=self.agent_std, success_radius=self.success_radius,
                    colour=[int(c) for c in self.default_colour])

    def reset(self, seed: int | None = None, target_mode: str | None = None) -> dict:
        """Sample a start and a target per env (both in a room, never in the wall); restore the colour."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self._sample(self.rng, _check_mode(target_mode or self.target_mode))
        self._colour[:] = self.default_colour
        return self._obs()

    def step(self, actions) -> dict:
        """Move every agent by `clip(actions, -1, 1) * speed` with wall collisions; return obs."""
        a = np.asarray(actions, np.float64)
        if a.shape != (self.num_envs, 2) or not np.isfinite(a).all():
            raise ValueError(f"actions must be finite with shape ({self.num_envs}, 2), got shape "
                             f"{a.shape}; NaN/inf are rejected rather than moving agents to NaN")
        delta = np.clip(a, -1.0, 1.0) * (self.speed / self._substeps)
        pos = self._state[:, :2]
        for _ in range(self._substeps):
            pos = self._move(pos, delta)
        self._state[:, :2] = pos
        return self._obs()

    def render(self) -> np.ndarray:
        """Current frames (N, R, R, 3) uint8."""
        return self._draw(self._state[:, :2])

    def goal_pixels(self) -> np.ndarray:
        """Frames (N, R, R, 3) with each agent drawn at its target (current colour): the goal image."""
        return self._draw(self._state[:, 2:])

    def get_state(self) -> np.ndarray:
        """(N, S) float64 copy: agent x, agent y, target x, target y in world px."""
        return self._state.copy()

    def set_state(self, states) -> None:
        """Teleport: set agent and target of every env from (N, 4) world-px states."""
        s = np.asarray(states, np.float64)
        if s.shape != (self.num_envs, 4):
            raise ValueError(f"states must have shape ({self.num_envs}, 4), got {s.shape}")
        bad = ~(self._free(s[:, :2]) & self._free(s[:, 2:]))
        if bad.any():
            raise ValueError(f"states {s[bad].tolist()} put an agent or target outside [{LOW}, {HIGH}]^2 "
                             f"or inside the wall (107 < x < 117 outside a door); move it into a room")
        self._state[:] = s

    def reset_to(self, starts, goals) -> dict:
        """Start each env at `starts` (N, 4) with its target at the agent position of `goals` (N, 4).

        This is how an evaluation replays a dataset pair: the goal state's agent is the target.
        The colour is restored as by `reset`."""
        starts, goals = np.asarray(starts, np.float64), np.asarray(goals, np.float64)
        if starts.shape != (self.num_envs, 4) or goals.shape != (self.num_envs, 4):
            raise ValueError(f"reset_to: starts and goals must have shape ({self.num_envs}, 4), "
                             f"got {starts.shape} and {goals.shape}")
        self.set_state(np.concatenate([starts[:, :2], goals[:, :2]], axis=1))
        self._colour[:] = self.default_colour
        return self._obs()

    def success(self) -> np.ndarray:
        """(N,) bool: agent closer than `success_radius` to its target."""
        return self.goal_errors()["agent_px"] < self.success_radius

    def goal_errors(self) -> dict[str, np.ndarray]:
        """What the success test measures, per env: {"agent_px": (N,) distance to the target}."""
        s = self._state
        return {"agent_px": np.hypot(s[:, 0] - s[:, 2], s[:, 1] - s[:, 3])}

    def set_colour(self, rgb, index=None) -> None:
        """Perturbation: paint the agent `rgb` (0-255) in envs `index` (int, sequence or None = all)."""
        self._colour[slice(None) if index is None else index] = _check_colour(rgb)

    @property
    def agent_pos(self) -> np.ndarray:
        """(N, 2) agent positions in world px (a copy)."""
        return self._state[:, :2].copy()

    @property
    def target_pos(self) -> np.ndarray:
        """(N, 2) target positions in world px (a copy)."""
        return self._state[:, 2:].copy()

    # ----- dynamics -------------------------------------------------------------------------
    def _sample(self, rng: np.random.Generator, mode: str) -> None:
        """Start uniform in a random room; target uniform in a room chosen by `mode`."""
        start_room = rng.integers(0, 2, self.num_envs)
        target_room = {"any": rng.integers(0, 2, self.num_envs), "other_room": 1 - start_room,
                       "same_room": start_room}[mode]
        self._state[:, :2] = _sample_in_room(rng, start_room)
        self._state[:, 2:] = _sample_in_room(rng, target_room)

    def _door_of(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inside a door, that door's lo, its hi) for each y; doors are closed intervals."""
        inside = (y[:, None] >= self._lo) & (y[:, None] <= self._hi)  # (N, K)
        k = inside.argmax(1)
        return inside.any(1), self._lo[k], self._hi[k]

    def _free(self, p: np.ndarray) -> np.ndarray:
        """(N,) bool: point inside the border and not inside the wall outside a door."""
        in_box = ((p >= LOW) & (p <= HIGH)).all(1)
        in_slab = (p[:, 0] > WALL[0]) & (p[:, 0] < WALL[1])
        return in_box & (~in_slab | self._door_of(p[:, 1])[0])

    def _move(self, p: np.ndarray, d: np.ndarray) -> np.ndarray:
        """One sub-step p -> p + d (|d| per axis below half the wall) for points p (N, 2)."""
        q = np.clip(p + d, LOW, HIGH)
        px, py, qx, qy = p[:, 0], p[:, 1], q[:, 0], q[:, 1]
        dx = np.where(qx == px, 1.0, qx - px)  # safe divisor; unused where qx == px
        p_in = (px > WALL[0]) & (px < WALL[1])
        q_in = (qx > WALL[0]) & (qx < WALL[1])
        # Entering from a room: where does the segment meet the face on the agent's side?
        entering = ~p_in & (q_in | ((px <= WALL[0]) != (qx <= WALL[0])))
        face = np.where(px <= WALL[0], WALL[0], WALL[1])
        y_face = py + (face - px) / dx * (qy - py)
        in_door, lo, hi = self._door_of(np.where(p_in, py, y_face))
        out = q.copy()
        blocked = entering & ~in_door  # hits the wall face: stop there, keep the along-wall move
        out[blocked, 0] = face[blocked]
        # In a door (already, or entering through it): slide along the door edges while in the
        # slab; leaving the slab is allowed only if the exit point lies in the same door.
        corridor = p_in | (entering & in_door)
        exit_face = np.where(qx <= WALL[0], WALL[0], WALL[1])
        y_exit = py + (exit_face - px) / dx * (qy - py)
        exits_ok = ~q_in & (y_exit >= lo) & (y_exit <= hi)
        clamp = corridor & ~exits_ok
        out[clamp, 1] = np.clip(qy[clamp], lo[clamp], hi[clamp])
        return out

    # ----- rendering ------------------------------------------------------------------------
    def _obs(self) -> dict:
        return {"pixels": self.render(), "proprio": self._state[:, :2].astype(np.float32)}

    def _background(self) -> np.ndarray:
        """White frame with the black border ring and wall (door gaps open), sampled at pixel centres."""
        u = (np.arange(self.resolution) + 0.5) * WORLD / self.resolution  # world coord of pixel centres
        ring = (u >= BORDER[0]) & (u <= WORLD - BORDER[0])
        band = ring & ((u <= BORDER[1]) | (u >= WORLD - BORDER[1]))
        border = (ring[:, None] & band[None, :]) | (band[:, None] & ring[None, :])  # (R_y, R_x)
        slab_x = (u >= WALL[0]) & (u <= WALL[1])
        wall_y = (u > LOW) & (u < HIGH) & ~self._door_of(u)[0]
        black = border | (wall_y[:, None] & slab_x[None, :])
        frame = np.full((self.resolution, self.resolution, 3), 255, np.uint8)
        frame[black] = 0
        return frame

    def _draw(self, pos: np.ndarray) -> np.ndarray:
        """Background copy per env, then the Gaussian dot blended in a window around each agent."""
        n, r = len(pos), self.resolution
        scale = r / WORLD
        frames = np.empty((n, r, r, 3), np.uint8)
        frames[:] = self.background
        half = _CUTOFF * self.agent_std  # world px
        win = min(r, int(2 * half * scale) + 2)
        # First pixel whose centre lies within `half` of the agent, shifted to keep the window in frame.
        origin = np.clip(np.ceil((pos - half) * scale - 0.5), 0, r - win).astype(np.int64)  # (N, 2)
        idx = origin[:, :, None] + np.arange(win)  # (N, 2, win) pixel indices along x and y
        centre = (idx + 0.5) / scale  # world coords of those pixel centres
        g = np.exp(-0.5 * ((centre - pos[:, :, None]) / self.agent_std) ** 2).astype(np.float32)
        w = g[:, 1, :, None] * g[:, 0, None, :]  # (N, win_y, win_x)
        # Windowed view (N, R-win+1, R-win+1, win, win, 3) of the frames: window (y, x) of env n
        # is windows[n, y, x], so one gather/scatter per env instead of per-pixel fancy indexing.
        windows = as_strided(frames, (n, r - win + 1, r - win + 1, win, win, 3),
                             frames.strides[:3] + frames.strides[1:], writeable=True)
        sel = (np.arange(n), origin[:, 1], origin[:, 0])
        bg = windows[sel].astype(np.float32)  # (N, win, win, 3)
        out = np.empty(bg.shape, np.uint8)
        for ch in range(3):  # per channel: contiguous inner loops, 1.5x faster than broadcasting
            blend = self._colour[:, ch, None, None] - bg[..., ch]
            blend *= w
            blend += bg[..., ch] + 0.5
            out[..., ch] = blend  # float -> uint8 truncates: rounds the +0.5 above
        windows[sel] = out
        return frames


def _sample_in_room(rng: np.random.Generator, room: np.ndarray) -> np.ndarray:
    """Uniform points (N, 2) in room 0 (x <= 107) or room 1 (x >= 117)."""
    x = rng.uniform(LOW, WALL[0], len(room)) + room * (WALL[1] - LOW)
    return np.stack([x, rng.uniform(LOW, HIGH, len(room))], 1)


def _check_mode(mode: str) -> str:
    if mode not in TARGET_MODES:
        raise ValueError(f"unknown target_mode {mode!r}: choose one of {', '.join(TARGET_MODES)}")
    return mode


def _check_colour(rgb) -> np.ndarray:
    """3 whole numbers in 0-255: a dataset records its colour as integers, and an env rebuilt from that
    record (evaluation, surprise) must draw the frames the data was made with."""
    c = np.asarray(rgb, np.float32)
    if c.shape != (3,) or not ((c >= 0) & (c <= 255) & (c == np.round(c))).all():
        raise ValueError(f"colour must be 3 whole numbers in 0-255 (e.g. (0, 0, 255)), got {rgb!r}")
    return c


class TwoRoomEnv(BatchView):
    """Gymnasium view of Two-Room (`TwoRoomBatch` with num_envs=1), id `leworld/TwoRoom-v0`.

    reward = float(success); `terminated` is always False and `truncated` is False (give a time
    limit with `max_episode_steps`). `reset(options={"target_mode": ..., "state": (4,) array})`
    overrides the target mode or teleports after the reset. `info` holds agent_pos, target_pos
    and success. Without a seed the first reset uses `seed` (default 0) and later ones continue
    its generator. Other keyword arguments go to `TwoRoomBatch`.
    """

    def __init__(self, resolution: int = 224, render_mode: str | None = "rgb_array", seed: int = 0, **kwargs):
        self._set_render_mode(render_mode)
        self.batch = TwoRoomBatch(num_envs=1, resolution=resolution, seed=seed, **kwargs)
        self._np_random, self._np_random_seed = self.batch.rng, seed  # one generator, shared
        r = self.batch.resolution
        self.observation_space = gym.spaces.Dict({
            "pixels": gym.spaces.Box(0, 255, (r, r, 3), np.uint8),
            "proprio": gym.spaces.Box(LOW, HIGH, (2,), np.float32),
        })
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        self.batch.rng = self.np_random
        obs = self.batch.reset(target_mode=options.get("target_mode"))
        if options.get("state") is not None:
            self.set_state(options["state"])
            obs = self.batch._obs()
        return single(obs), self._info()

    def set_colour(self, rgb) -> None:
        """Paint the agent `rgb` (0-255) from now on (until the next reset)."""
        self.batch.set_colour(rgb)

    def _info(self) -> dict:
        return {"agent_pos": self.batch.agent_pos[0], "target_pos": self.batch.target_pos[0],
                "success": bool(self.batch.success()[0])}
