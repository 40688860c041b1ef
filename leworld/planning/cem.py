"""Cross-entropy method (the LeWM paper's planner): sample, keep the `topk` cheapest, refit a Gaussian.

Example:
    >>> from leworld.planning import CEM
    >>> planner = CEM(num_samples=300, topk=30, iterations=30, init_std=1.0, seed=0)
    >>> actions = planner.plan(problem)  # (B, T, A), inside [problem.low, problem.high]

All B problems and S samples are one tensor program; the iteration loop never reads a value
back to the host, so it runs asynchronously on a GPU.
"""
from __future__ import annotations

import torch

from leworld.planning.problem import PlanningProblem


def start(problem: PlanningProblem, init: torch.Tensor | None, init_std: float):
    """Initial mean (B, T, A) (zeros, or `init` clipped to the bounds, so that a mean that competes
    as a sample is an executable plan) and std (B, T, A)."""
    shape = (problem.batch_size, problem.horizon, problem.action_dim)
    device, dtype = problem.low.device, problem.low.dtype
    if init is not None and tuple(init.shape) != shape:
        raise ValueError(f"init must have shape (B, T, A) = {shape}, got {tuple(init.shape)}")
    mean = (torch.zeros(shape, device=device, dtype=dtype) if init is None
            else init.to(device, dtype).clamp(problem.low, problem.high))  # a copy: the caller's init is kept
    return mean, torch.full(shape, float(init_std), device=device, dtype=dtype)


def generator(problem: PlanningProblem, seed: int, g: torch.Generator | None) -> torch.Generator:
    """The planner's random stream: `g`, or a fresh one seeded with `seed` on the problem's device."""
    return g if g is not None else torch.Generator(problem.low.device).manual_seed(int(seed))


def elites(samples: torch.Tensor, cost: torch.Tensor, topk: int) -> torch.Tensor:
    """samples (B, S, T, A), cost (B, S) -> the `topk` cheapest samples (B, K, T, A)."""
    B, S, T, A = samples.shape
    idx = cost.topk(topk, dim=1, largest=False).indices  # (B, K)
    return samples.gather(1, idx[:, :, None, None].expand(B, topk, T, A))


class CEM:
    """Cross-entropy method over action sequences.

    Args:
        num_samples: S, sequences evaluated per iteration.
        topk: K, elites the Gaussian is refitted to.
        iterations: refits per plan.
        init_std: initial std (in the problem's action space; z-scored for a world model).
        min_std: floor on the refitted std.
        seed: seed of the sampling generator used when `plan` gets none.
    """

    name = "cem"

    def __init__(self, num_samples: int = 300, topk: int = 30, iterations: int = 30, init_std: float = 1.0,
                 min_std: float = 0.0, seed: int = 0):
        if not 2 <= topk <= num_samples:
            raise ValueError(f"need 2 <= topk <= num_samples (the refitted std needs two elites), got topk={topk}, "
                             f"num_samples={num_samples}")
        if iterations < 1 or not init_std > 0 or not min_std >= 0:
            raise ValueError(f"need iterations >= 1, init_std > 0 and min_std >= 0, got {iterations}, {init_std} "
                             f"and {min_std}")
        self.num_samples, self.topk, self.iterations = int(num_samples), int(topk), int(iterations)
        self.init_std, self.min_std, self.seed = float(init_std), float(min_std), int(seed)

    def settings(self) -> dict:
        return {"planner": self.name, "num_samples": self.num_samples, "topk": self.topk,
                "iterations": self.iterations, "init_std": self.init_std, "min_std": self.min_std, "seed": self.seed}

    def noise_shape(self, problem: PlanningProblem) -> tuple[int, ...]:
        """Shape of the standard-normal draws of one plan: (iterations, B, S, T, A)."""
        return (self.iterations, problem.batch_size, self.num_samples, problem.horizon, problem.action_dim)

    def plan(self, problem: PlanningProblem, init: torch.Tensor | None = None,
             g: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the final mean (B, T, A), clipped to the bounds.

        noise: optional pre-drawn standard-normal samples (iterations, B, S, T, A), used instead
            of drawing from `g` each iteration. With them the plan reads no generator, so a whole
            plan can be captured as one CUDA graph (`bench/plan_latency.py --graph`).
        """
        mean, std = start(problem, init, self.init_std)  # (B, T, A) each
        B, T, A = mean.shape
        S = self.num_samples
        if noise is not None and tuple(noise.shape) != self.noise_shape(problem):
            raise ValueError(f"noise must have shape (iterations, B, S, T, A) = {self.noise_shape(problem)}, "
                             f"got {tuple(noise.shape)}")
        g = generator(problem, self.seed, g) if noise is None else None
        for i in range(self.iterations):
            eps = (torch.randn((B, S, T, A), generator=g, device=mean.device, dtype=mean.dtype)
                   if noise is None else noise[i])
            samples = (mean[:, None] + std[:, None] * eps).clamp(problem.low, problem.high)  # (B, S, T, A)
            best = elites(samples, problem.cost(samples), self.topk)  # (B, K, T, A)
            mean, std = best.mean(1), best.std(1).clamp_min(self.min_std)  # (B, T, A) each
        return mean.clamp(problem.low, problem.high)
