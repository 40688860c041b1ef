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
    """(cos x).sum(1) and (sin x).sum(1) of x (T, B, K, J), keeping cos x and sin x for backward.

    Autograd's own graph for `x.cos().sum(1), x.sin().sum(1)` saves x and evaluates sin and cos
    again in backward; here the forward's values are reused. The backward is the same
    arithmetic in the same order (d cos = -sin, d sin = cos), so gradients are bit-identical to
    autograd's (tested). It keeps one more (T, B, K, J) tensor and makes a Push-T tiny training
    step 3-4% faster on a 2-core CPU (docs/benchmarks.md).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = x.cos(), x.sin()
        ctx.save_for_backward(cos, sin)
        return cos.sum(1), sin.sum(1)

    @staticmethod
    def backward(ctx, grad_cos: torch.Tensor, grad_sin: torch.Tensor) -> torch.Tensor:
        cos, sin = ctx.saved_tensors
        return grad_cos.unsqueeze(1) * -sin + grad_sin.unsqueeze(1) * cos


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
        x = proj[..., None] * t  # (T, B, K, J)
        cos_sum, sin_sum = _CosSinSums.apply(x)  # (T, K, J) each
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

