"""Tests of leworld.sigreg against independent float64 computations, and across 2 processes.

Run: pytest tests/test_sigreg.py -q
"""

from __future__ import annotations

import gc
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from leworld.sigreg import SIGReg, directions_agree, knots_and_weights, sample_directions, sigreg


def ep_trapezoid_float64(z: torch.Tensor, u: torch.Tensor, num_knots: int = 17, t_max: float = 3.0) -> float:
    """Independent numpy float64 version of the 17-knot quadrature: mean_k N sum_j w_j |ECF - phi|^2."""
    s = z.double().numpy() @ u.double().numpy()  # (N, K)
    N = s.shape[0]
    dt = t_max / (num_knots - 1)
    total = np.zeros(s.shape[1])
    for j in range(num_knots):
        t = j * dt
        weight = (dt if j in (0, num_knots - 1) else 2 * dt) * math.exp(-t * t / 2)
        ecf = np.exp(1j * t * s).mean(0)  # (K,)
        total += weight * np.abs(ecf - math.exp(-t * t / 2)) ** 2
    return float((N * total).mean())


def ep_fine_grid_float64(z: torch.Tensor, u: torch.Tensor, t_max: float = 3.0, points: int = 1201) -> float:
    """N * integral over [-t_max, t_max] of exp(-t^2/2) |ECF - phi|^2 on a dense grid, mean over k."""
    s = z.double().numpy() @ u.double().numpy()  # (N, K)
    t = np.linspace(-t_max, t_max, points)
    ecf = np.exp(1j * t[None, None, :] * s[:, :, None]).mean(0)  # (K, P)
    integrand = np.exp(-(t**2) / 2) * np.abs(ecf - np.exp(-(t**2) / 2)) ** 2
    area = ((integrand[:, 1:] + integrand[:, :-1]) / 2 * np.diff(t)).sum(-1)  # trapezoid rule (any numpy)
    return float((s.shape[0] * area).mean())


def ep_closed_form_float64(z: torch.Tensor, u: torch.Tensor) -> float:
    """The same statistic integrated over the whole line, in closed form (Gaussian integrals)."""
    s = z.double().numpy() @ u.double().numpy()  # (N, K)
    N = s.shape[0]
    diff = s[:, None, :] - s[None, :, :]  # (N, N, K)
    pair = np.exp(-(diff**2) / 2).sum((0, 1)) * math.sqrt(2 * math.pi) / N
    cross = 2 * math.sqrt(math.pi) * np.exp(-(s**2) / 4).sum(0)
    return float((pair - cross + N * math.sqrt(2 * math.pi / 3)).mean())


def sample(kind: str, N: int, D: int) -> torch.Tensor:
    z = torch.randn(N, D)
    if kind == "shifted":
        return z + 1.0
    if kind == "anisotropic":
        return z * torch.linspace(0.3, 2.5, D)
    if kind == "collapsed":
        return 0.05 * z
    return z


@pytest.mark.parametrize("N", [16, 64, 200])
@pytest.mark.parametrize("K", [8, 64])
@pytest.mark.parametrize("kind", ["gaussian", "anisotropic"])
def test_matches_float64_quadrature_and_fine_integral(N, K, kind):
    torch.manual_seed(N + K)
    z = sample(kind, N, 16)
    u = sample_directions(16, K, step=11)
    got = sigreg(z, step=11, num_directions=K).item()
    assert got == pytest.approx(ep_trapezoid_float64(z, u), rel=2e-5)
    assert got == pytest.approx(ep_fine_grid_float64(z, u), rel=2e-3)  # 17 knots vs dense grid


def test_whole_line_limit_matches_closed_form():
    torch.manual_seed(0)
    for kind in ["gaussian", "shifted", "collapsed"]:
        z = sample(kind, 48, 8)
        u = sample_directions(8, 16, step=2)
        got = sigreg(z, step=2, num_directions=16, num_knots=401, t_max=10.0).item()
        assert got == pytest.approx(ep_closed_form_float64(z, u), rel=1e-5)
        assert ep_fine_grid_float64(z, u, 10.0, 20001) == pytest.approx(ep_closed_form_float64(z, u), rel=1e-9)


def test_knots_and_weights():
    t, w = knots_and_weights(17, 3.0)
    assert t[0] == 0 and t[-1] == 3.0 and len(t) == 17
    dt = 3.0 / 16
    torch.testing.assert_close(w[[0, 5, 16]], torch.tensor([dt, 2 * dt * math.exp(-(t[5].item() ** 2) / 2), dt * math.exp(-4.5)]))


def test_small_on_gaussian_large_on_collapsed_shifted_anisotropic():
    torch.manual_seed(0)
    values = {k: sigreg(sample(k, 512, 32), step=0, num_directions=256).item()
              for k in ["gaussian", "collapsed", "shifted", "anisotropic"]}
    assert values["gaussian"] < 2.0, values
    for kind in ["collapsed", "shifted", "anisotropic"]:
        assert values[kind] > 5 * values["gaussian"], values


def test_directions_fixed_per_step_fresh_across_steps():
    a, b = sample_directions(32, 64, step=5), sample_directions(32, 64, step=5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, sample_directions(32, 64, step=6))
    assert not torch.allclose(a, sample_directions(32, 64, step=5, seed=1))
    firsts = {sample_directions(4, 1, step=s, seed=seed)[0, 0].item() for s in range(200) for seed in range(3)}
    assert len(firsts) == 600  # every (seed, step) pair its own draw
    torch.testing.assert_close(a.norm(dim=0), torch.ones(64))
    z = torch.randn(64, 32)
    assert sigreg(z, 5).item() == sigreg(z, 5).item() != sigreg(z, 6).item()
    # directions drawn elsewhere and copied: the same numbers when that device draws the same ones
    assert sigreg(z, 5, directions_device="cpu").item() == sigreg(z, 5).item()
    assert SIGReg(directions_device="cpu")(z, 5).item() == sigreg(z, 5).item()
    assert directions_agree(32, 64)  # one process: trivially


def test_knots_are_built_once_per_device_not_copied_every_step(monkeypatch):
    """A host-to-device copy every step would make the host wait for the GPU: the knots and
    weights are built and moved once per (knots, range, device)."""
    import leworld.sigreg as sigreg_mod

    built = []
    real = sigreg_mod.knots_and_weights
    monkeypatch.setattr(sigreg_mod, "knots_and_weights", lambda *a: built.append(a) or real(*a))
    sigreg_mod._knots_and_weights_on.cache_clear()
    z = torch.randn(32, 2, 8)
    values = [sigreg(z, step=s, num_directions=16, num_knots=13, t_max=2.5).item() for s in range(3)]
    assert built == [(13, 2.5)]
    sigreg_mod._knots_and_weights_on.cache_clear()
    monkeypatch.setattr(sigreg_mod, "knots_and_weights", real)
    assert values == [sigreg(z, step=s, num_directions=16, num_knots=13, t_max=2.5).item() for s in range(3)]


def test_a_first_call_in_inference_mode_leaves_later_training_steps_differentiable():
    """`trainer.validate` runs under inference mode: the knots it caches must still serve the
    training steps after it, whose backward saves them."""
    import leworld.sigreg as sigreg_mod

    sigreg_mod._knots_and_weights_on.cache_clear()
    z = torch.randn(32, 2, 8)
    with torch.inference_mode():
        in_inference = sigreg(z, step=0, num_directions=16).item()
    leaf = z.clone().requires_grad_(True)
    value = sigreg(leaf, step=0, num_directions=16)
    value.backward()
    assert value.item() == in_inference and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_time_steps_are_separate_then_averaged():
    z = torch.randn(32, 3, 8)  # (B, T, D)
    per_t = torch.stack([sigreg(z[:, t], step=1, num_directions=32) for t in range(3)])
    torch.testing.assert_close(sigreg(z, step=1, num_directions=32), per_t.mean())
    torch.testing.assert_close(SIGReg(num_directions=32)(z, step=1), per_t.mean())
    with pytest.raises(ValueError, match="B, T, D"):
        sigreg(torch.zeros(2, 3, 4, 5), step=0)


def test_gradient_matches_float64_autograd():
    torch.manual_seed(3)
    z = (torch.randn(48, 3, 16) * torch.linspace(0.5, 1.5, 16)).requires_grad_()
    sigreg(z, step=7, num_directions=32).backward()
    # independent float64 statistic, differentiated by autograd through complex exponentials
    z64 = z.detach().double().requires_grad_()
    u = sample_directions(16, 32, step=7).double()
    dt = 3.0 / 16
    t = torch.arange(17, dtype=torch.float64) * dt
    w = torch.full((17,), 2 * dt, dtype=torch.float64)
    w[0] = w[-1] = dt
    w = w * torch.exp(-(t**2) / 2)
    s = torch.einsum("btd,dk->btk", z64, u)  # (N, T, K)
    ecf = torch.exp(1j * s[..., None] * t).mean(0)  # (T, K, J)
    ep = 48 * ((ecf - torch.exp(-(t**2) / 2)).abs() ** 2 * w).sum(-1)  # (T, K)
    ep.mean().backward()
    torch.testing.assert_close(z.grad, z64.grad.float(), rtol=1e-4, atol=1e-6)


def test_cos_sin_sums_and_their_backward_match_autograd_in_float64():
    from leworld.sigreg import _CosSinSums

    t64 = torch.linspace(0, 3, 4, dtype=torch.float64)
    proj64 = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: _CosSinSums.apply(p, t64), (proj64,))
    # float32 against autograd's own graph of the same sums, run in float64
    proj = (torch.randn(3, 64, 32) * 2).requires_grad_()
    t = torch.linspace(0, 3, 17)
    grad_cos, grad_sin = torch.randn(3, 32, 17), torch.randn(3, 32, 17)
    ref_in = proj.detach().double().requires_grad_()
    x = ref_in[..., None] * t.double()  # (T, B, K, J)
    ref = x.cos().sum(1), x.sin().sum(1)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, (grad_cos.double(), grad_sin.double()))
    fused = _CosSinSums.apply(proj, t)
    (fused_grad,) = torch.autograd.grad(fused, proj, (grad_cos, grad_sin))
    assert fused[0].shape == fused[1].shape == (3, 32, 17) and fused_grad.shape == proj.shape
    torch.testing.assert_close(fused[0].double(), ref[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused[1].double(), ref[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused_grad.double(), ref_grad, rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # evaluation: the same values without a graph
        assert torch.equal(_CosSinSums.apply(proj, t)[0], fused[0])


def test_float32_under_bf16_autocast():
    torch.manual_seed(0)
    layer, x = nn.Linear(16, 16), torch.randn(64, 2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)
        assert z.dtype == torch.bfloat16
        value = sigreg(z, step=3, num_directions=64)
    assert value.dtype == torch.float32
    assert value.item() == sigreg(z.float(), step=3, num_directions=64).item()


# ---- two processes (gloo) ------------------------------------------------------------------
SPLIT = (10, 14)  # unequal local batches: the sample count is pooled too
STEP, K = 3, 64


def _setup(n_in: int = 6, d: int = 8):
    torch.manual_seed(0)
    x = torch.randn(sum(SPLIT), 2, n_in)  # (B, T, n_in) the global batch
    layer = nn.Linear(n_in, d)
    return x, layer


def _ddp_step(rank: int, out_dir: str) -> None:
    x, layer = _setup()
    model = nn.parallel.DistributedDataParallel(layer)
    lo = sum(SPLIT[:rank])
    x_local = x[lo : lo + SPLIT[rank]].clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated collective in the loss
        loss = sigreg(model(x_local), step=STEP, num_directions=K)
        loss.backward()
    # ranks whose devices drew different numbers (here: another seed on rank 1) are caught
    agree = directions_agree(8, K, seed=0), directions_agree(8, K, seed=rank)
    torch.save(
        {"loss": loss.detach(), "x_grad": x_local.grad, "w_grad": layer.weight.grad, "b_grad": layer.bias.grad,
         "agree": agree},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _ddp_step(rank, out_dir)
    finally:
        # The DDP wrapper and the autograd graph keep the process group alive; if they
        # outlive destroy_process_group, gloo's threads are torn down at interpreter exit
        # and the process aborts ("terminate called without an active exception").
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def test_two_process_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    x, layer = _setup()
    x = x.clone().requires_grad_()
    loss = sigreg(layer(x), step=STEP, num_directions=K)
    loss.backward()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    lo = 0
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        # value: every rank holds the statistic of the global batch
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
        assert r["agree"] == (True, False)
        # parameters: after DDP's averaging, the gradient of one process on the whole batch
        torch.testing.assert_close(r["w_grad"], layer.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["b_grad"], layer.bias.grad, rtol=1e-5, atol=1e-5)
        # inputs: world_size x the whole-batch gradient (the all-reduce sums the ranks'
        # identical upstream gradients); DDP's 1/world_size averaging undoes exactly this
        x_grad = x.grad[lo : lo + SPLIT[rank]]
        torch.testing.assert_close(r["x_grad"] / 2, x_grad, rtol=1e-5, atol=1e-5)
        lo += SPLIT[rank]


def test_the_module_draws_with_its_own_seed():
    z = torch.randn(64, 2, 16, generator=torch.Generator().manual_seed(0))
    got = SIGReg(num_directions=32, seed=3)(z, 5)
    assert got.item() == sigreg(z, 5, num_directions=32, seed=3).item()
    assert got.item() != sigreg(z, 5, num_directions=32, seed=0).item()


def test_directions_are_drawn_on_the_device_asked_for_by_the_function_and_the_module(monkeypatch):
    """`directions_device` reaches `sample_directions`; without it the directions are drawn on z's
    device. "cpu:0" is a CPU device other than z's ("cpu"), so the two cannot be confused."""
    import leworld.sigreg as sigreg_mod

    asked = []
    real = sigreg_mod.sample_directions

    def recording(dim, num_directions, step, seed=0, device="cpu"):
        asked.append(torch.device(device))
        return real(dim, num_directions, step, seed, device)

    monkeypatch.setattr(sigreg_mod, "sample_directions", recording)
    z = torch.randn(32, 8)
    plain = sigreg(z, 4, num_directions=16).item()
    assert asked == [torch.device("cpu")]
    assert sigreg(z, 4, num_directions=16, directions_device="cpu:0").item() == plain
    assert SIGReg(num_directions=16, directions_device="cpu:0")(z, 4).item() == plain
    assert SIGReg(num_directions=16)(z, 4).item() == plain
    assert asked == [torch.device("cpu"), torch.device("cpu:0"), torch.device("cpu:0"), torch.device("cpu")]


def test_negative_seeds_and_steps_and_fewer_than_two_knots_are_refused():
    with pytest.raises(ValueError, match="seed=-1"):
        sample_directions(4, 2, step=0, seed=-1)
    with pytest.raises(ValueError, match="step=-1"):
        sample_directions(4, 2, step=-1)
    for num_knots in (0, 1):  # a trapezoid needs both ends of [0, t_max]
        with pytest.raises(ValueError, match="num_knots >= 2"):
            knots_and_weights(num_knots, 3.0)
    with pytest.raises(ValueError, match="t_max > 0"):
        knots_and_weights(17, 0.0)
    t, w = knots_and_weights(2, 3.0)  # the smallest rule: both ends, weight dt each
    torch.testing.assert_close(t, torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(w, torch.tensor([3.0, 3.0 * math.exp(-4.5)]))


def test_default_knots_are_the_papers_17_on_0_to_3():
    t, w = knots_and_weights()
    t_paper, w_paper = knots_and_weights(17, 3.0)
    assert torch.equal(t, t_paper) and torch.equal(w, w_paper)
    assert len(t) == 17 and t[-1].item() == 3.0
