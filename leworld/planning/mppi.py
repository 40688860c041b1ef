"""MPPI: a softmin-weighted average of sampled sequences (Williams et al., information-theoretic MPC).

Example:
    >>> from leworld.planning import MPPI
    >>> actions = MPPI(num_samples=300, iterations=30, temperature=0.5).plan(problem)  # (B, T, A)

Weights are softmax(-(cost - min cost) / (temperature * std of the costs)) per problem, so the
temperature is in units of the current spread of costs and needs no retuning per model. The
sampling std also adapts: it is refitted as the weighted std of the samples.
"""
from __future__ import annotations

import torch

from leworld.planning.cem import generator, start
from leworld.planning.problem import PlanningProblem


class MPPI:
    """Model-predictive path integral planner.

    Args:
        num_samples: S, sequences per iteration.
        iterations: weighted refits per plan.
        temperature: softmin temperature in units of the per-problem cost std.
        init_std: initial sampling std.
        min_std: floor on the refitted std.
        seed: seed of the sampling generator used when `plan` gets none.
    """

    name = "mppi"

    def __init__(self, num_samples: int = 300, iterations: int = 30, temperature: float = 0.5,
                 init_std: float = 1.0, min_std: float = 0.05, seed: int = 0):
        if num_samples < 2 or iterations < 1 or temperature <= 0 or init_std <= 0:
            raise ValueError("need num_samples >= 2, iterations >= 1, temperature > 0 and init_std > 0, got "
                             f"{num_samples}, {iterations}, {temperature}, {init_std}")
        self.num_samples, self.iterations, self.temperature = int(num_samples), int(iterations), float(temperature)
        self.init_std, self.min_std, self.seed = float(init_std), float(min_std), int(seed)

    def settings(self) -> dict:
        return {"planner": self.name, "num_samples": self.num_samples, "iterations": self.iterations,
                "temperature": self.temperature, "init_std": self.init_std, "min_std": self.min_std,
                "seed": self.seed}

    def plan(self, problem: PlanningProblem, init: torch.Tensor | None = None,
             g: torch.Generator | None = None) -> torch.Tensor:
        g = generator(problem, self.seed, g)
        mean, std = start(problem, init, self.init_std)  # (B, T, A)
        B, T, A = mean.shape
        for _ in range(self.iterations):
            noise = torch.randn((B, self.num_samples, T, A), generator=g, device=mean.device, dtype=mean.dtype)
            samples = (mean[:, None] + std[:, None] * noise).clamp(problem.low, problem.high)  # (B, S, T, A)
            samples[:, 0] = mean  # the current mean competes too
            cost = problem.cost(samples)  # (B, S)
            scale = self.temperature * cost.std(1, keepdim=True).clamp_min(1e-12)  # (B, 1)
            w = torch.softmax(-(cost - cost.amin(1, keepdim=True)) / scale, dim=1)[:, :, None, None]  # (B, S, 1, 1)
            mean = (w * samples).sum(1)  # (B, T, A)
            std = (w * (samples - mean[:, None]).square()).sum(1).sqrt().clamp_min(self.min_std)
        return mean.clamp(problem.low, problem.high)
