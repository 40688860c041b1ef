"""Latent planners behind one small interface, and the goal-conditioned MPC policy.

Example:
    >>> from leworld.planning import make_planner, MPCPolicy
    >>> planner = make_planner("cem", num_samples=300, topk=30, iterations=30)
    >>> policy = MPCPolicy(model, planner, horizon=5)

Every planner has `plan(problem, init=None, g=None) -> (B, T, A)` and `settings() -> dict`;
`problem` follows `leworld.planning.problem.PlanningProblem`.
"""
from leworld.planning.cem import CEM
from leworld.planning.gradient import GradientPlanner
from leworld.planning.icem import ICEM
from leworld.planning.mpc import MPCPolicy
from leworld.planning.mppi import MPPI
from leworld.planning.problem import LatentProblem, PlanningProblem, latent_cost

PLANNERS = {"cem": CEM, "mppi": MPPI, "icem": ICEM, "gradient": GradientPlanner}

__all__ = ["CEM", "MPPI", "ICEM", "GradientPlanner", "MPCPolicy", "LatentProblem", "PlanningProblem",
           "latent_cost", "PLANNERS", "make_planner"]


def make_planner(name: str, **kwargs):
    """Build a planner by name ("cem", "mppi", "icem", "gradient") with its keyword settings."""
    if name not in PLANNERS:
        raise ValueError(f"unknown planner {name!r}: choose one of {', '.join(PLANNERS)}")
    return PLANNERS[name](**kwargs)
