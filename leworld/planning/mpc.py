"""Goal-conditioned MPC: encode the goal once, plan `horizon` action blocks, execute some, replan.

Example:
    >>> import envs
    >>> from leworld import load_model
    >>> from leworld.planning import CEM, MPCPolicy
    >>> model = load_model("runs/tworoom_tiny/version_0/model")
    >>> env = envs.make_batch("tworoom", num_envs=8, resolution=64)
    >>> obs = env.reset(seed=0)
    >>> policy = MPCPolicy(model, CEM(iterations=10))
    >>> policy.reset(env)  # encodes env.goal_pixels()
    >>> for _ in range(50):
    ...     obs = env.step(policy.act(env, obs))  # (N, A) raw actions, one env step at a time

The policy is called every env step. At every `frameskip`-th step (a kept frame, as in the
training clips) it encodes the frame and appends it to the history; when the queue of planned
blocks is empty it plans `horizon` blocks from the last `history` frames and the blocks executed
between them, queues the first `receding_horizon` (default: all of them, as the paper), and
hands them out one env step at a time, de-normalised and clipped to the action bounds.
All envs of the batch are planned together in one call.

With a `deadline` (env steps, e.g. the protocol's budget) the plans shrink toward it: each plan
covers min(horizon, ceil(steps left / frameskip)) blocks, so its terminal cost asks for the goal
by the deadline instead of always `horizon` blocks ahead (shrinking-horizon MPC). Without it, a
planner that replans every block keeps the goal `horizon` blocks away and need never arrive.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from leworld.planning.problem import LatentProblem


class MPCPolicy:
    """Receding-horizon latent planning for a batch of envs.

    Args:
        model: a LeWorldModel (eval mode, frozen).
        planner: a planner with `plan(problem, init, g)` (CEM, MPPI, ICEM, GradientPlanner).
        horizon: T, action blocks per plan (paper 5).
        receding_horizon: blocks executed before replanning (default: horizon).
        cost: "terminal" (paper) or "sum".
        action_low, action_high: the env's raw action bounds.
        warm_start: start each plan from the unexecuted rest of the previous plan (zeros otherwise).
        compile: plan with a torch.compile'd rollout.
        compile_mode: torch.compile mode of that rollout, e.g. "reduce-overhead" (CUDA graphs: the
            fastest on a GPU, see docs/benchmarks.md); implies `compile`.
        amp: plan under bfloat16 autocast on CUDA (costs are still summed in float32).
        device: where planning runs (default: the model's device).
        seed: seed of the planner's random stream, restarted by `reset`.
        deadline: env steps from `reset` by which the goal should be reached: plans shrink to the
            blocks left (at least one). None (default, the paper): every plan has `horizon` blocks.
    """

    def __init__(self, model, planner, horizon: int = 5, receding_horizon: int | None = None,
                 cost: str = "terminal", action_low: float = -1.0, action_high: float = 1.0,
                 warm_start: bool = False, compile: bool = False, amp: bool = False, device=None, seed: int = 0,
                 compile_mode: str | None = None, deadline: int | None = None):
        if deadline is not None and int(deadline) < 1:
            raise ValueError(f"deadline must be a positive number of env steps or None, got {deadline}")
        self.deadline = None if deadline is None else int(deadline)
        receding_horizon = horizon if receding_horizon is None else int(receding_horizon)
        if not 1 <= receding_horizon <= horizon:
            raise ValueError(f"need 1 <= receding_horizon <= horizon, got {receding_horizon} and {horizon}")
        self.model, self.planner = model.eval().requires_grad_(False), planner
        self.horizon, self.receding_horizon, self.cost = int(horizon), receding_horizon, cost
        self.action_low, self.action_high = action_low, action_high
        self.warm_start, self.amp, self.seed = bool(warm_start), bool(amp), int(seed)
        self.compile, self.compile_mode = bool(compile) or compile_mode is not None, compile_mode
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self._rollout = (torch.compile(model.rollout, dynamic=False, mode=compile_mode) if self.compile
                         else model.rollout)
        self.plan_seconds: list[float] = []  # wall time of every planning call (all envs together)
        self.plans = 0  # plans made (envs x calls)

    def settings(self) -> dict:
        return {"horizon": self.horizon, "receding_horizon": self.receding_horizon, "cost": self.cost,
                "warm_start": self.warm_start, "compile": self.compile,
                "compile_mode": self.compile_mode, "amp": self.amp, "seed": self.seed,
                "deadline": self.deadline, **self.planner.settings()}

    def _encode(self, pixels) -> torch.Tensor:
        x = torch.as_tensor(np.ascontiguousarray(pixels), device=self.device)  # (N, Hp, Wp, C) uint8
        return self.model.encode(x.permute(0, 3, 1, 2)[:, None])[:, 0]  # (N, D)

    @torch.no_grad()
    def reset(self, env) -> None:
        """Start new episodes: encode the env's goal images and clear the history."""
        self.goal = self._encode(env.goal_pixels())  # (N, D)
        self.frames: list[torch.Tensor] = []  # kept-frame embeddings, each (N, D)
        self.blocks: list[torch.Tensor] = []  # executed normalised blocks, block i after frame i
        self.queue: list[torch.Tensor] = []  # planned blocks still to execute
        self.rest: torch.Tensor | None = None  # the unexecuted tail of the last plan
        self.step_in_block = 0
        self.steps = 0  # env steps since reset
        self.g = torch.Generator(self.device).manual_seed(self.seed)

    def plan_horizon(self) -> int:
        """Blocks in the next plan: `horizon`, or fewer when the deadline is nearer."""
        if self.deadline is None:
            return self.horizon
        left = max(self.deadline - self.steps, 1)
        return max(1, min(self.horizon, -(-left // self.model.config.frameskip)))

    @torch.no_grad()
    def plan(self) -> torch.Tensor:
        """Plan from the current history; returns normalised blocks (N, T, frameskip*A), T = `plan_horizon()`."""
        horizon = self.plan_horizon()
        h = min(len(self.frames), self.model.config.history)
        context = torch.stack(self.frames[-h:], dim=1)  # (N, h, D)
        context_actions = torch.stack(self.blocks[-(h - 1):], dim=1) if h > 1 else None  # (N, h-1, fs*A)
        problem = LatentProblem(self.model, context, self.goal, horizon, context_actions,
                                self.action_low, self.action_high, self.cost, self._rollout)
        init = None
        if self.warm_start and self.rest is not None:
            rest = self.rest[:, :horizon]
            pad = horizon - rest.shape[1]
            init = torch.cat([rest, rest.new_zeros(rest.shape[0], pad, rest.shape[2])], 1)
        sync = self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp and self.device.type == "cuda"):
            blocks = self.planner.plan(problem, init, self.g)  # (N, T, fs*A)
        if sync:
            torch.cuda.synchronize(self.device)
        self.plan_seconds.append(time.perf_counter() - t0)
        self.plans += blocks.shape[0]
        return blocks

    @torch.no_grad()
    def act(self, env, obs: dict) -> np.ndarray:
        """obs["pixels"] (N, Hp, Wp, C) uint8 -> raw actions (N, A) for the next env step."""
        c = self.model.config
        if self.step_in_block == 0:  # a kept frame
            self.frames.append(self._encode(obs["pixels"]))
            self.frames = self.frames[-c.history:]
            if not self.queue:
                blocks = self.plan()
                self.queue = list(blocks[:, : self.receding_horizon].unbind(1))
                self.rest = blocks[:, self.receding_horizon:]
            self.block = self.queue.pop(0)  # (N, fs*A) normalised
            self.blocks = (self.blocks + [self.block])[-c.history:]
            raw = self.model.denormalize_actions(self.block).clamp(self.action_low, self.action_high)
            self.raw_block = raw.view(-1, c.frameskip, c.action_dim).cpu().numpy()  # (N, fs, A)
        action = self.raw_block[:, self.step_in_block]
        self.step_in_block = (self.step_in_block + 1) % c.frameskip
        self.steps += 1
        return action
