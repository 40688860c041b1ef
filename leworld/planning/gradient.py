"""Gradient planner: Adam on the action sequence through the differentiable world model.

Example:
    >>> from leworld.planning import GradientPlanner
    >>> actions = GradientPlanner(num_samples=16, iterations=30, lr=0.1).plan(problem)  # (B, T, A)

`num_samples` sequences per problem start from init + init_std * noise (the first from init
itself) and are optimised in parallel; after each step they are projected back into the
bounds; the cheapest one is returned. The LeWM paper reports that gradient planners do much worse
than CEM on Push-T; it is here so planners can be compared on equal terms.
"""
from __future__ import annotations

import torch

from leworld.planning.cem import generator, start
from leworld.planning.problem import PlanningProblem


class GradientPlanner:
    """Projected Adam on (B, S, T, A) action sequences.

    Args:
        num_samples: S, parallel restarts per problem.
        iterations: Adam steps.
        lr: Adam learning rate (in the problem's action space).
        init_std: spread of the restarts around the initial mean.
        seed: seed of the restart generator used when `plan` gets none.
    """

    name = "gradient"

    def __init__(self, num_samples: int = 16, iterations: int = 30, lr: float = 0.1, init_std: float = 1.0,
                 seed: int = 0):
        if num_samples < 1 or iterations < 1 or lr <= 0 or init_std < 0:
            raise ValueError("need num_samples >= 1, iterations >= 1, lr > 0 and init_std >= 0")
        self.num_samples, self.iterations, self.lr = int(num_samples), int(iterations), float(lr)
        self.init_std, self.seed = float(init_std), int(seed)

    def settings(self) -> dict:
        return {"planner": self.name, "num_samples": self.num_samples, "iterations": self.iterations,
                "lr": self.lr, "init_std": self.init_std, "seed": self.seed}

    def plan(self, problem: PlanningProblem, init: torch.Tensor | None = None,
             g: torch.Generator | None = None) -> torch.Tensor:
        g = generator(problem, self.seed, g)
        mean, _ = start(problem, init, self.init_std)  # (B, T, A)
        B, T, A = mean.shape
        noise = torch.randn((B, self.num_samples, T, A), generator=g, device=mean.device, dtype=mean.dtype)
        noise[:, 0] = 0
        x = (mean[:, None] + self.init_std * noise).clamp(problem.low, problem.high)  # (B, S, T, A)
        m, v = torch.zeros_like(x), torch.zeros_like(x)  # Adam moments, written out: no host sync
        b1, b2, eps = 0.9, 0.999, 1e-8
        with torch.enable_grad():
            for t in range(1, self.iterations + 1):
                x.requires_grad_(True)
                # rows are independent, so the gradient of the sum is each row's own; grad() leaves
                # the model parameters' .grad untouched
                (grad,) = torch.autograd.grad(problem.cost(x).sum(), [x])
                with torch.no_grad():
                    m = b1 * m + (1 - b1) * grad
                    v = b2 * v + (1 - b2) * grad.square()
                    step = self.lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
                    x = (x.detach() - step).clamp(problem.low, problem.high)  # projected step
        with torch.no_grad():
            cost = problem.cost(x)  # (B, S)
            idx = cost.argmin(1)  # (B,)
            return x.detach()[torch.arange(B, device=x.device), idx]
