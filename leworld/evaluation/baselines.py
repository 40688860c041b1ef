"""Baseline policies that show how hard a protocol is: random, straight line, scripted expert.

Example:
    >>> from leworld.evaluation.baselines import make_baseline
    >>> policy = make_baseline("straight", "tworoom", seed=0)
    >>> policy.reset(env); action = policy.act(env, obs)  # (N, A) raw actions in [-1, 1]

They act on exactly the start/goal pairs the model gets, one env step at a time, through the
same `reset(env)` / `act(env, obs)` interface as `leworld.planning.MPCPolicy`.
- `random`: uniform actions in [-1, 1] (seeded).
- `straight`: privileged; heads straight for the goal's agent position and ignores walls.
- `expert`: privileged upper bound; Two-Room: the noiseless scripted expert (door-aware);
  Push-T: the scripted pusher driving the block to the goal pose (the agent position is not
  part of its objective, so it may miss the agent half of Push-T's success test).
"""
from __future__ import annotations

import numpy as np

BASELINES = ("random", "straight", "expert")


class RandomBaseline:
    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def reset(self, env) -> None:
        self.rng = np.random.default_rng(self.seed)

    def act(self, env, obs: dict) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, (env.num_envs, env.action_dim)).astype(np.float32)


class StraightLineBaseline:
    """Moves the agent toward the goal's agent position at full speed (privileged, wall-blind)."""

    def __init__(self, env_name: str):
        self.env_name = env_name

    def reset(self, env) -> None:
        pass

    def act(self, env, obs: dict) -> np.ndarray:
        if self.env_name == "tworoom":
            delta, reach = env.target_pos - env.agent_pos, env.speed  # px moved by an action of 1
        else:
            from envs.push_t_physics import ACTION_SCALE

            delta, reach = env.goal[:, :2] - env.get_state()[:, :2], ACTION_SCALE  # PD target offset
        return np.clip(delta / reach, -1.0, 1.0).astype(np.float32)


class ExpertBaseline:
    """The env's scripted policy with no noise, driven to the env's goal."""

    def __init__(self, env_name: str, seed: int = 0):
        self.env_name, self.seed = env_name, int(seed)

    def reset(self, env) -> None:
        if self.env_name == "tworoom":
            from envs.policies.two_room import ExpertPolicy

            self.policy = ExpertPolicy(noise=0.0, seed=self.seed)
        else:
            from envs.policies.push_t import PusherPolicy

            self.policy = PusherPolicy(env, noise=0.0, seed=self.seed, use_env_goal=True)
        self.policy.reset(env)

    def act(self, env, obs: dict) -> np.ndarray:
        return self.policy.act(env)


def make_baseline(name: str, env_name: str, seed: int = 0):
    if name == "random":
        return RandomBaseline(seed)
    if name == "straight":
        return StraightLineBaseline(env_name)
    if name == "expert":
        return ExpertBaseline(env_name, seed)
    raise ValueError(f"unknown baseline {name!r}: choose one of {', '.join(BASELINES)}")
