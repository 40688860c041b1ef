"""SIGReg: Sketched Isotropic Gaussian Regulariser, exact across processes.

Example:
    >>> import torch
    >>> from leworld.sigreg import sigreg
    >>> z = torch.randn(128, 4, 192)  # (B, T, D) encoder embeddings of every frame
    >>> loss = sigreg(z, step=0)  # scalar; small for isotropic Gaussian z
    >>> bool(loss < 2.0)
    True

For each time step, over the batch Z_t (N, D):
  1. K directions u_k uniform on the unit sphere, drawn by a `torch.Generator` seeded from
     (seed, step) on the embeddings' device (no host-to-device copy): fresh every training
     step, identical on every rank of the same hardware. `directions_agree` checks that
     across ranks (torch's CUDA sampler may lay its draws out by the GPU's multiprocessor
     count); where ranks differ, `directions_device="cpu"` draws them on the CPU instead.
  2. Projections s_nk = <z_n, u_k>.
  3. Empirical characteristic function phi_hat_k(t) = mean_n exp(i t s_nk) at knots t_j.
  4. Epps-Pulley EP_k = N * integral w(t) |phi_hat_k(t) - exp(-t^2/2)|^2 dt, w(t) = exp(-t^2/2),
     integrated over [-t_max, t_max] as a trapezoid on [0, t_max] with doubled weights
     (the integrand is even).
  5. SIGReg = mean over directions, then mean over time steps.

Multi-process: when torch.distributed is initialised with world size > 1, the cos/sin sums
and the sample count are summed over all ranks with a differentiable all-reduce (`_AllReduceSum`),
so phi_hat and N are those of the global batch. Every rank returns the global value.

Gradient convention: the all-reduce's backward sums the (identical) upstream gradients of
all ranks, so the gradient w.r.t. a rank's local inputs is world_size times the gradient of
the global statistic w.r.t. those inputs. DDP averages parameter gradients over ranks
(divides by world_size), which makes parameter gradients equal to those of one process
holding the whole batch; add the loss to a per-rank mean loss (L_pred) as usual.
Everything is computed in float32, with autocast disabled.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn


def sample_directions(
    dim: int, num_directions: int, step: int, seed: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Unit directions (dim, K), a deterministic function of (seed, step), on `device`."""
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be non-negative integers, got step={step}, seed={seed}.")
    # torch's CPU generator keeps 32 bits of its seed: mix (seed, step) into 32 bits so that
    # every step of a run gets its own directions (a bijection in step for a fixed seed)
    # drawn on the device itself: no host-to-device copy, so the host never waits for the GPU
    # (`directions_agree` checks that the ranks of a run draw the same ones)
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed((int(step) + int(seed) * 0x9E3779B9) % 2**32)
    u = torch.randn(dim, num_directions, generator=generator, dtype=torch.float32, device=device)  # (D, K)
    return u / u.norm(dim=0, keepdim=True)


def knots_and_weights(num_knots: int = 17, t_max: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Knots t_j on [0, t_max] (J,) and weights (J,): doubled trapezoid times exp(-t^2/2)."""
    if num_knots < 2 or t_max <= 0:
        raise ValueError(f"need num_knots >= 2 and t_max > 0, got {num_knots}, {t_max}.")
    t = torch.linspace(0.0, t_max, num_knots, dtype=torch.float32)  # (J,)
    dt = t_max / (num_knots - 1)
    trapezoid = torch.full((num_knots,), 2 * dt, dtype=torch.float32)
    trapezoid[0] = trapezoid[-1] = dt  # doubled trapezoid: the integrand is even in t
    return t, trapezoid * torch.exp(-0.5 * t**2)


@functools.lru_cache(maxsize=None)
def _knots_and_weights_on(num_knots: int, t_max: float, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`knots_and_weights` copied to `device` once: a blocking copy from the host every step would make
    the host wait for the GPU (the copy of pageable memory synchronises the stream). Made outside
    inference mode whatever the first caller runs under (`trainer.validate` does): cached inference
    tensors could not be saved for backward by every training step after it."""
    with torch.inference_mode(False):
        return tuple(x.to(device) for x in knots_and_weights(num_knots, t_max))


class _CosSinSums(torch.autograd.Function):
    """Batch sums of cos(t_j s) and sin(t_j s) for projections s (T, B, K) and knots t (J,):
    (T, K, J) each.

    The forward keeps cos and sin, laid out (T, K, J, B), for the backward, which is
    dL/ds_tbk = sum_j t_j (g_sin_tkj cos(t_j s_tbk) - g_cos_tkj sin(t_j s_tbk)):
    for every (t, k) a (1, J) x (J, B) matrix product, so two batched products read each saved
    array once and write only the (T, B, K) result. Autograd's own graph of
    `(s[..., None] * t).cos().sum(1)` would evaluate sin and cos again, and an elementwise backward
    writes several arrays of the (T, B, K, J) size (-sin, both products, their sum, the product
    with t) before summing over the knots. On a 2-core CPU at the Push-T recipe's shape
    (4, 128, 1024, 17) this backward takes about 4 ms instead of the elementwise one's 22-26, and a
    training step is about 8% faster (docs/benchmarks.md). The knots are constants: no gradient
    flows to t.
    """

    @staticmethod
    def forward(ctx, proj: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = proj.transpose(1, 2).contiguous().unsqueeze(2) * t[:, None]  # (T, K, J, B)
        cos, sin = x.cos(), x.sin()
        ctx.save_for_backward(cos, sin, t)
        return cos.sum(-1), sin.sum(-1)

    @staticmethod
    def backward(ctx, grad_cos: torch.Tensor, grad_sin: torch.Tensor):
        cos, sin, t = ctx.saved_tensors
        T, K, J, B = cos.shape
        along_cos = (grad_sin * t).reshape(T * K, 1, J)  # d/ds sin(t s) = t cos(t s)
        along_sin = (grad_cos * -t).reshape(T * K, 1, J)  # d/ds cos(t s) = -t sin(t s)
        grad = torch.bmm(along_cos, cos.view(T * K, J, B))
        grad = grad.baddbmm_(along_sin, sin.view(T * K, J, B))  # (T*K, 1, B)
        return grad.view(T, K, B).transpose(1, 2), None  # (T, B, K)


def directions_agree(dim: int, num_directions: int, seed: int = 0, device: torch.device | str = "cpu",
                     group=None) -> bool:
    """Whether every rank draws bit-identical SIGReg directions on `device`: a collective, so call
    it on every rank (the training module does, once per fit). True on one process."""
    if _world_size(group) == 1:
        return True
    u = sample_directions(dim, num_directions, step=0, seed=seed, device=device)  # (D, K)
    gathered = [torch.empty_like(u) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, u, group=group)
    return all(torch.equal(g, gathered[0]) for g in gathered)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the upstream gradients over ranks too (the adjoint of a
    sum that every rank receives)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def sigreg(
    z: torch.Tensor,
    step: int,
    num_directions: int = 1024,
    num_knots: int = 17,
    t_max: float = 3.0,
    seed: int = 0,
    group=None,
    directions_device: torch.device | str | None = None,
) -> torch.Tensor:
    """SIGReg of embeddings z (B, T, D) (per time step, then averaged) or (N, D); a scalar.

    Args:
        z: embeddings; the batch dim is the sample axis of the Gaussian test.
        step: global training step: directions are fresh every step, identical on every rank.
        num_directions: K random directions.
        num_knots: trapezoid knots on [0, t_max].
        t_max: integration bound (the statistic integrates over [-t_max, t_max]).
        seed: run seed mixed into the direction generator.
        group: torch.distributed process group (default: the world) to pool the batch over.
        directions_device: where the directions are drawn: None (z's device), or "cpu" for ranks
            whose devices draw different numbers (`directions_agree`); then copied to z's device.
    """
    if z.ndim == 2:
        z = z[:, None]  # (N, 1, D)
    if z.ndim != 3:
        raise ValueError(f"sigreg expects z of shape (B, T, D) or (N, D), got {tuple(z.shape)}.")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        B, T, D = z.shape
        u = sample_directions(D, num_directions, step, seed, directions_device or z.device).to(z.device)  # (D, K)
        t, w = _knots_and_weights_on(num_knots, float(t_max), str(z.device))  # (J,), (J,)
        proj = torch.einsum("btd,dk->tbk", z, u)  # (T, B, K)
        cos_sum, sin_sum = _CosSinSums.apply(proj, t)  # (T, K, J) each: sums of cos / sin(t_j s) over B
        count = z.new_full((1,), float(B))  # a device fill, not a host-to-device copy
        if _world_size(group) > 1:
            packed = torch.cat([cos_sum.flatten(), sin_sum.flatten(), count])  # (2*T*K*J + 1,)
            packed = _AllReduceSum.apply(packed, group)
            n = T * num_directions * num_knots
            cos_sum, sin_sum = packed[:n].view_as(cos_sum), packed[n : 2 * n].view_as(sin_sum)
            count = packed[2 * n :].detach()
        n_global = count[0]
        re, im = cos_sum / n_global, sin_sum / n_global  # (T, K, J) global ECF
        err = (re - torch.exp(-0.5 * t**2)) ** 2 + im**2  # (T, K, J) |phi_hat - phi|^2
        ep = n_global * (err * w).sum(-1)  # (T, K) Epps-Pulley statistic per direction
        return ep.mean()  # mean over directions and time steps


class SIGReg(nn.Module):
    """Module form of `sigreg` holding its hyper-parameters (see that function)."""

    def __init__(
        self, num_directions: int = 1024, num_knots: int = 17, t_max: float = 3.0, seed: int = 0, group=None,
        directions_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_directions, self.num_knots, self.t_max, self.seed, self.group = (
            num_directions, num_knots, t_max, seed, group,
        )
        self.directions_device = directions_device

    def forward(self, z: torch.Tensor, step: int) -> torch.Tensor:
        return sigreg(z, step, self.num_directions, self.num_knots, self.t_max, self.seed, self.group,
                      self.directions_device)

    def extra_repr(self) -> str:
        return f"num_directions={self.num_directions}, num_knots={self.num_knots}, t_max={self.t_max}, seed={self.seed}"

