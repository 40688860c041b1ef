"""iCEM (Pinneri et al., 2020): CEM with coloured noise, elite reuse, a shrinking population and momentum.

Example:
    >>> from leworld.planning import ICEM
    >>> actions = ICEM(num_samples=300, topk=30, iterations=10, beta=2.0).plan(problem)  # (B, T, A)

Differences from `CEM`: noise is correlated over the horizon with power spectrum 1/f^beta
(beta 0 is white noise); iteration i samples num_samples * decay^-i sequences (at least
2 * topk); a `keep_elites` fraction of the previous elites is re-evaluated with the new
samples; mean and std move with momentum; the mean is added as a sample in the last
iteration; the best sequence seen in any iteration is returned, not the mean.
"""
from __future__ import annotations

import torch

from leworld.planning.cem import elites, generator, start
from leworld.planning.problem import PlanningProblem


def coloured_filter(horizon: int, beta: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """(T, T) matrix L with unit-norm rows: L @ white noise over time has power spectrum ~ 1/f^beta."""
    freqs = torch.fft.rfftfreq(horizon, dtype=torch.float64)  # (T//2+1,)
    freqs[0] = freqs[1] if horizon > 1 else 1.0  # keep the mean component finite
    scale = freqs.pow(-beta / 2)  # amplitude ~ f^(-beta/2)
    spectrum = torch.fft.rfft(torch.eye(horizon, dtype=torch.float64), dim=0)  # (T//2+1, T)
    L = torch.fft.irfft(scale[:, None] * spectrum, n=horizon, dim=0)  # (T, T): circulant filter
    L = L / L.norm(dim=1, keepdim=True)  # unit variance per time step
    return L.to(device=device, dtype=dtype)


class ICEM:
    """Improved cross-entropy method.

    Args:
        num_samples: S in the first iteration.
        topk: K, elites per iteration.
        iterations: refits per plan.
        beta: noise colour exponent (0 white, 2 as the paper's default).
        decay: population shrink factor per iteration.
        keep_elites: fraction of the previous elites carried into the next iteration.
        momentum: weight of the old mean/std in each update.
        init_std, min_std, seed: as in `CEM`.
    """

    name = "icem"

    def __init__(self, num_samples: int = 300, topk: int = 30, iterations: int = 10, beta: float = 2.0,
                 decay: float = 1.25, keep_elites: float = 0.3, momentum: float = 0.1, init_std: float = 1.0,
                 min_std: float = 0.0, seed: int = 0):
        if not 2 <= topk <= num_samples or iterations < 1 or decay < 1 or not 0 <= keep_elites <= 1 \
                or not 0 <= momentum < 1 or not init_std > 0 or not min_std >= 0:
            raise ValueError("need 2 <= topk <= num_samples (the refitted std needs two elites), iterations >= 1, "
                             "decay >= 1, keep_elites in [0, 1], momentum in [0, 1), init_std > 0 and min_std >= 0; "
                             f"got topk={topk}, num_samples={num_samples}, iterations={iterations}, decay={decay}, "
                             f"keep_elites={keep_elites}, momentum={momentum}, init_std={init_std}, min_std={min_std}")
        self.num_samples, self.topk, self.iterations = int(num_samples), int(topk), int(iterations)
        self.beta, self.decay, self.keep_elites, self.momentum = float(beta), float(decay), float(keep_elites), float(momentum)
        self.init_std, self.min_std, self.seed = float(init_std), float(min_std), int(seed)

    def settings(self) -> dict:
        keys = ("num_samples", "topk", "iterations", "beta", "decay", "keep_elites", "momentum", "init_std",
                "min_std", "seed")
        return {"planner": self.name, **{k: getattr(self, k) for k in keys}}

    def plan(self, problem: PlanningProblem, init: torch.Tensor | None = None,
             g: torch.Generator | None = None) -> torch.Tensor:
        g = generator(problem, self.seed, g)
        mean, std = start(problem, init, self.init_std)  # (B, T, A)
        B, T, A = mean.shape
        L = coloured_filter(T, self.beta, mean.device, mean.dtype)  # (T, T)
        kept = mean.new_zeros(B, 0, T, A)  # elites carried over
        best, best_cost = mean.clone(), mean.new_full((B,), float("inf"))
        for i in range(self.iterations):
            S = max(2 * self.topk, round(self.num_samples * self.decay ** -i))
            white = torch.randn((B, S, A, T), generator=g, device=mean.device, dtype=mean.dtype)
            noise = (white @ L.T).transpose(2, 3)  # (B, S, T, A): coloured over T
            samples = (mean[:, None] + std[:, None] * noise).clamp(problem.low, problem.high)
            if i == self.iterations - 1:
                samples[:, 0] = mean  # last iteration: the mean competes
            samples = torch.cat([samples, kept], dim=1)  # (B, S + kept, T, A)
            cost = problem.cost(samples)  # (B, S')
            top = elites(samples, cost, self.topk)  # (B, K, T, A), cheapest first
            low_cost, low_idx = cost.min(1)  # (B,)
            better = low_cost < best_cost
            best = torch.where(better[:, None, None], samples[torch.arange(B, device=mean.device), low_idx], best)
            best_cost = torch.where(better, low_cost, best_cost)
            kept = top[:, : round(self.keep_elites * self.topk)]
            m = self.momentum
            mean = m * mean + (1 - m) * top.mean(1)
            std = (m * std + (1 - m) * top.std(1)).clamp_min(self.min_std)
        return best.clamp(problem.low, problem.high)
