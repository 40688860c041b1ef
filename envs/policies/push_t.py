"""Scripted Push-T data policies: `contact`, `pusher`, `random` and their per-episode `mix`.

Example:
    >>> import envs
    >>> from envs.policies import make_policy
    >>> env = envs.make_batch("pusht", num_envs=4, resolution=64, seed=0)
    >>> obs = env.reset()
    >>> policy = make_policy("pusht", "pusher", env, noise=0.1, seed=0)
    >>> policy.reset(env); actions = policy.act(env)  # (4, 2) float32 in [-1, 1]

All policies are privileged: they read `env.get_state()` (agent xy, block xy, angle, agent vel).
- `contact`: random targets within 100 px of the block centre, each held for a few steps
  (the reference implementation's data policy; frequent contact).
- `pusher`: drives the block to a goal pose sampled per episode (and again whenever it is reached):
  it scores pushes at points of the T's outline by how well the motion they cause (quasi-static:
  translation along the push, rotation from its lever arm) matches the pose error, walks around
  the block to the best push point it can reach without touching the block, then pushes. A
  block against a wall with no useful push left is first pushed toward the middle.
- `random`: uniform actions in [-1, 1]^2.
- `mix`: one of the above per env and episode, drawn with `weights`.
Each policy owns one np.random.Generator(seed).
"""
from __future__ import annotations

import numpy as np

from envs.policies.push_t_geometry import (
    CANDIDATE_NORMALS, CANDIDATE_POINTS, rotate, segment_clearance, shortest_paths,
)
from envs.push_t_physics import ACTION_SCALE, AGENT_RADIUS, T_RADIUS, WALL, WORLD_SIZE, block_distance, wrap_angle

RHO = 44.0  # radius of gyration of the T (sqrt(moment / mass)), converts angle to px
_CLEAR = AGENT_RADIUS + 2.0  # px between the walking agent's centre and the T
_DETOUR_DONE = T_RADIUS + 2 * AGENT_RADIUS + 5.0  # block centre this far from every wall: room on all sides


def _finish(actions, noise: float, rng: np.random.Generator) -> np.ndarray:
    if noise > 0:
        actions = actions + rng.normal(0.0, noise, size=actions.shape)
    return np.clip(actions, -1.0, 1.0).astype(np.float32)


def _toward(agent, target, gain: float = 1.0 / ACTION_SCALE):
    """Action moving the agent toward `target` (the PD target is agent + 100 a), capped at norm 1."""
    a = (np.asarray(target) - agent) * gain
    n = np.linalg.norm(a)
    return a / n if n > 1.0 else a


class RandomPolicy:
    """Uniform actions in [-1, 1]^2 (`noise` is ignored)."""

    def __init__(self, env, noise: float | None = None, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def reset(self, env) -> None:
        pass

    def act(self, env, rows=None) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, size=(env.num_envs, 2)).astype(np.float32)


class ContactPolicy:
    """Random targets within `radius` px of the block centre, each held for `hold` (min, max) steps."""

    def __init__(self, env, noise: float | None = None, seed: int = 0, radius: float = 100.0,
                 hold: tuple[int, int] = (3, 8)):
        self.rng, self.noise = np.random.default_rng(seed), 0.05 if noise is None else float(noise)
        self.radius, self.hold = float(radius), (int(hold[0]), int(hold[1]))
        self.target, self.left = np.zeros((env.num_envs, 2)), np.zeros(env.num_envs, dtype=np.int64)

    def reset(self, env) -> None:
        self.target, self.left = np.zeros((env.num_envs, 2)), np.zeros(env.num_envs, dtype=np.int64)

    def act(self, env, rows=None) -> np.ndarray:
        state = env.get_state()
        new = self.left <= 0
        n = int(new.sum())
        if n:
            r = self.radius * np.sqrt(self.rng.uniform(size=n))  # uniform in the disc
            phi = self.rng.uniform(-np.pi, np.pi, size=n)
            self.target[new] = state[new, 2:4] + np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)
            self.left[new] = self.rng.integers(self.hold[0], self.hold[1] + 1, size=n)
        self.left -= 1
        a = (self.target - state[:, :2]) / ACTION_SCALE  # the PD target is the drawn point (capped at 100 px)
        return _finish(a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1.0), self.noise, self.rng)


class PusherPolicy:
    """Scripted pusher: brings the block to a sampled goal pose (block xy, angle), then samples another.

    Args:
        noise: std of Gaussian action noise (default 0.1).
        seed: seed of the policy's generator (goals and noise).
        use_env_goal: push toward the env's goal (`env.goal`) instead, and stop there.
        tolerance: (px, rad) at which a goal counts as reached.
    """

    def __init__(self, env, noise: float | None = None, seed: int = 0, use_env_goal: bool = False,
                 tolerance: tuple[float, float] = (6.0, 0.08)):
        self.rng, self.noise = np.random.default_rng(seed), 0.1 if noise is None else float(noise)
        self.use_env_goal, self.tolerance = bool(use_env_goal), tolerance
        self.reset(env)

    def reset(self, env) -> None:
        n = env.num_envs
        self.goal = self._sample_goals(n) if not self.use_env_goal else np.asarray(env.goal)[:, 2:5].copy()
        self.candidate = np.full(n, -1)  # index into CANDIDATE_POINTS, -1: none chosen yet
        self.pushing = np.zeros(n, dtype=bool)  # at the chosen push point and pushing
        self.detour = np.zeros(n, dtype=bool)  # pushing the block off a wall toward the middle first

    def _sample_goals(self, n: int) -> np.ndarray:
        return np.concatenate([self.rng.uniform(100.0, 400.0, size=(n, 2)),
                               self.rng.uniform(-np.pi, np.pi, size=(n, 1))], axis=1)  # (n, 3) block poses

    def act(self, env, rows=None) -> np.ndarray:
        """(N, 2) actions; with a boolean mask `rows` only those envs are planned (the others get 0)."""
        state = env.get_state()
        if self.use_env_goal:
            self.goal = np.asarray(env.goal)[:, 2:5].copy()
        actions = np.zeros((env.num_envs, 2))
        for i in np.flatnonzero(np.ones(env.num_envs, dtype=bool) if rows is None else rows):
            actions[i] = self._act_one(i, state[i, :2], state[i, 2:5])
        return _finish(actions, self.noise, self.rng)

    def _scores(self, pose, goal, turn: float = 1.0):
        """Cosine (C,) between the motion a push at each candidate causes and the wanted motion, in
        (x, y, RHO * angle); `turn=0` wants the translation only. Also the world push points and
        inward normals (C, 2) and the size of the wanted motion."""
        want = np.array([goal[0] - pose[0], goal[1] - pose[1], turn * RHO * float(wrap_angle(goal[2] - pose[2]))])
        r, n = rotate(CANDIDATE_POINTS, pose[2]), rotate(CANDIDATE_NORMALS, pose[2])  # (C, 2) each
        motion = np.concatenate([n, ((r[:, 0] * n[:, 1] - r[:, 1] * n[:, 0]) / RHO)[:, None]], axis=1)
        motion /= np.linalg.norm(motion, axis=1, keepdims=True)
        size = float(np.linalg.norm(want))
        return motion @ want / max(size, 1e-9), r + pose[:2], n, size

    def _act_one(self, i: int, agent, pose) -> np.ndarray:
        goal = self.goal[i]
        near, aligned = np.linalg.norm(goal[:2] - pose[:2]), abs(wrap_angle(goal[2] - pose[2]))
        if near < self.tolerance[0] and aligned < self.tolerance[1]:
            if self.use_env_goal:
                return np.zeros(2)
            self.goal[i] = goal = self._sample_goals(1)[0]  # reached: next goal
            self.candidate[i], self.pushing[i], self.detour[i] = -1, False, False
        if self.detour[i] and min(pose[0], pose[1], WORLD_SIZE - pose[0], WORLD_SIZE - pose[1]) > _DETOUR_DONE:
            self.candidate[i], self.pushing[i], self.detour[i] = -1, False, False  # off the wall: resume
        middle = np.array([WORLD_SIZE / 2, WORLD_SIZE / 2, pose[2]])
        scores, points, normals, size = self._scores(*((pose, middle, 0.0) if self.detour[i] else (pose, goal)))
        k = self.candidate[i]
        if self.pushing[i]:
            gap = np.linalg.norm(agent - points[k]) - AGENT_RADIUS
            if scores[k] >= (0.1 if self.detour[i] else 0.5) and scores[k] >= scores.max() - 0.3 and gap < 12.0:
                return _toward(agent, points[k] + float(np.clip(0.5 * size, 8.0, 35.0)) * normals[k])
            self.pushing[i] = False  # this push no longer helps (or contact was lost): choose again
        approach = points - (AGENT_RADIUS + 6.0) * normals  # (C, 2) where the agent stands before a push
        lo, hi = WALL + AGENT_RADIUS, WORLD_SIZE - WALL - AGENT_RADIUS
        reachable = np.all((approach >= lo) & (approach <= hi), axis=1)
        reachable &= block_distance(approach, pose) >= AGENT_RADIUS + 3.0  # not wedged in a corner of the T
        if k >= 0 and reachable[k] and scores[k] > scores[reachable].max() - 0.1:  # keep a good choice
            if np.linalg.norm(agent - approach[k]) < 4.0:
                self.pushing[i] = True
                return _toward(agent, points[k] + 8.0 * normals[k])
            if segment_clearance(agent[None], approach[k][None], pose)[0] >= min(_CLEAR, block_distance(agent, pose)):
                return _toward(agent, approach[k])  # in plain sight
        for detour in ([True] if self.detour[i] else [False, True]):
            if detour and not self.detour[i]:  # no useful push can be reached (the block lies against
                self.detour[i] = True  # a wall): first push it toward the middle
                scores = self._scores(pose, middle, 0.0)[0]
            options = np.flatnonzero(reachable & (scores > (0.0 if detour else 0.3)))
            if len(options) == 0:
                continue
            length, first = shortest_paths(agent, approach[options], pose, _CLEAR)
            value = scores[options] - 0.15 * length / WORLD_SIZE  # prefer short walks
            if np.isfinite(value).any():
                j = int(np.argmax(value))
                k = self.candidate[i] = options[j]
                if np.linalg.norm(agent - approach[k]) < 4.0:
                    self.pushing[i] = True
                    return _toward(agent, points[k] + 8.0 * normals[k])
                final = np.allclose(first[j], approach[k])
                return _toward(agent, first[j], gain=(1.0 if final else 3.0) / ACTION_SCALE)
        self.candidate[i] = -1  # boxed in: step away from the block, then look again
        away = agent - pose[:2]
        return away / max(np.linalg.norm(away), 1e-9) * 0.3


class MixPolicy:
    """One sub-policy per env and episode, drawn with `weights` (name -> weight) at every reset."""

    def __init__(self, env, noise: float | None = None, seed: int = 0, weights: dict | None = None):
        weights = dict(weights or {"pusher": 0.6, "contact": 0.3, "random": 0.1})
        unknown = sorted(set(weights) - {"contact", "pusher", "random"})
        if unknown:
            raise ValueError(f"mix weights name unknown policies {unknown}: use contact, pusher, random")
        if min(weights.values()) < 0 or sum(weights.values()) <= 0:
            raise ValueError(f"mix weights must be >= 0 with a positive sum, got {weights}")
        self.rng = np.random.default_rng(seed)
        self.names = list(weights)
        self.p = np.array([weights[k] for k in self.names], dtype=np.float64) / sum(weights.values())
        seeds = np.random.SeedSequence(seed).spawn(len(self.names))  # independent streams per sub-policy
        self.policies = [_POLICIES[k](env, noise=noise, seed=s) for k, s in zip(self.names, seeds)]
        self.reset(env)

    def reset(self, env) -> None:
        self.choice = self.rng.choice(len(self.names), size=env.num_envs, p=self.p)  # (N,) policy per env
        for policy in self.policies:
            policy.reset(env)

    def act(self, env) -> np.ndarray:
        actions = np.zeros((env.num_envs, 2), dtype=np.float32)
        for j, policy in enumerate(self.policies):
            rows = self.choice == j
            if rows.any():
                actions[rows] = policy.act(env, rows)[rows]
        return actions


_POLICIES = {"contact": ContactPolicy, "pusher": PusherPolicy, "random": RandomPolicy, "mix": MixPolicy}


def make_push_t_policy(policy_name: str, env, noise: float | None = None, seed: int = 0, **kw):
    """Build the Push-T data policy `policy_name` ("contact", "pusher", "random" or "mix") for a batched env."""
    if policy_name not in _POLICIES:
        raise ValueError(f"unknown Push-T policy {policy_name!r}: choose one of {', '.join(_POLICIES)}")
    return _POLICIES[policy_name](env, noise=noise, seed=seed, **kw)
