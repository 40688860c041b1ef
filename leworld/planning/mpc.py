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

The policy is called every env step. When the queue of planned steps is empty it plans
`horizon` blocks from the last `history` frames, `frameskip` steps apart and ending with the
current one (as in the training clips), and the blocks executed between them; it queues the first
`replan_every` env steps of the plan (default: `receding_horizon` blocks, by default all of them,
as the paper), and hands them out one env step at a time, de-normalised and clipped to the action
bounds. All envs of the batch are planned together in one call.

`replan_every` below `frameskip` replans inside a block (step-level MPC): the plan still consists
of whole blocks, but only its first few env steps run before the next plan, whose context frames
are the current one and those `frameskip`, 2 `frameskip`, ... steps before it. The training clips
start at every env step, so such a context is no different from the one at a block boundary.

With a `deadline` (env steps, e.g. the protocol's budget) the plans shrink toward it: each plan
covers min(horizon, ceil(steps left / frameskip)) blocks, so its terminal cost asks for the goal
by the deadline instead of always `horizon` blocks ahead (shrinking-horizon MPC). Without it, a
planner that replans every block keeps the goal `horizon` blocks away and need never arrive.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from leworld.device import frames_to_tensor, synchronize
from leworld.planning.problem import COSTS, HeldActions, LatentProblem


class MPCPolicy:
    """Receding-horizon latent planning for a batch of envs.

    Args:
        model: a LeWorldModel (eval mode, frozen).
        planner: a planner with `plan(problem, init, g)` (CEM, MPPI, ICEM, GradientPlanner).
        horizon: T, action blocks per plan (paper 5).
        receding_horizon: blocks executed before replanning (default: horizon).
        replan_every: env steps executed before replanning, instead of `receding_horizon` blocks:
            any of 1 .. horizon * frameskip (below `frameskip`: replanning inside a block).
        hold_actions: search one action per block, held for its `frameskip` steps
            (`HeldActions`), instead of a free action at every step.
        cost: "terminal" (paper), "sum", "min" (the goal reached at any block of the plan) or
            "min_terminal" (reached, then kept); see `latent_cost`.
        action_low, action_high: the env's raw action bounds: numbers, or (A,) per action dimension.
        warm_start: start each plan from the unexecuted rest of the previous plan (zeros otherwise).
        compile: plan with a torch.compile'd rollout.
        compile_mode: torch.compile mode of that rollout, e.g. "reduce-overhead" (CUDA graphs: the
            fastest on a GPU, see docs/benchmarks.md); implies `compile`.
        amp: plan under bfloat16 autocast on CUDA (costs are still summed in float32); ignored on
            other devices, and `settings()` records whether it applied.
        device: where planning runs (default: the model's device).
        seed: seed of the planner's random stream, restarted by `reset`.
        deadline: env steps from `reset` by which the goal should be reached: plans shrink to the
            blocks left (at least one). None (default, the paper): every plan has `horizon` blocks.
    """

    def __init__(self, model, planner, horizon: int = 5, receding_horizon: int | None = None,
                 cost: str = "terminal", action_low=-1.0, action_high=1.0,
                 warm_start: bool = False, compile: bool = False, amp: bool = False, device=None, seed: int = 0,
                 compile_mode: str | None = None, deadline: int | None = None, replan_every: int | None = None,
                 hold_actions: bool = False):
        if int(horizon) < 1:
            raise ValueError(f"horizon counts action blocks per plan: at least 1, got {horizon}")
        if cost not in COSTS:
            raise ValueError(f"unknown cost {cost!r}: choose one of {', '.join(COSTS)}")
        if not callable(getattr(planner, "plan", None)):
            raise TypeError(f"planner must be a planner object (e.g. leworld.planning.CEM()), got {planner!r}")
        A = model.config.action_dim
        low, high = (torch.as_tensor(b, dtype=torch.float64) for b in (action_low, action_high))
        if low.ndim > 1 or high.ndim > 1 or low.numel() not in (1, A) or high.numel() not in (1, A):
            raise ValueError(f"action_low and action_high are numbers, or ({A},) per action dimension; got shapes "
                             f"{tuple(low.shape)} and {tuple(high.shape)}")
        if not bool((low < high).all()):
            raise ValueError(f"need action_low < action_high in every dimension, got {low.tolist()} and "
                             f"{high.tolist()}")
        if deadline is not None and int(deadline) < 1:
            raise ValueError(f"deadline must be a positive number of env steps or None, got {deadline}")
        self.deadline = None if deadline is None else int(deadline)
        if receding_horizon is not None and replan_every is not None:
            raise ValueError("give receding_horizon (blocks) or replan_every (env steps), not both: both say when "
                             "to replan")
        receding_horizon = horizon if receding_horizon is None else int(receding_horizon)
        if not 1 <= receding_horizon <= horizon:
            raise ValueError(f"need 1 <= receding_horizon <= horizon, got {receding_horizon} and {horizon}")
        fs = model.config.frameskip
        if replan_every is not None and not 1 <= int(replan_every) <= horizon * fs:
            raise ValueError(f"replan_every counts env steps: need 1 <= replan_every <= horizon * frameskip = "
                             f"{horizon * fs}, got {replan_every}")
        self.replan_every = receding_horizon * fs if replan_every is None else int(replan_every)
        if replan_every is not None:
            receding_horizon = max(1, self.replan_every // fs)
        if warm_start and self.replan_every >= horizon * fs:
            raise ValueError(f"warm_start starts each plan from the unexecuted rest of the previous one, but every "
                             f"plan runs to its end (replanning every {self.replan_every} env steps, a plan's "
                             f"{horizon * fs}): replan earlier (receding_horizon or replan_every), or drop warm_start")
        self.model, self.planner = model.eval().requires_grad_(False), planner
        self.horizon, self.receding_horizon, self.cost = int(horizon), receding_horizon, cost
        self.action_low, self.action_high = action_low, action_high
        self._raw_low, self._raw_high = low.expand(A).float(), high.expand(A).float()  # (A,) each, for clipping
        self.warm_start, self.seed = bool(warm_start), int(seed)
        self.hold_actions = bool(hold_actions)
        self.compile, self.compile_mode = bool(compile) or compile_mode is not None, compile_mode
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.amp = bool(amp) and self.device.type == "cuda"  # what the JSON records is what ran
        self.model.to(self.device)
        self._rollout = (torch.compile(model.rollout, dynamic=False, mode=compile_mode) if self.compile
                         else model.rollout)
        self.plan_seconds: list[float] = []  # wall time of every planning call (all envs together)
        self.plans = 0  # plans made (envs x calls)

    def settings(self) -> dict:
        """What a results file records. `seed` is the MPC's: its generator draws every plan's
        samples, so a seed given to the planner itself does not act here and is not recorded."""
        planner = {k: v for k, v in self.planner.settings().items() if k != "seed"}
        return {"horizon": self.horizon, "receding_horizon": self.receding_horizon,
                "replan_every": self.replan_every, "hold_actions": self.hold_actions, "cost": self.cost,
                "warm_start": self.warm_start, "compile": self.compile,
                "compile_mode": self.compile_mode, "amp": self.amp, "deadline": self.deadline, **planner,
                "seed": self.seed}

    def _encode(self, pixels) -> torch.Tensor:
        if getattr(pixels, "ndim", 0) != 4:
            raise ValueError(f"MPCPolicy takes a batched env (envs.make_batch) and its (N, H, W, 3) pixels, got "
                             f"shape {getattr(pixels, 'shape', None)}; a gymnasium env is one env: use "
                             "envs.make_batch(name, num_envs=1) instead")
        x = frames_to_tensor(pixels, self.device)  # (N, Hp, Wp, C) uint8
        return self.model.encode(x.permute(0, 3, 1, 2)[:, None])[:, 0]  # (N, D)

    @torch.no_grad()
    def reset(self, env) -> None:
        """Start new episodes: encode the env's goal images and clear the history."""
        if not hasattr(env, "goal_pixels"):
            raise TypeError(f"MPCPolicy plans on a batched env (envs.make_batch), got {type(env).__name__}")
        self.goal = self._encode(env.goal_pixels())  # (N, D)
        self.frames: dict[int, torch.Tensor] = {}  # env step -> embedding (N, D) of the frame seen then
        self.executed: list[torch.Tensor] = []  # normalised actions (N, A) of the last env steps, oldest first
        self.queue: list[torch.Tensor] = []  # planned normalised actions (N, A) still to execute
        self.rest: torch.Tensor | None = None  # the unexecuted tail of the last plan (N, steps, A)
        self.steps = 0  # env steps since reset
        self.g = torch.Generator(self.device).manual_seed(self.seed)

    def plan_horizon(self) -> int:
        """Blocks in the next plan: `horizon`, or fewer when the deadline is nearer."""
        if self.deadline is None:
            return self.horizon
        left = max(self.deadline - self.steps, 1)
        return max(1, min(self.horizon, -(-left // self.model.config.frameskip)))

    def context(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The predictor's context now: embeddings (N, h, D) of the frames `frameskip` steps apart that
        end with the current one, and the normalised blocks (N, h-1, frameskip*A) executed between them."""
        c = self.model.config
        fs = c.frameskip
        h = min(c.history, self.steps // fs + 1)
        context = torch.stack([self.frames[self.steps - (h - 1 - j) * fs] for j in range(h)], dim=1)
        if h == 1:
            return context, None
        acts = torch.stack(self.executed[len(self.executed) - (h - 1) * fs:], dim=1)  # (N, (h-1)*fs, A)
        return context, acts.reshape(acts.shape[0], h - 1, fs * c.action_dim)

    @torch.no_grad()
    def plan(self) -> torch.Tensor:
        """Plan from the current history; returns normalised blocks (N, T, frameskip*A), T = `plan_horizon()`."""
        horizon = self.plan_horizon()
        context, context_actions = self.context()
        problem = LatentProblem(self.model, context, self.goal, horizon, context_actions,
                                self.action_low, self.action_high, self.cost, self._rollout)
        init = None
        if self.warm_start and self.rest is not None:
            fs, A = self.model.config.frameskip, self.model.config.action_dim
            rest = self.rest[:, : horizon * fs]
            pad = rest.new_zeros(rest.shape[0], horizon * fs - rest.shape[1], A)
            init = torch.cat([rest, pad], 1).reshape(rest.shape[0], horizon, fs * A)
        if self.hold_actions:
            problem = HeldActions(problem, self.model.config.frameskip)
            init = None if init is None else problem.reduce(init)
        synchronize(self.device)  # CUDA and MPS run asynchronously: time the plan, not its queueing
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            blocks = self.planner.plan(problem, init, self.g)  # (N, T, fs*A), or (N, T, A) held
        if self.hold_actions:
            blocks = problem.expand(blocks)
        synchronize(self.device)
        self.plan_seconds.append(time.perf_counter() - t0)
        self.plans += blocks.shape[0]
        return blocks

    def _needs_frame(self) -> bool:
        """Whether the frame of this step can be a context frame of some plan."""
        return self.replan_every % self.model.config.frameskip != 0 or self.steps % self.model.config.frameskip == 0

    @torch.no_grad()
    def act(self, env, obs: dict) -> np.ndarray:
        """obs["pixels"] (N, Hp, Wp, C) uint8 -> raw actions (N, A) for the next env step."""
        if not hasattr(self, "goal"):
            raise RuntimeError("call policy.reset(env) before policy.act: it encodes the goal images")
        if len(obs["pixels"]) != len(self.goal):
            raise ValueError(f"obs holds {len(obs['pixels'])} envs but the policy was reset on {len(self.goal)}: "
                             "call policy.reset(env) with this env first")
        c = self.model.config
        fs = c.frameskip
        if self._needs_frame():
            self.frames[self.steps] = self._encode(obs["pixels"])
            oldest = self.steps - (c.history - 1) * fs
            for step in [k for k in self.frames if k < oldest]:
                del self.frames[step]
        if not self.queue:
            blocks = self.plan()  # (N, T, fs*A)
            steps = blocks.reshape(blocks.shape[0], -1, c.action_dim)  # (N, T*fs, A), step-major
            self.queue = list(steps[:, : self.replan_every].unbind(1))
            self.rest = steps[:, self.replan_every:]
        step = self.queue.pop(0)  # (N, A) normalised
        self.executed = (self.executed + [step])[-(c.history - 1) * fs:] if c.history > 1 else []
        raw = self.model.denormalize_actions(step)
        raw = raw.clamp(self._raw_low.to(raw), self._raw_high.to(raw))  # (N, A)
        self.steps += 1
        return raw.cpu().numpy()
