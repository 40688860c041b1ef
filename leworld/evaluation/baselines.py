"""Baseline policies that show how hard a protocol is: random, straight line, scripted expert.

Example:
    >>> from leworld.evaluation.baselines import make_baseline
    >>> policy = make_baseline("straight", "tworoom", seed=0)
    >>> policy.reset(env); action = policy.act(env, obs)  # (N, A) raw actions in [-1, 1]

They act on exactly the start/goal pairs the model gets, one env step at a time, through the
same `reset(env)` / `act(env, obs)` interface as `leworld.planning.MPCPolicy`.
- `random`: uniform actions in [-1, 1] (seeded).
- `straight` ("straight line"): privileged; heads for the goal's agent position at full speed and
  ignores walls. Each axis moves at full speed until it lines up with the goal (clipped to the
  action box), so the path is diagonal first, then along the remaining axis: the fastest
  wall-blind path the box of actions allows, as many steps as a straight path at full speed, and
  a straight line itself only when the goal lies on an axis or a diagonal.
- `expert`: privileged. Two-Room: the noiseless scripted expert (door-aware), an upper bound.
  Push-T: the scripted pusher driving the block to the goal pose, which is not an upper bound:
  the agent's goal position is not part of its objective (once the block is placed it stops,
  wherever the agent is), so it often misses the agent half of Push-T's success test.
- `replay` (`ReplayBaseline`, not in `BASELINES`): privileged; replays the dataset's recorded
  actions from each start to its goal, which says how reachable the pairs are from the reset.
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
    """Moves the agent toward the goal's agent position at full speed on each axis (privileged,
    wall-blind): the action is the offset to the goal over one action's reach, clipped per axis
    to [-1, 1]."""

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


class ReplayBaseline:
    """Replays each pair's recorded actions (N, K, A) from its start, then holds still (action 0).

    The env is reset to the start state alone (Push-T: the block at rest, no contact memory), so a
    replay can drift from the recording; how often it still reaches the goal says how reachable
    the pairs are from the reset. `plan.py --policy replay` reads the actions from the dataset.
    """

    def __init__(self, actions):
        self.actions = np.asarray(actions, dtype=np.float32)
        if self.actions.ndim != 3:
            raise ValueError(f"ReplayBaseline expects actions (N, K, A), got shape {self.actions.shape}")

    def reset(self, env) -> None:
        if env.num_envs != len(self.actions) or env.action_dim != self.actions.shape[2]:
            raise ValueError(f"ReplayBaseline holds actions {self.actions.shape} for (N, K, A), but the env has "
                             f"{env.num_envs} copies with action dim {env.action_dim}")
        self.step = 0

    def act(self, env, obs: dict) -> np.ndarray:
        k, self.step = self.step, self.step + 1
        return self.actions[:, k] if k < self.actions.shape[1] else np.zeros_like(self.actions[:, 0])


def make_baseline(name: str, env_name: str, seed: int = 0):
    if env_name not in ("tworoom", "pusht"):
        raise ValueError(f"unknown env {env_name!r}: baselines exist for tworoom and pusht")
    if name == "random":
        return RandomBaseline(seed)
    if name == "straight":
        return StraightLineBaseline(env_name)
    if name == "expert":
        return ExpertBaseline(env_name, seed)
    raise ValueError(f"unknown baseline {name!r}: choose one of {', '.join(BASELINES)}")
