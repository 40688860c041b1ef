"""Scripted Two-Room data policies: `expert` (to the door, then to the target) and `random`.

Example:
    >>> from envs.two_room import TwoRoomBatch
    >>> from envs.policies.two_room import make_two_room_policy
    >>> env = TwoRoomBatch(num_envs=8, resolution=64, target_mode="other_room")
    >>> obs = env.reset(seed=0)
    >>> policy = make_two_room_policy("expert", env, noise=0.0, seed=0)
    >>> policy.reset(env)
    >>> for _ in range(150):
    ...     obs = env.step(policy.act(env))
    >>> bool(env.success().all())
    True

The expert (as in the reference implementation) reads the privileged state: it heads straight for the target
when the straight line does not cross the wall outside a door; otherwise it uses the door that
gives the shortest path, heading for a waypoint in front of the door on its own side until the
straight line to the waypoint behind the door on the target's side passes cleanly through the
door, then for that waypoint. Actions are unit directions plus Gaussian noise of std `noise`
(2.0 in the paper's data), clipped to [-1, 1]; within a step of the waypoint in front of a door
it steps onto it. With noise 0 it never gets stuck on the wall, at doors of any width.
"""
from __future__ import annotations

import numpy as np

from envs.two_room import WALL

DEFAULT_NOISE = {"expert": 2.0, "random": 0.0}


def make_two_room_policy(policy_name: str, env, noise: float | None = None, seed: int = 0, **kw):
    """Build `expert` (noise default 2.0, `margin` keyword) or `random` (noise is ignored)."""
    noise = DEFAULT_NOISE.get(policy_name, 0.0) if noise is None else float(noise)
    if policy_name == "expert":
        return ExpertPolicy(noise=noise, seed=seed, **kw)
    if policy_name == "random":
        if kw:
            raise TypeError(f"the random policy takes no options, got {sorted(kw)}")
        return RandomPolicy(seed=seed)
    raise ValueError(f"unknown Two-Room policy {policy_name!r}: choose 'expert' or 'random'")


def _core(env):
    """The batched core of a `TwoRoomBatch` or of a (wrapped) `TwoRoomEnv`."""
    return getattr(getattr(env, "unwrapped", env), "batch", env)


class RandomPolicy:
    """Uniform actions in [-1, 1]^2 from its own generator."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def reset(self, env) -> None:
        """Nothing to plan."""

    def act(self, env) -> np.ndarray:
        """(N, 2) float32 uniform in [-1, 1]."""
        return self.rng.uniform(-1.0, 1.0, (_core(env).num_envs, 2)).astype(np.float32)


class ExpertPolicy:
    """Door-then-target heuristic with Gaussian action noise.

    Args:
        noise: std of the Gaussian added to the unit-direction action before clipping.
        seed: seed of the policy's own generator (noise only).
        margin: distance (world px) of the waypoints in front of and behind the wall faces.
    """

    def __init__(self, noise: float = 2.0, seed: int = 0, margin: float = 6.0):
        if noise < 0 or margin <= 0:
            raise ValueError(f"need noise >= 0 and margin > 0, got noise={noise}, margin={margin}")
        self.noise, self.margin = float(noise), float(margin)
        self.rng = np.random.default_rng(seed)

    def reset(self, env) -> None:
        """Stateless between steps: the plan is recomputed from the state at every `act`."""

    def act(self, env) -> np.ndarray:
        """(N, 2) float32 actions in [-1, 1]."""
        core = _core(env)
        aim, near = self._aim(core)
        direction = aim - core.agent_pos
        dist = np.linalg.norm(direction, axis=1, keepdims=True)
        action = np.divide(direction, dist, out=np.zeros_like(direction), where=dist > 1e-9)
        # a full step would overshoot the waypoint in front of a door and come back, around it but
        # never on it; at a door narrower than the step the line through the door then never
        # clears, so within a step the agent lands on it (wider doors never get here: their line
        # clears first)
        land = near[:, None] & (dist < core.speed)
        action = np.where(land, direction / core.speed, action)
        if self.noise > 0:
            action = action + self.rng.normal(0.0, self.noise, action.shape)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def waypoint(self, core) -> np.ndarray:
        """(N, 2) point each agent heads for now: the target, or a waypoint at the best door."""
        return self._aim(core)[0]

    def _aim(self, core) -> tuple[np.ndarray, np.ndarray]:
        """`waypoint`, and (N,) bool: it is the waypoint in front of a door on the agent's side."""
        p, g = core.agent_pos, core.target_pos
        aim, near_side = g.copy(), np.zeros(len(p), dtype=bool)
        blocked = ~_clear(p, g, core.door_lo, core.door_hi)
        if not blocked.any() or len(core.doors) == 0:
            return aim, near_side
        p, g = p[blocked], g[blocked]
        centre = core.doors[:, 0]  # (K,)
        mid = 0.5 * (WALL[0] + WALL[1])
        # Waypoints in front of each door: on the agent's side (near) and the target's (far).
        near_x = np.where(p[:, 0] < mid, WALL[0] - self.margin, WALL[1] + self.margin)  # (B,)
        far_x = np.where(g[:, 0] < mid, WALL[0] - self.margin, WALL[1] + self.margin)
        near = np.stack(np.broadcast_arrays(near_x[:, None], centre[None, :]), -1)  # (B, K, 2)
        far = np.stack(np.broadcast_arrays(far_x[:, None], centre[None, :]), -1)
        length = np.linalg.norm(near - p[:, None], axis=-1) + np.linalg.norm(far - g[:, None], axis=-1)
        k = length.argmin(1)  # (B,) the door with the shortest path
        rows = np.arange(len(k))
        near, far = near[rows, k], far[rows, k]
        # the line must pass the door inside its edges by 1 px, or by half its half-extent in a
        # narrower door (the straight line from its near waypoint passes then too)
        slack = np.minimum(1.0, core.doors[k, 1] / 2)[:, None]
        through = _clear(p, far, core.door_lo[k, None], core.door_hi[k, None], slack=slack)
        aim[blocked] = np.where(through[:, None], far, near)
        near_side[blocked] = ~through
        return aim, near_side


def _clear(p: np.ndarray, q: np.ndarray, lo: np.ndarray, hi: np.ndarray, slack=0.0) -> np.ndarray:
    """(N,) bool: the segment p -> q meets the wall slab only inside one door (shrunk by `slack`, a
    number or (N, 1) per segment).

    `lo`, `hi` are door bounds, (K,) for all doors or (N, 1) for one door per segment.
    """
    x0 = np.clip(np.minimum(p[:, 0], q[:, 0]), WALL[0], WALL[1])  # x-extent of the segment
    x1 = np.clip(np.maximum(p[:, 0], q[:, 0]), WALL[0], WALL[1])  # within the slab
    touches = np.maximum(p[:, 0], q[:, 0]) > WALL[0]
    touches &= np.minimum(p[:, 0], q[:, 0]) < WALL[1]
    dx = q[:, 0] - p[:, 0]
    safe = np.where(np.abs(dx) > 1e-12, dx, 1.0)
    ya = np.where(np.abs(dx) > 1e-12, p[:, 1] + (x0 - p[:, 0]) / safe * (q[:, 1] - p[:, 1]), p[:, 1])
    yb = np.where(np.abs(dx) > 1e-12, p[:, 1] + (x1 - p[:, 0]) / safe * (q[:, 1] - p[:, 1]), q[:, 1])
    y_min, y_max = np.minimum(ya, yb)[:, None], np.maximum(ya, yb)[:, None]
    inside = ((y_min >= lo + slack) & (y_max <= hi - slack)).any(1) if np.size(lo) else False
    return ~touches | inside
