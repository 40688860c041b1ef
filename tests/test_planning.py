"""Planners: convergence on a known quadratic, action bounds, determinism, no host sync, MPC history."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from leworld.model import LeWMConfig, LeWorldModel
from leworld.planning import CEM, ICEM, MPPI, GradientPlanner, LatentProblem, MPCPolicy, latent_cost, make_planner
from leworld.planning.problem import HeldActions

PLANNER_KW = {
    "cem": dict(num_samples=200, topk=20, iterations=30),
    "mppi": dict(num_samples=200, iterations=30),
    "icem": dict(num_samples=200, topk=20, iterations=20),
    "gradient": dict(num_samples=8, iterations=150, lr=0.05),
}


class Quadratic:
    """cost = sum over T of (a - target)^T W (a - target), minimum at `target` (B, T, A)."""

    def __init__(self, target: torch.Tensor, low: float = -3.0, high: float = 3.0, weights=None):
        self.target = target
        self.batch_size, self.horizon, self.action_dim = target.shape
        self.low = torch.full((self.action_dim,), low, dtype=target.dtype)
        self.high = torch.full((self.action_dim,), high, dtype=target.dtype)
        self.weights = torch.ones(self.action_dim, dtype=target.dtype) if weights is None else weights
        self.seen: list[torch.Tensor] = []

    def cost(self, actions: torch.Tensor) -> torch.Tensor:  # (B, S, T, A) -> (B, S)
        self.seen.append(actions.detach().clone())
        return ((actions - self.target[:, None]).square() * self.weights).sum((-1, -2))


@pytest.mark.parametrize("name", sorted(PLANNER_KW))
def test_planner_converges_on_quadratic(name):
    g = torch.Generator().manual_seed(1)
    target = torch.rand((3, 4, 2), generator=g) * 2 - 1  # (B, T, A) inside the bounds
    problem = Quadratic(target, weights=torch.tensor([1.0, 4.0]))
    out = make_planner(name, **PLANNER_KW[name]).plan(problem)
    assert out.shape == target.shape
    tol = 0.05 if name in ("cem", "gradient") else 0.15
    err = (out - target).abs().max().item()
    assert err < tol, f"{name}: max error {err:.3f} to the known minimum"
    # far better than the initial mean (zeros)
    assert problem.cost(out[:, None]).max() < 0.05 * problem.cost(torch.zeros_like(out)[:, None]).min()


@pytest.mark.parametrize("name", sorted(PLANNER_KW))
def test_planner_respects_bounds(name):
    target = torch.full((2, 3, 4), 5.0)  # the unconstrained minimum is outside [-1, 0.5]
    target[1] = -5.0
    problem = Quadratic(target, low=-1.0, high=0.5)
    out = make_planner(name, **PLANNER_KW[name]).plan(problem)
    evaluated = torch.cat([s.flatten(0, 2) for s in problem.seen])  # every action the planner evaluated
    assert (evaluated >= -1.0 - 1e-6).all() and (evaluated <= 0.5 + 1e-6).all()
    assert (out >= -1.0 - 1e-6).all() and (out <= 0.5 + 1e-6).all()
    # the constrained optimum is the nearest bound
    assert torch.allclose(out[0], torch.full_like(out[0], 0.5), atol=0.05)
    assert torch.allclose(out[1], torch.full_like(out[1], -1.0), atol=0.05)


@pytest.mark.parametrize("name", sorted(PLANNER_KW))
def test_planner_is_deterministic_for_a_seed(name):
    target = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(0))
    a = make_planner(name, seed=3, **PLANNER_KW[name]).plan(Quadratic(target))
    b = make_planner(name, seed=3, **PLANNER_KW[name]).plan(Quadratic(target))
    c = make_planner(name, seed=4, **PLANNER_KW[name]).plan(Quadratic(target))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cem_matches_a_direct_single_problem_loop():
    """Batched CEM over B problems equals the textbook update (topk elites, mean/std refit) per row."""
    target = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    planner = CEM(num_samples=50, topk=5, iterations=4, seed=0)
    out = planner.plan(Quadratic(target))
    g = torch.Generator().manual_seed(0)
    mean, std = torch.zeros_like(target), torch.ones_like(target)
    for _ in range(4):
        noise = torch.randn((2, 50, 3, 2), generator=g, dtype=torch.float64)
        for b in range(2):
            samples = (mean[b] + std[b] * noise[b]).clamp(-3, 3)  # (S, T, A)
            cost = [float(((s - target[b]) ** 2).sum()) for s in samples]
            order = np.argsort(cost, kind="stable")[:5]
            e = samples[torch.as_tensor(order)]
            mean[b], std[b] = e.mean(0), e.std(0)
    assert torch.allclose(out, mean.clamp(-3, 3), atol=1e-12)


def test_cem_std_floor_holds_on_a_sharp_minimum():
    """With min_std the refitted std never falls below the floor, so the last iteration's samples
    still spread by about the floor around the mean (without it they collapse onto the minimum)."""
    target = torch.zeros(1, 2, 2, dtype=torch.float64)
    spreads = {}
    for floor in (0.0, 0.3):
        problem = Quadratic(target, low=-10.0, high=10.0)
        CEM(num_samples=400, topk=40, iterations=15, min_std=floor, seed=0).plan(problem)
        spreads[floor] = float(problem.seen[-1].std(1).min())  # the last samples' spread, per (T, A)
    assert spreads[0.0] < 0.05
    assert 0.27 < spreads[0.3] < 0.33


def reference_mppi(target, num_samples, iterations, temperature, init_std, min_std, seed, low=-3.0, high=3.0):
    """MPPI from its definition, one problem and one sample at a time in float64 (math.exp weights)."""
    B, T, A = target.shape
    g = torch.Generator().manual_seed(seed)
    mean, std = torch.zeros_like(target), torch.full_like(target, init_std)
    floored = False  # whether the floor lifted a std that later iterations sample with
    for i in range(iterations):
        noise = torch.randn((B, num_samples, T, A), generator=g, dtype=torch.float64)
        for b in range(B):
            samples = [mean[b].clone()] + [(mean[b] + std[b] * noise[b, s]).clamp(low, high)
                                           for s in range(1, num_samples)]  # sample 0: the current mean
            cost = [float(((x - target[b]) ** 2).sum()) for x in samples]
            spread = float(np.std(cost, ddof=1))
            raw = [math.exp(-(c - min(cost)) / (temperature * spread)) for c in cost]
            w = [r / math.fsum(raw) for r in raw]
            new_mean = sum(wi * x for wi, x in zip(w, samples))
            var = sum(wi * (x - new_mean) ** 2 for wi, x in zip(w, samples))
            floored |= i < iterations - 1 and bool((var.sqrt() < min_std).any())
            mean[b], std[b] = new_mean, var.sqrt().clamp_min(min_std)
    return mean.clamp(low, high), floored


@pytest.mark.parametrize("temperature, min_std", [(0.5, 0.05), (2.0, 0.3)])
def test_mppi_matches_its_definition(temperature, min_std):
    """Softmin weights in units of the cost spread, weighted mean and std, the std floor, the mean
    competing as sample 0: against a per-sample loop. The floor binds in both cases."""
    target = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = MPPI(num_samples=40, iterations=12, temperature=temperature, min_std=min_std, seed=2).plan(Quadratic(target))
    want, floored = reference_mppi(target, 40, 12, temperature, 1.0, min_std, 2)
    assert floored
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def reference_coloured_filter(T: int, beta: float) -> torch.Tensor:
    """L (T, T) with L @ w the circular convolution of w with h, where h has the real DFT
    amplitudes |f|^(-beta/2) (the zero frequency given the lowest nonzero one's), rows scaled to norm 1."""
    freq = [min(k, T - k) / T for k in range(T)]
    amp = [(f if k else freq[1] if T > 1 else 1.0) ** (-beta / 2) for k, f in enumerate(freq)]
    h = [math.fsum(amp[k] * math.cos(2 * math.pi * k * n / T) for k in range(T)) / T for n in range(T)]
    L = torch.tensor([[h[(t - s) % T] for s in range(T)] for t in range(T)], dtype=torch.float64)
    return L / L.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("T", [1, 2, 5, 8])
def test_icem_noise_filter_is_pink_with_unit_variance(T):
    from leworld.planning.icem import coloured_filter
    torch.testing.assert_close(coloured_filter(T, 0.0, dtype=torch.float64), torch.eye(T, dtype=torch.float64))
    L = coloured_filter(T, 2.0, dtype=torch.float64)
    torch.testing.assert_close(L, reference_coloured_filter(T, 2.0), rtol=0, atol=1e-12)
    if T > 1:  # the filter's amplitude at frequency k/T falls as (k/T)^(-beta/2): 1/f power
        response = torch.fft.rfft(L[0].flip(0).roll(1))  # (T//2+1,) DFT of the kernel h
        k = torch.arange(1, T // 2 + 1, dtype=torch.float64)
        torch.testing.assert_close(response.abs()[1:] / response.abs()[1], 1 / k, rtol=1e-12, atol=0)
        assert float(response.abs()[0]) == pytest.approx(float(response.abs()[1]), rel=1e-12)
        assert float(response.imag.abs().max()) < 1e-12  # a symmetric kernel: no phase shift


def reference_icem(target, S0, K, iterations, beta, decay, keep, m, init_std, min_std, seed, low=-3.0, high=3.0):
    """iCEM from its description, one problem at a time in float64: coloured noise, population
    S0 * decay^-i (at least 2K), the cheapest keep*K elites carried over, momentum, the mean as a
    sample in the last iteration, and the cheapest sequence ever evaluated returned."""
    B, T, A = target.shape
    g = torch.Generator().manual_seed(seed)
    L = reference_coloured_filter(T, beta)
    mean, std = torch.zeros_like(target), torch.full_like(target, init_std)
    kept = [[] for _ in range(B)]
    best, best_cost = [None] * B, [math.inf] * B
    sizes = []
    for i in range(iterations):
        S = max(2 * K, round(S0 * decay ** -i))
        sizes.append(S)
        white = torch.randn((B, S, A, T), generator=g, dtype=torch.float64)
        for b in range(B):
            samples = [(mean[b] + std[b] * (L @ white[b, s].T)).clamp(low, high) for s in range(S)]  # (T, A) each
            if i == iterations - 1:
                samples[0] = mean[b].clone()
            samples += kept[b]
            cost = [float(((x - target[b]) ** 2).sum()) for x in samples]
            order = np.argsort(cost, kind="stable")
            if cost[order[0]] < best_cost[b]:
                best[b], best_cost[b] = samples[order[0]], cost[order[0]]
            top = torch.stack([samples[j] for j in order[:K]])
            kept[b] = [samples[j] for j in order[:round(keep * K)]]
            mean[b] = m * mean[b] + (1 - m) * top.mean(0)
            std[b] = (m * std[b] + (1 - m) * top.std(0)).clamp_min(min_std)
    return torch.stack(best).clamp(low, high), sizes


def test_icem_matches_its_definition():
    target = torch.randn(2, 5, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    kw = dict(num_samples=60, topk=6, iterations=6, beta=2.0, decay=1.5, keep_elites=0.5, momentum=0.2,
              init_std=1.0, min_std=0.15, seed=4)
    problem = Quadratic(target)
    out = ICEM(**kw).plan(problem)
    want, sizes = reference_icem(target, 60, 6, 6, 2.0, 1.5, 0.5, 0.2, 1.0, 0.15, 4)
    assert sizes == [60, 40, 27, 18, 12, 12]  # shrinking population with its floor of 2K
    kept = [0] + [3] * 5  # 0.5 * 6 elites carried into every iteration after the first
    assert [s.shape[1] for s in problem.seen] == [n + k for n, k in zip(sizes, kept)]
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("S", [1, 6])
def test_gradient_planner_equals_torch_adam_with_projection(S):
    """Projected Adam, written with torch.optim.Adam per problem; the cheapest restart is returned
    (few steps, so the restarts still differ), and restart 0 starts from `init`."""
    target = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    init = torch.full_like(target, 0.5)
    steps, lr, low, high = 4, 0.2, -1.0, 1.0
    out = GradientPlanner(num_samples=S, iterations=steps, lr=lr, init_std=0.8, seed=3).plan(
        Quadratic(target, low=low, high=high), init=init)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn((2, S, 3, 2), generator=g, dtype=torch.float64)
    noise[:, 0] = 0
    x = torch.nn.Parameter((init[:, None] + 0.8 * noise).clamp(low, high))  # (B, S, T, A)
    opt = torch.optim.Adam([x], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(steps):
        opt.zero_grad()
        ((x - target[:, None]) ** 2).sum().backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(low, high)
    cost = ((x.detach() - target[:, None]) ** 2).sum((-1, -2))  # (B, S)
    assert len(set(cost[0].tolist())) == S  # the restarts have not met yet
    want = torch.stack([x.detach()[b, int(cost[b].argmin())] for b in range(2)])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


def test_cem_with_predrawn_noise_equals_drawing_each_iteration():
    """`plan(noise=...)` with the generator's own draws gives the same plan; a wrong shape is refused."""
    target = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    planner = CEM(num_samples=50, topk=5, iterations=4, seed=0)
    problem = Quadratic(target)
    g = torch.Generator().manual_seed(7)
    noise = torch.stack([torch.randn((2, 50, 3, 2), generator=g, dtype=torch.float64) for _ in range(4)])
    assert planner.noise_shape(problem) == tuple(noise.shape)
    want = planner.plan(problem, g=torch.Generator().manual_seed(7))
    assert torch.equal(planner.plan(problem, noise=noise), want)
    assert not torch.equal(planner.plan(problem, noise=noise.flip(0)), want)
    with pytest.raises(ValueError, match="noise must have shape"):
        planner.plan(problem, noise=noise[:3])


def test_latent_cost_terminal_sum_min_and_min_terminal():
    pred = torch.randn(2, 3, 4, 5, dtype=torch.float64)  # (B, S, T, D)
    goal = torch.randn(2, 5, dtype=torch.float64)
    brute = torch.tensor([[[float(((pred[b, s, t] - goal[b]) ** 2).sum()) for t in range(4)] for s in range(3)]
                          for b in range(2)], dtype=torch.float64)
    assert torch.allclose(latent_cost(pred, goal, "terminal"), brute[..., -1])
    assert torch.allclose(latent_cost(pred, goal, "sum"), brute.sum(-1))
    lowest = torch.tensor([[min(brute[b, s].tolist()) for s in range(3)] for b in range(2)], dtype=torch.float64)
    assert torch.allclose(latent_cost(pred, goal, "min"), lowest)
    assert torch.allclose(latent_cost(pred, goal, "min_terminal"), lowest + brute[..., -1])
    # a plan through the goal that then leaves it costs more than one that stays: only min_terminal says so
    leaves = torch.stack([torch.zeros(2), torch.full((2,), 3.0)])[None, None]  # (1, 1, T=2, D=2)
    stays = torch.stack([torch.ones(2), torch.zeros(2)])[None, None]
    both, origin = torch.cat([leaves, stays], 1), torch.zeros(1, 2)
    assert latent_cost(both, origin, "min")[0, 0] == latent_cost(both, origin, "min")[0, 1]
    assert latent_cost(both, origin, "min_terminal")[0, 0] > latent_cost(both, origin, "min_terminal")[0, 1]
    with pytest.raises(ValueError, match="unknown cost"):
        latent_cost(pred, goal, "max")


def tiny_model(history: int = 2) -> LeWorldModel:
    torch.manual_seed(0)
    cfg = LeWMConfig(encoder="cnn", image_size=32, cnn_channels=(8, 16, 16), enc_width=32, embed_dim=16,
                     proj_hidden=32, history=history, pred_depth=1, pred_heads=2, pred_head_dim=8, pred_mlp=32,
                     action_hidden=16, action_dim=2, frameskip=3)
    model = LeWorldModel(cfg).eval()
    with torch.no_grad():  # off its initialisation, whose zeroed action conditioning ignores actions
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.set_action_stats(torch.tensor([0.2, -0.1]), torch.tensor([0.5, 0.25]))
    return model


def test_the_tiny_test_model_predicts_from_actions():
    """The planners' tests mean something only if a plan's samples cost differently."""
    model = tiny_model()
    problem = LatentProblem(model, torch.randn(2, 2, 16), torch.randn(2, 16), horizon=3)
    samples = torch.randn(2, 8, problem.horizon, problem.action_dim)
    with torch.no_grad():
        cost = problem.cost(samples)  # (2, 8)
    assert (cost.std(1) > 1e-3 * cost.abs().mean(1)).all()


def test_latent_problem_bounds_are_the_env_bounds_in_normalised_space():
    model = tiny_model()
    problem = LatentProblem(model, torch.zeros(3, 2, 16), torch.zeros(3, 16), horizon=4)
    raw_low = model.denormalize_actions(problem.low)
    raw_high = model.denormalize_actions(problem.high)
    assert problem.action_dim == 6
    assert torch.allclose(raw_low, torch.full((6,), -1.0)) and torch.allclose(raw_high, torch.full((6,), 1.0))
    out = CEM(num_samples=16, topk=4, iterations=2).plan(problem)
    raw = model.denormalize_actions(out)
    assert out.shape == (3, 4, 6) and raw.abs().max() <= 1 + 1e-5


def test_latent_problem_bounds_differ_per_action_dimension():
    """A block holds frameskip steps of A numbers, step after step: per-dimension bounds repeat per step."""
    model = tiny_model()  # action_dim 2, frameskip 3
    problem = LatentProblem(model, torch.zeros(1, 2, 16), torch.zeros(1, 16), horizon=2,
                            action_low=[-1.0, -2.0], action_high=[1.0, 0.5])
    want_low, want_high = torch.tensor([-1.0, -2.0] * 3), torch.tensor([1.0, 0.5] * 3)
    mean, std = torch.tensor([0.2, -0.1] * 3), torch.tensor([0.5, 0.25] * 3)  # the model's action stats
    torch.testing.assert_close(problem.low, (want_low - mean) / std)
    torch.testing.assert_close(problem.high, (want_high - mean) / std)
    raw = model.denormalize_actions(CEM(num_samples=32, topk=4, iterations=2).plan(problem)).view(2, 3, 2)
    assert (raw[..., 0].abs() <= 1 + 1e-5).all() and (raw[..., 1] >= -2 - 1e-5).all() and (raw[..., 1] <= 0.5 + 1e-5).all()


def test_latent_problem_rejects_bad_shapes():
    model = tiny_model()
    with pytest.raises(ValueError, match="context"):
        LatentProblem(model, torch.zeros(3, 16), torch.zeros(3, 16))
    with pytest.raises(ValueError, match="unknown cost"):
        LatentProblem(model, torch.zeros(3, 2, 16), torch.zeros(3, 16), cost="max")
    with pytest.raises(ValueError, match="unknown planner"):
        make_planner("rrt")


class FakeEnv:
    """Random frames; the goal images are a fixed random batch."""

    def __init__(self, n: int, size: int = 32, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.n, self.size = n, size
        self.goal = self.rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)

    def goal_pixels(self):
        return self.goal

    def obs(self):
        return {"pixels": self.rng.integers(0, 256, (self.n, self.size, self.size, 3), dtype=np.uint8)}


class RecordingCEM(CEM):
    """CEM that keeps every call's problem, a copy of its warm start and a copy of the plan it returned."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.problems, self.inits, self.plans = [], [], []

    def plan(self, problem, init=None, g=None):
        self.problems.append(problem)
        self.inits.append(None if init is None else init.clone())
        out = super().plan(problem, init, g)
        self.plans.append(out.clone())
        return out

    def contexts(self):
        """(context, context actions, warm start) of every call."""
        return [(p.context, p.context_actions, init) for p, init in zip(self.problems, self.inits)]


def test_mpc_after_a_reset_acts_as_a_fresh_policy():
    """Every reset restarts the planner's random stream: a second run of the same episodes with the
    same policy object gives the actions of the first."""
    model = tiny_model(history=2)
    policy = MPCPolicy(model, CEM(num_samples=8, topk=2, iterations=2), horizon=2, receding_horizon=1,
                       warm_start=True, seed=4)
    runs = []
    for _ in range(2):
        env = FakeEnv(3, seed=1)  # the same frames both times
        policy.reset(env)
        runs.append(np.stack([policy.act(env, env.obs()) for _ in range(8)]))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert len(policy.plan_seconds) > 0 and np.abs(runs[0]).max() > 0


@pytest.mark.parametrize("to_bounds", [np.array, torch.tensor, list])
def test_mpc_takes_action_bounds_per_dimension_and_clips_every_action_to_them(to_bounds):
    """Per-dimension bounds reach the planner (every evaluated sample inside them, in raw units)
    and the executed actions; bounds of the wrong shape or order are a clear error."""
    model = tiny_model(history=2)
    low, high = [-1.0, -0.05], [0.05, 1.0]
    planner = RecordingCEM(num_samples=8, topk=2, iterations=2)
    policy = MPCPolicy(model, planner, horizon=2, action_low=to_bounds(low), action_high=to_bounds(high), seed=1)
    env = FakeEnv(3, seed=1)
    policy.reset(env)
    actions = np.stack([policy.act(env, env.obs()) for _ in range(12)])  # (steps, N, A)
    assert (actions >= np.array(low) - 1e-6).all() and (actions <= np.array(high) + 1e-6).all()
    assert np.isclose(actions[..., 0], 0.05).any() and np.isclose(actions[..., 1], -0.05).any()  # clipped at both
    for problem in planner.problems:
        raw_low, raw_high = (model.denormalize_actions(b).view(-1, 2) for b in (problem.low, problem.high))
        torch.testing.assert_close(raw_low, torch.tensor([low] * 3), rtol=0, atol=1e-6)
        torch.testing.assert_close(raw_high, torch.tensor([high] * 3), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"numbers, or \(2,\) per action dimension; got shapes \(3,\) and \(\)"):
        MPCPolicy(model, CEM(), action_low=to_bounds([-1.0, -1.0, -1.0]), action_high=1.0)
    with pytest.raises(ValueError, match=r"action_low < action_high in every dimension, got \[-1.0, 1.0\]"):
        MPCPolicy(model, CEM(), action_low=to_bounds([-1.0, 1.0]), action_high=to_bounds([1.0, 1.0]))


def test_mpc_times_each_plan_between_two_device_synchronisations(monkeypatch):
    """CUDA and MPS queue work: every plan's clock starts and stops on a synchronised device (the
    one leworld.device.synchronize waits for, MPS included)."""
    import leworld.planning.mpc as mpc

    events, devices = [], []
    real_clock = mpc.time.perf_counter

    def synchronize(device):
        devices.append(torch.device(device))
        events.append("sync")

    def clock():
        events.append("clock")
        return real_clock()

    class Recording(CEM):
        def plan(self, *args, **kwargs):
            events.append("plan")
            return super().plan(*args, **kwargs)

    monkeypatch.setattr(mpc, "synchronize", synchronize)
    monkeypatch.setattr(mpc.time, "perf_counter", clock)
    policy = MPCPolicy(tiny_model(history=2), Recording(num_samples=8, topk=2, iterations=1), horizon=2)
    env = FakeEnv(2)
    policy.reset(env)
    for _ in range(12):  # two plans of 2 blocks x 3 steps
        policy.act(env, env.obs())
    monkeypatch.undo()
    assert events == ["sync", "clock", "plan", "sync", "clock"] * 2 and len(policy.plan_seconds) == 2
    assert devices == [torch.device("cpu")] * 4


def test_mpc_keeps_history_and_replans_every_receding_horizon():
    model = tiny_model(history=2)
    planner = RecordingCEM(num_samples=8, topk=2, iterations=1)
    env = FakeEnv(4)
    policy = MPCPolicy(model, planner, horizon=3, receding_horizon=2, warm_start=True)
    policy.reset(env)
    frames, actions = [], []
    for step in range(13):
        obs = env.obs()
        if step % 3 == 0:
            frames.append(obs["pixels"])
        a = policy.act(env, obs)
        assert a.shape == (4, 2) and np.abs(a).max() <= 1.0
        actions.append(a)
    # kept frames at steps 0, 3, 6, 9, 12; plans at kept frames 0, 2, 4 (every 2 blocks)
    calls = planner.contexts()
    assert len(calls) == 3 and len(policy.plan_seconds) == 3 and policy.plans == 12
    with torch.no_grad():
        emb = [model.encode(torch.as_tensor(f).permute(0, 3, 1, 2)[:, None])[:, 0] for f in frames]
    ctx0, act0, init0 = calls[0]
    assert ctx0.shape == (4, 1, 16) and act0 is None and init0 is None
    ctx1, act1, init1 = calls[1]
    assert torch.allclose(ctx1, torch.stack(emb[1:3], 1), atol=1e-6)  # frames 1 and 2: the last `history`
    executed = torch.as_tensor(np.stack(actions[3:6], 1).reshape(4, 6))  # block after kept frame 1, raw
    assert torch.allclose(model.denormalize_actions(act1[:, 0]), executed, atol=1e-5)
    assert init1 is not None and init1.shape == (4, 3, 6)
    assert torch.equal(init1[:, 1:], torch.zeros_like(init1[:, 1:]))  # warm start: the rest, then zeros


def test_mpc_deadline_shrinks_each_plan_to_the_blocks_left():
    """frameskip 3, horizon 3, replanning every block, deadline 14 env steps: plans at steps
    0, 3, 6, 9, 12 have ceil((14 - step) / 3) blocks, capped at 3: 3, 3, 3, 2, 1; the warm start
    is the rest of the previous plan, cut or padded with zeros to the new horizon."""
    model = tiny_model(history=2)
    planner = RecordingCEM(num_samples=8, topk=2, iterations=1)
    env = FakeEnv(2)
    policy = MPCPolicy(model, planner, horizon=3, receding_horizon=1, warm_start=True, deadline=14)
    assert policy.settings()["deadline"] == 14
    policy.reset(env)
    for _ in range(16):  # past the deadline, plans keep one block
        policy.act(env, env.obs())
    assert [p.horizon for p in planner.problems] == [3, 3, 3, 2, 1, 1]
    for problem, init, previous in zip(planner.problems[1:], planner.inits[1:], planner.plans[:-1]):
        horizon = problem.horizon
        rest = previous[:, 1:1 + horizon]  # the unexecuted tail, cut to the new horizon
        assert torch.equal(init[:, : rest.shape[1]], rest)
        assert torch.equal(init[:, rest.shape[1]:], torch.zeros_like(init[:, rest.shape[1]:]))
    policy.reset(env)  # a new episode starts the count again
    assert policy.plan_horizon() == 3
    with pytest.raises(ValueError, match="deadline"):
        MPCPolicy(model, CEM(), deadline=0)
    assert MPCPolicy(model, CEM(), horizon=4).plan_horizon() == 4  # no deadline: the paper's full horizon


def test_mpc_replans_inside_a_block_from_frames_a_frameskip_apart():
    """frameskip 3, history 3, horizon 2 blocks, replanning every 2 env steps: plans at steps 0, 2, 4,
    ...; the context of the plan at step t is the frames seen at t, t-3, t-6 (those that exist) and
    the actions executed between them, and the warm start is the previous plan moved on 2 steps."""
    model = tiny_model(history=3)
    planner = RecordingCEM(num_samples=8, topk=2, iterations=1)
    env = FakeEnv(4)
    policy = MPCPolicy(model, planner, horizon=2, replan_every=2, warm_start=True)
    assert policy.settings()["replan_every"] == 2
    policy.reset(env)
    frames, actions = [], []
    for _ in range(12):
        obs = env.obs()
        frames.append(obs["pixels"])
        a = policy.act(env, obs)
        assert a.shape == (4, 2) and np.abs(a).max() <= 1.0
        actions.append(a)
    calls, plans = planner.contexts(), planner.plans
    assert len(calls) == 6 and policy.plans == 24
    with torch.no_grad():
        emb = [model.encode(torch.as_tensor(f).permute(0, 3, 1, 2)[:, None])[:, 0] for f in frames]
    for k, t in enumerate(range(0, 12, 2)):
        ctx, acts, init = calls[k]
        seen = [s for s in (t - 6, t - 3, t) if s >= 0]
        assert torch.allclose(ctx, torch.stack([emb[s] for s in seen], 1), atol=1e-6)
        if len(seen) == 1:
            assert acts is None
        else:  # the raw actions executed from each context frame to the next, one block each
            executed = torch.as_tensor(np.stack(actions[seen[0]:t], 1).reshape(4, len(seen) - 1, 6))
            assert torch.allclose(model.denormalize_actions(acts), executed, atol=1e-5)
        if k == 0:
            assert init is None
        else:  # the previous plan's last 4 of its 6 steps, then 2 steps of zeros
            rest = plans[k - 1].reshape(4, 6, 2)[:, 2:]
            assert torch.equal(init.reshape(4, 6, 2)[:, :4], rest)
            assert torch.equal(init.reshape(4, 6, 2)[:, 4:], torch.zeros(4, 2, 2))
        # the first 2 planned steps are the ones executed, de-normalised and clipped
        raw = model.denormalize_actions(plans[k].reshape(4, 6, 2)[:, :2]).clamp(-1, 1)
        assert torch.allclose(raw, torch.as_tensor(np.stack(actions[t:t + 2], 1)), atol=1e-6)


@pytest.mark.parametrize("blocks", [1, 2])
def test_mpc_replan_every_whole_blocks_equals_the_receding_horizon(blocks):
    """replan_every = k * frameskip env steps is exactly receding_horizon = k blocks."""
    model = tiny_model(history=2)
    out = []
    for kw in ({"receding_horizon": blocks}, {"replan_every": 3 * blocks}):
        env = FakeEnv(3, seed=5)
        policy = MPCPolicy(model, CEM(num_samples=8, topk=2, iterations=2), horizon=3, warm_start=True,
                           deadline=20, **kw)
        policy.reset(env)
        out.append(np.stack([policy.act(env, env.obs()) for _ in range(21)]))
        assert policy.settings()["receding_horizon"] == blocks and policy.settings()["replan_every"] == 3 * blocks
    np.testing.assert_array_equal(out[0], out[1])
    for kw in ({}, {"receding_horizon": 3}, {"replan_every": 9}):  # every plan runs to its end: nothing to reuse
        with pytest.raises(ValueError, match="warm_start starts each plan from the unexecuted rest"):
            MPCPolicy(model, CEM(num_samples=8, topk=2, iterations=2), horizon=3, warm_start=True, **kw)
    with pytest.raises(ValueError, match="not both: both say when to replan"):
        MPCPolicy(model, CEM(num_samples=8, topk=2, iterations=2), horizon=3, receding_horizon=1, replan_every=3)


def test_mpc_refuses_a_replan_interval_outside_the_plan():
    model = tiny_model()
    for bad in (0, 10):  # horizon 3 blocks of 3 steps: 1 .. 9
        with pytest.raises(ValueError, match="replan_every"):
            MPCPolicy(model, CEM(), horizon=3, replan_every=bad)


def test_held_actions_score_each_action_repeated_over_its_block():
    """HeldActions.cost(a) is the block problem's cost of the blocks that repeat a, built step by step."""
    model = tiny_model(history=2)
    g = torch.Generator().manual_seed(3)
    problem = LatentProblem(model, torch.randn(2, 2, 16, generator=g), torch.randn(2, 16, generator=g), horizon=4,
                            context_actions=torch.randn(2, 1, 6, generator=g))
    held = HeldActions(problem, repeats=3)
    assert (held.action_dim, held.horizon, held.batch_size) == (2, 4, 2)
    assert torch.equal(held.low.repeat(3), problem.low) and torch.equal(held.high.repeat(3), problem.high)
    a = torch.randn(2, 5, 4, 2, generator=g)  # (B, S, T, A)
    blocks = torch.zeros(2, 5, 4, 6)
    for step in range(3):  # block layout: step-major, A numbers per step
        blocks[..., 2 * step:2 * step + 2] = a
    assert torch.equal(held.expand(a), blocks)
    assert torch.allclose(held.reduce(blocks), a, atol=1e-6)
    assert torch.allclose(held.cost(a), problem.cost(blocks))
    # a CEM plan of the held problem is a held plan: its expansion is within the block bounds
    plan = held.expand(CEM(num_samples=32, topk=4, iterations=3).plan(held))
    assert plan.shape == (2, 4, 6)
    assert torch.equal(plan.view(2, 4, 3, 2), plan.view(2, 4, 3, 2)[:, :, :1].expand(2, 4, 3, 2))
    assert (plan >= problem.low).all() and (plan <= problem.high).all()
    with pytest.raises(ValueError, match="multiple"):
        HeldActions(problem, repeats=4)


def test_mpc_with_held_actions_drives_each_block_one_way():
    """--hold-actions: every executed block repeats one raw action over its frameskip steps, the
    warm start is the rest of the previous held plan, and the settings say so."""
    model = tiny_model(history=2)
    planner = RecordingCEM(num_samples=16, topk=4, iterations=2)
    env = FakeEnv(3)
    policy = MPCPolicy(model, planner, horizon=3, receding_horizon=1, warm_start=True, hold_actions=True)
    assert policy.settings()["hold_actions"] is True
    policy.reset(env)
    actions = np.stack([policy.act(env, env.obs()) for _ in range(12)], 1)  # (N, 12, 2)
    blocks = actions.reshape(3, 4, 3, 2)
    np.testing.assert_array_equal(blocks, np.broadcast_to(blocks[:, :, :1], blocks.shape))
    inits, plans = planner.inits, planner.plans
    assert all(isinstance(p, HeldActions) and p.action_dim == 2 for p in planner.problems)
    assert len(plans) == 4 and inits[0] is None
    for init, previous in zip(inits[1:], plans[:-1]):
        assert torch.allclose(init[:, :2], previous[:, 1:], atol=1e-6)
        assert torch.equal(init[:, 2:], torch.zeros_like(init[:, 2:]))
    for k, plan in enumerate(plans):  # the first held action of each plan, de-normalised and clipped, is executed
        raw = model.denormalize_actions(plan[:, 0]).clamp(-1, 1)
        assert torch.allclose(raw, torch.as_tensor(blocks[:, k, 0]), atol=1e-6)


def test_planning_loop_does_not_sync_with_the_host(monkeypatch):
    """Reading a tensor value back (.item/.tolist/bool/...) inside plan() would stall a GPU."""
    model = tiny_model()
    problem = LatentProblem(model, torch.zeros(2, 1, 16), torch.randn(2, 16), horizon=3)
    hits = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            hits.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    with torch.no_grad():
        for planner in (CEM(num_samples=8, topk=2, iterations=3), MPPI(num_samples=8, iterations=3),
                        ICEM(num_samples=8, topk=2, iterations=3), GradientPlanner(num_samples=2, iterations=3)):
            planner.plan(problem)
    assert hits == []


@pytest.mark.slow  # torch.compile needs a C++ compiler and takes ~10 s on CPU
def test_compiled_rollout_plans_the_same():
    model = tiny_model(history=2)
    g = torch.Generator().manual_seed(0)
    ctx, goal, acts = torch.randn(4, 2, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(4, 1, 6, generator=g)
    with torch.no_grad():
        eager = CEM(num_samples=16, topk=4, iterations=3).plan(LatentProblem(model, ctx, goal, 3, acts))
        compiled_rollout = torch.compile(model.rollout, dynamic=False)
        compiled = CEM(num_samples=16, topk=4, iterations=3).plan(
            LatentProblem(model, ctx, goal, 3, acts, rollout=compiled_rollout))
    assert torch.allclose(eager, compiled, atol=1e-4)


def test_planner_settings_that_cannot_work_are_refused():
    for planner, kwargs in ((CEM, {"topk": 1}), (ICEM, {"topk": 1}), (CEM, {"min_std": -1.0}),
                            (ICEM, {"min_std": -0.5})):
        with pytest.raises(ValueError, match="two elites|min_std >= 0"):
            planner(num_samples=10, **{"topk": 3, **kwargs})


def test_mpc_records_its_own_seed_and_names_misuse():
    model = tiny_model(history=2)
    policy = MPCPolicy(model, CEM(num_samples=8, topk=2, iterations=1, seed=5), horizon=2, seed=1)
    assert policy.settings()["seed"] == 1  # the MPC's generator draws the samples, not the planner's seed
    env = FakeEnv(4)
    with pytest.raises(RuntimeError, match="call policy.reset"):
        policy.act(env, env.obs())
    policy.reset(env)
    with pytest.raises(ValueError, match="obs holds 2 envs but the policy was reset on 4"):
        policy.act(FakeEnv(2), FakeEnv(2).obs())
    single = {"pixels": env.obs()["pixels"][0]}  # one env's (H, W, 3) frame, as a gymnasium env gives
    with pytest.raises(ValueError, match="batched env"):
        policy._encode(single["pixels"])
    with pytest.raises(TypeError, match="batched env"):
        policy.reset(object())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"horizon": 0}, ValueError, "horizon counts action blocks"),
    ({"cost": "bogus"}, ValueError, "unknown cost 'bogus'"),
    ({"planner": "cem"}, TypeError, "planner must be a planner object"),
    ({"action_low": 1.0, "action_high": -1.0}, ValueError, "action_low < action_high"),
])
def test_mpc_refuses_settings_at_construction(kwargs, error, match):
    args = {"planner": CEM(num_samples=8, topk=2, iterations=1), "horizon": 2, **kwargs}
    with pytest.raises(error, match=match):
        MPCPolicy(tiny_model(), **args)


@pytest.mark.parametrize("name", ["cem", "mppi", "icem"])
def test_first_samples_spread_by_init_std_around_the_warm_start(name):
    """The first iteration samples init (clipped to the bounds: some of it lies outside) + init_std *
    (the seeded generator's first standard-normal draw), clipped to the bounds (iCEM with beta 0:
    white noise, drawn (B, S, A, T); MPPI's sample 0 and iCEM's last-iteration sample 0 are the
    clipped init itself)."""
    B, S, T, A, std = 2, 6, 3, 2, 0.1
    target = torch.zeros(B, T, A, dtype=torch.float64)
    init = torch.rand((B, T, A), generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2 - 1
    kw = {"cem": dict(topk=2), "mppi": {}, "icem": dict(topk=2, beta=0.0)}[name]
    problem = Quadratic(target, low=-0.9, high=0.9)
    make_planner(name, num_samples=S, iterations=1, init_std=std, seed=5, **kw).plan(problem, init=init)
    g = torch.Generator().manual_seed(5)
    if name == "icem":
        noise = torch.randn((B, S, A, T), generator=g, dtype=torch.float64).transpose(2, 3)
    else:
        noise = torch.randn((B, S, T, A), generator=g, dtype=torch.float64)
    assert (init.abs() > 0.9).any()
    mean = init.clamp(-0.9, 0.9)
    want = torch.stack([torch.stack([(mean[b] + std * noise[b, s]).clamp(-0.9, 0.9) for s in range(S)])
                        for b in range(B)])
    if name != "cem":
        want[:, 0] = mean
    torch.testing.assert_close(problem.seen[0], want, rtol=0, atol=1e-12)


def test_latent_problem_conditions_on_the_context_actions():
    """cost(a) is the squared distance of the model's rollout from the context, its executed blocks
    and a to the goal at the last block; without those blocks the model predicts otherwise."""
    model = tiny_model(history=2)
    g = torch.Generator().manual_seed(4)
    ctx, goal = torch.randn(2, 2, 16, generator=g), torch.randn(2, 16, generator=g)
    ca, a = 5 * torch.randn(2, 1, 6, generator=g), torch.randn(2, 5, 3, 6, generator=g)
    with torch.no_grad():
        cost = LatentProblem(model, ctx, goal, horizon=3, context_actions=ca).cost(a)
        without = LatentProblem(model, ctx, goal, horizon=3).cost(a)
        pred = model.rollout(ctx, a, ca).double()  # (B, S, T, D)
    want = torch.tensor([[float(((pred[b, s, -1] - goal[b].double()) ** 2).sum()) for s in range(5)]
                         for b in range(2)], dtype=torch.float64)
    torch.testing.assert_close(cost.double(), want, rtol=1e-5, atol=0)
    assert (cost - without).abs().max() > 50 * 1e-5 * cost.abs().max()  # far beyond the tolerance above


@pytest.mark.parametrize("kind", ["terminal", "sum"])
def test_latent_cost_of_bfloat16_predictions_is_summed_in_float32(kind):
    """Under --amp the rollout gives bfloat16 embeddings: the squared distances are summed in float32
    (a float64 brute force of the same bfloat16 inputs agrees to float32 precision)."""
    g = torch.Generator().manual_seed(2)
    pred = (torch.randn(2, 3, 4, 256, generator=g) * 3).bfloat16()
    goal = torch.randn(2, 256, generator=g).bfloat16()
    cost = latent_cost(pred, goal, kind)
    assert cost.dtype == torch.float32
    sq = [[[math.fsum(((pred[b, s, t].double() - goal[b].double()) ** 2).tolist()) for t in range(4)]
           for s in range(3)] for b in range(2)]
    brute = torch.tensor(sq, dtype=torch.float64)
    want = brute[..., -1] if kind == "terminal" else brute.sum(-1)
    torch.testing.assert_close(cost.double(), want, rtol=1e-5, atol=0)


def test_mpc_seed_drives_the_planners_samples():
    """The MPC's seed, not the planner's, seeds every plan: seed 1 twice acts the same, seeds 1 and 2 differ."""
    model = tiny_model(history=2)
    runs = {}
    for key, seed in (("a", 1), ("b", 1), ("c", 2)):
        env = FakeEnv(2, seed=3)
        policy = MPCPolicy(model, CEM(num_samples=8, topk=2, iterations=2, seed=0), horizon=2,
                           receding_horizon=1, seed=seed)
        policy.reset(env)
        runs[key] = np.stack([policy.act(env, env.obs()) for _ in range(6)])
    np.testing.assert_array_equal(runs["a"], runs["b"])
    assert not np.array_equal(runs["a"], runs["c"])


def run_recorded_mpc(planner, num_envs: int, steps: int, **policy_kwargs):
    """Act `steps` env steps with an MPC policy replanning every block on a FakeEnv; returns the planner."""
    env = FakeEnv(num_envs)
    policy = MPCPolicy(tiny_model(history=2), planner, receding_horizon=1, **policy_kwargs)
    policy.reset(env)
    for _ in range(steps):
        policy.act(env, env.obs())
    return planner


@pytest.mark.parametrize("warm_start", [False, True])
def test_mpc_warm_starts_only_when_asked(warm_start):
    """Without warm_start every plan starts from zeros (init None); with it, from the previous plan's
    unexecuted blocks followed by a block of zeros."""
    planner = run_recorded_mpc(RecordingCEM(num_samples=8, topk=2, iterations=1), num_envs=2, steps=9, horizon=3,
                               warm_start=warm_start)
    assert len(planner.inits) == 3 and planner.inits[0] is None
    for init, previous in zip(planner.inits[1:], planner.plans[:-1]):
        if not warm_start:
            assert init is None
        else:
            want = torch.cat([previous[:, 1:], torch.zeros_like(previous[:, :1])], 1)
            assert torch.equal(init, want)


@pytest.mark.parametrize("deadline", [13, 14, 15, 16])
def test_mpc_plan_horizon_is_the_blocks_left_to_the_deadline(deadline):
    """frameskip 3, horizon 5, replanning every block: the plan at step t has min(5, ceil((deadline - t) / 3))
    blocks, at least one, for deadlines on and off a block boundary."""
    planner = run_recorded_mpc(RecordingCEM(num_samples=4, topk=2, iterations=1), num_envs=1, steps=21, horizon=5,
                               deadline=deadline)
    want = [max(1, min(5, math.ceil((deadline - t) / 3))) for t in range(0, 21, 3)]
    assert [p.horizon for p in planner.problems] == want


@pytest.mark.parametrize("name", sorted(PLANNER_KW))
def test_a_warm_start_outside_the_box_is_clipped_before_anything_is_evaluated(name):
    """MPPI scores its mean every iteration and iCEM in its last: from an init far below the box,
    that mean too must be an executable plan, and the caller's init is left as it was."""
    target = torch.full((2, 3, 2), 0.75, dtype=torch.float64)
    problem = Quadratic(target, low=0.5, high=1.0)
    init = torch.full_like(target, -50.0)
    kw = {**PLANNER_KW[name], "iterations": 2}
    out = make_planner(name, seed=0, **kw).plan(problem, init=init)
    evaluated = torch.cat([s.flatten(0, 2) for s in problem.seen])
    assert (evaluated >= 0.5).all() and (evaluated <= 1.0).all()
    assert (out >= 0.5).all() and (out <= 1.0).all()
    assert (init == -50).all()


class TwoWells:
    """One action; cost min((a - 5)^2, 1 + (a + 1)^2): 0 at a = 5, outside the box [-1, 1], whose
    best action is a = -1 (cost 1); a = 1 costs 5."""

    batch_size, horizon, action_dim = 1, 1, 1
    low, high = torch.tensor([-1.0]), torch.tensor([1.0])

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def cost(self, actions: torch.Tensor) -> torch.Tensor:  # (B, S, T, A) -> (B, S)
        self.seen.append(actions.detach().clone())
        a = actions[..., 0, 0]
        return torch.minimum((a - 5) ** 2, 1 + (a + 1) ** 2)


def test_icem_returns_the_cheapest_plan_it_evaluated_from_an_init_outside_the_box():
    """iCEM returns its cheapest evaluated sample. A mean scored at a = 5 (cost 0) would win and come
    back clipped to a = 1 (cost 5), worse than plans that were evaluated."""
    problem = TwoWells()
    out = ICEM(num_samples=50, topk=5, iterations=1, seed=0).plan(problem, init=torch.full((1, 1, 1), 5.0))
    costs = problem.cost(torch.cat(problem.seen, dim=1))
    returned = problem.cost(out[:, None]).item()
    assert returned == pytest.approx(costs.min().item(), abs=1e-6)
    assert returned < 5.0


PUSHT_MPC_CHILD = """
import warnings
warnings.filterwarnings("error", message=".*not writable")  # torch warns once per process: a fresh one
import numpy as np, torch
import envs
from leworld.model import LeWMConfig, LeWorldModel
from leworld.planning import CEM, MPCPolicy
cfg = LeWMConfig(encoder="cnn", image_size=32, cnn_channels=(8, 16, 16), enc_width=32, embed_dim=16,
                 proj_hidden=32, history=2, pred_depth=1, pred_heads=2, pred_head_dim=8, pred_mlp=32,
                 action_hidden=16, action_dim=2, frameskip=3)
env = envs.make_batch("pusht", num_envs=2, resolution=32, seed=0)
obs = env.reset(seed=0)
assert not obs["pixels"].flags.writeable  # the env's frame cache, as the planner meets it
before = obs["pixels"].copy()
policy = MPCPolicy(LeWorldModel(cfg).eval(), CEM(num_samples=8, topk=2, iterations=1), horizon=2, receding_horizon=1)
policy.reset(env)
action = policy.act(env, obs)
assert action.shape == (2, 2) and np.isfinite(action).all()
assert np.array_equal(obs["pixels"], before) and not obs["pixels"].flags.writeable
print("ok")
"""


def test_mpc_plans_on_read_only_push_t_frames_without_a_warning():
    """Push-T's observations are read-only views of its frame cache; the planner copies them rather
    than handing torch an array it cannot own (which warns), and leaves the env's frames as they were."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", PUSHT_MPC_CHILD], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
