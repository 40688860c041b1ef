"""A privileged Push-T bound: CEM that plans in the true physics, by default with the success test as its cost.

Example:
    >>> from leworld.evaluation.oracle import SimulatorOracle
    >>> policy = SimulatorOracle(num_samples=100, topk=10, iterations=5, deadline=50, seed=0)
    >>> policy.reset(env); action = policy.act(env, obs)  # (N, 2) raw actions in [-1, 1]

It runs the same MPC as the model's planner (`plan.py --receding-horizon 1 --warm-start
--deadline`): one CEM plan of `horizon` action blocks of `frameskip` steps, the first block
executed, then a replan warm-started from the rest, each plan shrinking toward the deadline.
What differs is what it plans with. Each sample is rolled out in a copy of the env's own pymunk
world (`PushTBatch.clone_sim`, block velocity included) instead of a learned predictor. Its cost
(`cost`) is one of:

- `margin` (default): the lowest, over the sample's env steps, of
  max(pose error / 20 px, block angle error / 20 degrees), which is below 1 exactly when the
  success test passes: perfect dynamics and a perfect cost, so it bounds what the search itself
  allows on a set of pairs (up to its own sampling budget, which is smaller than the model
  planner's: each sample costs 25 physics steps on the CPU, not one batched tensor rollout);
- `terminal`: the same margin at the sample's last step only (the latent cost is terminal too);
- `latent`: a trained model's own planning cost on the true rollout: the squared L2 distance
  between the embedding of the last state's rendered frame and the goal image's embedding.
  Beside the model's own planning on the same pairs it separates the two things a world model
  supplies: with true dynamics, what is left to fail is the embedding's cost.

Envs that have already passed the test are not planned for again (the protocol counts success at
any step).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from envs.push_t_physics import SUCCESS_ANGLE, SUCCESS_POS

from leworld.device import frames_to_tensor
from leworld.planning.cem import CEM

COSTS = ("margin", "terminal", "latent")


def success_margin(state, goal) -> float:
    """max(pose error / 20 px, angle error / 20 degrees) of one Push-T state (7,) against its goal:
    below 1 exactly when the env's success test passes."""
    pos = math.sqrt(sum((float(state[k]) - float(goal[k])) ** 2 for k in range(4)))
    ang = abs((float(state[4]) - float(goal[4]) + math.pi) % (2 * math.pi) - math.pi)
    return max(pos / SUCCESS_POS, ang / SUCCESS_ANGLE)


class SimulatorProblem:
    """`PlanningProblem` over copies of Push-T worlds: actions (B, S, T, frameskip*2) in [-1, 1].

    Args:
        sims: a function `i -> PushTSim`, a fresh copy of the world of row i (called once per sample).
        goals: (B, 7) goal states.
        horizon: T, action blocks per plan.
        frameskip: env steps per block.
    """

    def __init__(self, sims, goals, horizon: int, frameskip: int = 5, cost: str = "margin", final_cost=None):
        if cost not in COSTS:
            raise ValueError(f"unknown oracle cost {cost!r}: choose one of {', '.join(COSTS)}")
        if (cost == "latent") != (final_cost is not None):
            raise ValueError("the latent cost needs final_cost (final states (B, S, 7) -> (B, S)), and only it does")
        self.sims, self.goals = sims, np.asarray(goals, dtype=np.float64)
        self.kind, self.final_cost = cost, final_cost
        self.batch_size, self.horizon, self.frameskip = len(self.goals), int(horizon), int(frameskip)
        self.action_dim = 2 * self.frameskip
        self.low = torch.full((self.action_dim,), -1.0, dtype=torch.float64)
        self.high = torch.full((self.action_dim,), 1.0, dtype=torch.float64)
        self.rollouts = 0

    def cost(self, actions: torch.Tensor) -> torch.Tensor:
        """actions (B, S, T, frameskip*2) -> (B, S): each rollout's cost (see the module docstring)."""
        B, S, T, A = actions.shape
        steps = actions.reshape(B, S, T * self.frameskip, 2).tolist()  # (B, S, T*fs, 2), step-major blocks
        out, final = np.empty((B, S)), np.empty((B, S, 7))
        for b in range(B):
            goal = self.goals[b]
            for s in range(S):
                sim, best = self.sims(b), math.inf
                for ax, ay in steps[b][s]:
                    sim.step(ax, ay)
                    if self.kind == "margin":
                        best = min(best, success_margin(sim.state(), goal))
                final[b, s] = sim.state()
                out[b, s] = best if self.kind == "margin" else success_margin(final[b, s], goal)
        self.rollouts += B * S
        if self.kind == "latent":
            return self.final_cost(final).to(torch.float64).cpu()
        return torch.from_numpy(out)


class SimulatorOracle:
    """Privileged CEM-MPC in the env's own physics (Push-T only); see the module docstring.

    Args:
        num_samples, topk, iterations, init_std: the CEM settings of every plan.
        horizon: action blocks per plan (before the deadline shortens it).
        frameskip: env steps per action block (the model's: 5).
        deadline: env steps from `reset` by which the goal should be reached (the protocol's budget),
            or None for plans of `horizon` blocks throughout.
        seed: seed of the CEM sampling stream.
    """

    name = "oracle"

    def __init__(self, num_samples: int = 100, topk: int = 10, iterations: int = 5, init_std: float = 1.0,
                 horizon: int = 5, frameskip: int = 5, deadline: int | None = None, seed: int = 0,
                 cost: str = "margin", model=None):
        if horizon < 1 or frameskip < 1:
            raise ValueError(f"need horizon >= 1 and frameskip >= 1, got {horizon} and {frameskip}")
        if cost not in COSTS:
            raise ValueError(f"unknown oracle cost {cost!r}: choose one of {', '.join(COSTS)}")
        if (cost == "latent") != (model is not None):
            raise ValueError("the oracle's latent cost needs a model (plan.py --model), and only it uses one")
        self.cost, self.model = cost, model
        self.cem = CEM(num_samples, topk, iterations, init_std, seed=seed)
        self.horizon, self.frameskip, self.seed = int(horizon), int(frameskip), int(seed)
        self.deadline = None if deadline is None else int(deadline)

    def settings(self) -> dict:
        return {**self.cem.settings(), "planner": "cem-simulator", "horizon": self.horizon,
                "frameskip": self.frameskip, "receding_horizon": 1, "warm_start": True, "deadline": self.deadline,
                "cost": {"margin": "min over steps of max(pose / 20 px, angle / 20 deg)",
                         "terminal": "max(pose / 20 px, angle / 20 deg) at the last step",
                         "latent": "squared L2 between the embeddings of the last frame and the goal image"}[self.cost]}

    def reset(self, env) -> None:
        if not hasattr(env, "clone_sim"):
            raise ValueError("the simulator oracle plans in Push-T's physics; for Two-Room the privileged "
                             "upper bound is the noiseless scripted expert (--policy expert)")
        n = env.num_envs
        self.steps, self.step_in_block = 0, 0
        self.done = np.zeros(n, dtype=bool)
        self.rest = torch.zeros(n, 0, 2 * self.frameskip, dtype=torch.float64)  # unexecuted tail of each plan
        self.block = np.zeros((n, self.frameskip, 2), dtype=np.float32)
        self.g = torch.Generator().manual_seed(self.seed)
        self.goal_emb = self._encode(env.goal_pixels()) if self.model is not None else None  # (N, D)
        self.plan_seconds: list[float] = []  # per call, which plans `plan_rows[k]` envs
        self.plan_rows: list[int] = []
        self.plans = 0

    @torch.no_grad()
    def _encode(self, frames: np.ndarray) -> torch.Tensor:
        """frames (n, R, R, 3) uint8 -> the model's embeddings (n, D), in float64 on the CPU."""
        device = next(self.model.parameters()).device
        x = frames_to_tensor(frames, device).permute(0, 3, 1, 2)[:, None]
        return self.model.encode(x)[:, 0].to(torch.float64).cpu()

    def _latent_cost(self, env, rows: np.ndarray):
        """final states (B, S, 7) of rows `rows` -> (B, S) squared L2 to their goal embeddings."""
        def cost(final: np.ndarray) -> torch.Tensor:
            B, S = final.shape[:2]
            goals = np.repeat(env.goal[rows], S, axis=0) if env.goal_overlay else None  # (B*S, 7)
            emb = self._encode(env.render_states(final.reshape(B * S, -1), goals)).view(B, S, -1)
            return (emb - self.goal_emb[torch.as_tensor(rows)][:, None]).square().sum(-1)
        return cost

    def plan_horizon(self) -> int:
        if self.deadline is None:
            return self.horizon
        left = max(self.deadline - self.steps, 1)
        return max(1, min(self.horizon, -(-left // self.frameskip)))

    def act(self, env, obs: dict) -> np.ndarray:
        if self.step_in_block == 0:
            self.done |= env.success()
            rows = np.flatnonzero(~self.done)
            horizon = self.plan_horizon()
            rest = self.rest[:, :horizon]
            init = torch.cat([rest, rest.new_zeros(rest.shape[0], horizon - rest.shape[1], rest.shape[2])], 1)
            plan = init.clone()  # envs already done are not replanned: they execute the rest of their
            # last plan, then zeros (success is counted at any step, so it does not change)
            if len(rows):
                t0 = time.perf_counter()
                final_cost = self._latent_cost(env, rows) if self.cost == "latent" else None
                problem = SimulatorProblem(lambda i: env.clone_sim(int(rows[i])), env.goal[rows], horizon,
                                           self.frameskip, self.cost, final_cost)
                plan[rows] = self.cem.plan(problem, init[rows], self.g)
                self.plan_seconds.append(time.perf_counter() - t0)
                self.plan_rows.append(len(rows))
                self.plans += len(rows)
            self.block = plan[:, 0].reshape(-1, self.frameskip, 2).numpy().astype(np.float32)
            self.rest = plan[:, 1:]
        action = self.block[:, self.step_in_block]
        self.step_in_block = (self.step_in_block + 1) % self.frameskip
        self.steps += 1
        return action
