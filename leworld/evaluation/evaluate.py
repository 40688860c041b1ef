"""Run one evaluation: every start/goal pair in parallel in one batched env, success at any step.

Example:
    >>> import envs
    >>> from leworld.evaluation import get_protocol, run_episodes, sample_pairs, summarize
    >>> protocol = get_protocol("paper-v3")
    >>> pairs = sample_pairs(store, protocol, seed=0)
    >>> env = envs.make_batch("tworoom", protocol.num_episodes, resolution=64)
    >>> result = run_episodes(env, policy, pairs, protocol.budget)
    >>> summarize(result.success, result.already)["rate"]

`run_episodes` resets the env exactly to the dataset start states with the goal states as
goals (`env.reset_to`), asks the policy for one action per env step for `budget` steps, and
records whether the env's success test held at any step (including the start: such episodes
are counted as `already` and reported separately).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm


@dataclass
class EpisodeResults:
    success: np.ndarray  # (N,) bool: the success test held at some step 0..budget
    already: np.ndarray  # (N,) bool: it held at the start
    first_success: np.ndarray  # (N,) int: first step where it held, -1 if never
    final_state: np.ndarray  # (N, S)
    seconds: float  # wall time of the episodes (planning and env steps)
    env_seconds: float  # wall time inside env.step
    env_steps: int  # env steps in total (N x budget)
    goal_frames: np.ndarray  # (N, R, R, 3) the goal images
    frames: np.ndarray | None  # (N, budget + 1, R, R, 3) when recorded
    final_errors: dict[str, np.ndarray] | None = None  # env.goal_errors() after the last step, each (N,)
    min_errors: dict[str, np.ndarray] | None = None  # each error's smallest value over steps 0..budget
    start_errors: dict[str, np.ndarray] | None = None  # env.goal_errors() at the start: how far each goal is


def run_episodes(env, policy, pairs, budget: int, record: bool = False, progress: bool = True,
                 desc: str = "episodes") -> EpisodeResults:
    """Run `policy` from `pairs.start_state` toward `pairs.goal_state` for `budget` env steps."""
    n = len(pairs.episode)
    if env.num_envs != n:
        raise ValueError(f"the env has {env.num_envs} copies but there are {n} start/goal pairs")
    t0 = time.perf_counter()
    obs = env.reset_to(pairs.start_state, pairs.goal_state)
    goal_frames = env.goal_pixels()
    policy.reset(env)
    success = env.success().copy()
    already = success.copy()
    first = np.where(success, 0, -1)
    frames = [obs["pixels"].copy()] if record else None
    errors = getattr(env, "goal_errors", None)  # per-env distances to the goal, where the env reports them
    final = errors() if errors else None
    start = {k: v.copy() for k, v in final.items()} if errors else None
    lowest = {k: v.copy() for k, v in final.items()} if errors else None
    env_seconds = 0.0
    for step in tqdm(range(1, budget + 1), desc=desc, unit="step", disable=not progress, leave=False):
        action = policy.act(env, obs)
        e0 = time.perf_counter()
        obs = env.step(action)
        env_seconds += time.perf_counter() - e0
        now = env.success()
        first = np.where(now & (first < 0), step, first)
        success |= now
        if errors:
            final = errors()
            lowest = {k: np.minimum(lowest[k], v) for k, v in final.items()}
        if record:
            frames.append(obs["pixels"].copy())
    return EpisodeResults(success, already, first, env.get_state(), time.perf_counter() - t0, env_seconds,
                          n * budget, goal_frames, np.stack(frames, 1) if record else None, final, lowest, start)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (good at 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at k = 0 (k = n) the lower (upper) end is 0 (1) exactly; rounding could leave it a hair off,
    # and then the interval would not contain the observed rate
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def summarize(success: np.ndarray, already: np.ndarray) -> dict:
    """Success rate with its 95% interval, over all episodes and over those not solved at the start."""
    success, already = np.asarray(success, bool), np.asarray(already, bool)
    k, n = int(success.sum()), len(success)
    rest = ~already
    k2, n2 = int(success[rest].sum()), int(rest.sum())
    return {"episodes": n, "successes": k, "rate": k / n if n else float("nan"), "ci95": wilson_interval(k, n),
            "already_successful": int(already.sum()),
            "excluding_already": {"episodes": n2, "successes": k2, "rate": k2 / n2 if n2 else float("nan"),
                                  "ci95": wilson_interval(k2, n2)}}
