"""What a planner optimises: a batch of action-sequence problems with a cost and box bounds.

Example:
    >>> import torch
    >>> from leworld.planning import CEM, LatentProblem
    >>> # model: a LeWorldModel; context (B, H, D) and goal (B, D) embeddings from model.encode
    >>> problem = LatentProblem(model, context, goal, horizon=5)
    >>> blocks = CEM(num_samples=300, topk=30, iterations=30).plan(problem)  # (B, T, frameskip*A), normalised

A planner sees only the `PlanningProblem` protocol: `batch_size` rows B, `horizon` T,
`action_dim` A (for a world model: one action block, frameskip * env action dim), the box
`low`/`high` (A,) in the planner's action space, and `cost(actions (B, S, T, A)) -> (B, S)`.
`LatentProblem` is the one for a LeWM: actions are z-scored blocks, the cost is the squared L2
distance between predicted and goal embeddings (terminal by default, summed over the horizon, or its minimum over the horizon).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

COSTS = ("terminal", "sum", "min", "min_terminal")


class PlanningProblem(Protocol):
    batch_size: int
    horizon: int
    action_dim: int
    low: torch.Tensor  # (A,)
    high: torch.Tensor  # (A,)

    def cost(self, actions: torch.Tensor) -> torch.Tensor:  # (B, S, T, A) -> (B, S)
        ...


def latent_cost(pred: torch.Tensor, goal: torch.Tensor, kind: str = "terminal") -> torch.Tensor:
    """pred (B, S, T, D), goal (B, D) -> (B, S): the squared L2 distance to the goal at the last block
    ("terminal"), summed over the T blocks ("sum"), its minimum over them ("min": the goal reached at
    any block) or that minimum plus the last block's ("min_terminal": reach the goal, then stay)."""
    dtype = torch.promote_types(pred.dtype, torch.float32)  # at least float32, also under autocast
    sq = (pred.to(dtype) - goal.to(dtype)[:, None, None]).square().sum(-1)  # (B, S, T)
    if kind == "terminal":
        return sq[..., -1]
    if kind == "sum":
        return sq.sum(-1)
    if kind == "min":  # the closest the plan comes to the goal at any block boundary
        return sq.amin(-1)
    if kind == "min_terminal":  # a plan that passes the goal and leaves it costs more than one that stays
        return sq.amin(-1) + sq[..., -1]
    raise ValueError(f"unknown cost {kind!r}: choose one of {', '.join(COSTS)}")


class LatentProblem:
    """Reach `goal` embeddings from `context` embeddings with `horizon` action blocks of a world model.

    Args:
        model: a world model with `rollout`, `normalize_actions` and `config` (action_dim, frameskip).
        context: (B, H, D) embeddings of the last H observed frames.
        goal: (B, D) goal embeddings (encode the goal image once per episode).
        horizon: T, action blocks per plan.
        context_actions: (B, H-1, frameskip*A) normalised blocks executed between context frames.
        action_low, action_high: the env's raw action bounds (A,), default [-1, 1]; turned into
            bounds on normalised blocks, so every evaluated sample is an executable action.
        cost: "terminal" (paper), "sum", "min" or "min_terminal" (`latent_cost`).
        rollout: the rollout function to call (e.g. a torch.compile'd `model.rollout`).
    """

    def __init__(self, model, context: torch.Tensor, goal: torch.Tensor, horizon: int = 5,
                 context_actions: torch.Tensor | None = None, action_low=-1.0, action_high=1.0,
                 cost: str = "terminal", rollout: Callable | None = None):
        if context.ndim != 3 or goal.ndim != 2 or goal.shape != (context.shape[0], context.shape[2]):
            raise ValueError(f"LatentProblem expects context (B, H, D) and goal (B, D), got "
                             f"{tuple(context.shape)} and {tuple(goal.shape)}")
        if cost not in COSTS:
            raise ValueError(f"unknown cost {cost!r}: choose one of {', '.join(COSTS)}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        c = model.config
        self.model, self.context, self.goal, self.context_actions = model, context, goal, context_actions
        self.batch_size, self.horizon = context.shape[0], int(horizon)
        self.action_dim = c.frameskip * c.action_dim
        self.kind = cost
        self._rollout = rollout or model.rollout
        step_low = torch.as_tensor(action_low, dtype=context.dtype, device=context.device).expand(c.action_dim)
        step_high = torch.as_tensor(action_high, dtype=context.dtype, device=context.device).expand(c.action_dim)
        self.low = model.normalize_actions(step_low.repeat(c.frameskip))  # (A,) in z-scored block space
        self.high = model.normalize_actions(step_high.repeat(c.frameskip))

    def predict(self, actions: torch.Tensor) -> torch.Tensor:
        """actions (B, S, T, A) -> predicted embeddings (B, S, T, D)."""
        return self._rollout(self.context, actions, self.context_actions)

    def cost(self, actions: torch.Tensor) -> torch.Tensor:
        """actions (B, S, T, A) -> (B, S)."""
        return latent_cost(self.predict(actions), self.goal, self.kind)


class HeldActions:
    """A block problem searched over one action per block, held for the block's `repeats` steps.

    The planner sees actions (B, S, T, A) with A = the env's action size; `cost` repeats each of
    them `repeats` times into the wrapped problem's blocks (B, S, T, repeats*A), step-major as the
    blocks are. The search space shrinks by `repeats`, and every sample is a block in which the
    agent is driven one way throughout, as by the scripted data policies, instead of white noise
    that changes direction at every env step.

    Args:
        problem: a `PlanningProblem` whose action blocks are `repeats` steps of equal size with
            the same bounds at every step (a `LatentProblem`: frameskip steps of the env's action).
        repeats: steps per block (the model's frameskip).
    """

    def __init__(self, problem: PlanningProblem, repeats: int):
        if repeats < 1 or problem.action_dim % repeats:
            raise ValueError(f"HeldActions needs blocks of `repeats` equal steps: action_dim "
                             f"{problem.action_dim} is not a multiple of {repeats}")
        A = problem.action_dim // repeats
        low, high = problem.low.view(repeats, A), problem.high.view(repeats, A)
        if not (torch.equal(low, low[:1].expand_as(low)) and torch.equal(high, high[:1].expand_as(high))):
            raise ValueError("HeldActions needs the same action bounds at every step of a block")
        self.problem, self.repeats = problem, int(repeats)
        self.batch_size, self.horizon, self.action_dim = problem.batch_size, problem.horizon, A
        self.low, self.high = low[0], high[0]

    def expand(self, actions: torch.Tensor) -> torch.Tensor:
        """(..., T, A) held actions -> (..., T, repeats*A) blocks."""
        return actions.repeat(*([1] * (actions.ndim - 1)), self.repeats)

    def reduce(self, blocks: torch.Tensor) -> torch.Tensor:
        """(..., T, repeats*A) blocks -> (..., T, A): each block's mean step (exact for held blocks)."""
        return blocks.unflatten(-1, (self.repeats, self.action_dim)).mean(-2)

    def cost(self, actions: torch.Tensor) -> torch.Tensor:
        """actions (B, S, T, A) -> (B, S)."""
        return self.problem.cost(self.expand(actions))
