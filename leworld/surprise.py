"""Surprise (violation of expectation, LeWM paper section 5.2): how badly the model predicted each frame.

Example:
    >>> import torch
    >>> from leworld.model import LeWMConfig, LeWorldModel
    >>> from leworld.surprise import calibrate, trajectory_surprise
    >>> model = LeWorldModel(LeWMConfig(encoder="cnn", image_size=32, history=2, pred_depth=1)).eval()
    >>> pixels = torch.randint(0, 256, (4, 6, 3, 32, 32), dtype=torch.uint8)  # (B, L, C, Hp, Wp)
    >>> actions = torch.randn(4, 5, 10)  # (B, L-1, frameskip*A) raw action blocks
    >>> s = trajectory_surprise(model, pixels, actions)  # (B, L); column 0 is NaN
    >>> flags = calibrate(s, false_alarm_rate=0.01).detect(s)  # (B, L) bool

Surprise of frame t = || prediction of frame t - encode(frame t) ||^2 (squared L2 over D). The
prediction of frame t + 1 sees frames max(0, t - H + 1) .. t and the action blocks executed
after each of them (H = config.history); with `horizon` k, frame t + k is predicted by a k-step
`rollout` from the same history and blocks t .. t + k - 1. Columns of frames that have no
prediction (the first k) are NaN. `calibrate` turns surprise on nominal runs into per-step
z-scores and a threshold with a target false-alarm rate; the statistics at the bottom
(AUROC, paired t-test, detection rate, latency) are what `surprise.py` reports.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch


# ---- surprise ----------------------------------------------------------------------------------
@torch.no_grad()
def embedding_surprise(model, emb: torch.Tensor, blocks: torch.Tensor, horizon: int = 1) -> torch.Tensor:
    """emb (B, L, D), normalised blocks (B, L-1, frameskip*A) -> surprise (B, L), NaN for frames < horizon.

    Windows with a full history are unfolded into the batch (one `rollout` call); the at most
    H - 1 early frames with a shorter history are looped over.
    """
    if model.training:
        raise ValueError("surprise needs the model in eval mode (dropout, BatchNorm): call model.eval().")
    if emb.ndim != 3 or blocks.ndim != 3 or blocks.shape[:2] != (emb.shape[0], emb.shape[1] - 1):
        raise ValueError(
            f"expected emb (B, L, D) and blocks (B, L-1, frameskip*A), got {tuple(emb.shape)} and "
            f"{tuple(blocks.shape)}: block t holds the actions executed after frame t."
        )
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    B, L, D = emb.shape
    H, k = model.config.history, horizon
    out = emb.new_full((B, L), float("nan"))
    for t in range(min(H - 1, L - k)):  # short history: frames 0 .. t
        pred = model.rollout(emb[:, : t + 1], blocks[:, t : t + k, None].transpose(1, 2), blocks[:, :t])
        out[:, t + k] = (pred[:, 0, -1] - emb[:, t + k]).pow(2).sum(-1)
    n = L - H - k + 1  # windows with a full history: last context frame t = H-1 .. L-1-k
    if n > 0:
        ctx = emb.unfold(1, H, 1)[:, :n].permute(0, 1, 3, 2).reshape(B * n, H, D)  # (B*n, H, D)
        acts = blocks.unfold(1, H + k - 1, 1)[:, :n]  # (B, n, frameskip*A, H+k-1)
        acts = acts.permute(0, 1, 3, 2).reshape(B * n, H + k - 1, -1)  # (B*n, H+k-1, frameskip*A)
        pred = model.rollout(ctx, acts[:, H - 1 :, None].transpose(1, 2), acts[:, : H - 1])  # (B*n, 1, k, D)
        target = emb[:, H + k - 1 :]  # (B, n, D): frames t + k
        out[:, H + k - 1 :] = (pred[:, 0, -1].view(B, n, D) - target).pow(2).sum(-1)
    return out


@torch.no_grad()
def trajectory_surprise(model, pixels: torch.Tensor, actions: torch.Tensor, horizon: int = 1,
                        chunk: int = 64) -> torch.Tensor:
    """pixels (B, L, C, Hp, Wp), raw action blocks (B, L-1, frameskip*A) -> surprise (B, L).

    Frames are encoded `chunk` trajectories at a time, on the device of `actions`.
    """
    emb = torch.cat([model.encode(pixels[i : i + chunk].to(actions.device)) for i in range(0, len(pixels), chunk)])
    return embedding_surprise(model, emb, model.normalize_actions(actions), horizon)  # (B, L)


# ---- calibration and detection --------------------------------------------------------------------
@dataclass
class Calibration:
    """Nominal surprise statistics: z = (surprise - mean) / std, a step is flagged when z > threshold.

    Args:
        mean: (L,) per-step mean of the nominal surprise a fresh run is scored against (that of
            N - 1 calibration runs, see `calibrate`), or (1,) pooled over steps; NaN where fewer
            than 3 runs had a finite surprise (such steps are never flagged).
        std: (L,) or (1,) their standard deviation (ddof 1), floored at `min_std` given to `calibrate`.
        threshold: z above which a step is flagged.
        false_alarm_rate: the target fraction of nominal steps flagged that set `threshold`.
    """

    mean: torch.Tensor
    std: torch.Tensor
    threshold: float
    false_alarm_rate: float

    def zscore(self, surprise: torch.Tensor) -> torch.Tensor:
        """surprise (B, L) -> z-scores (B, L)."""
        if self.mean.numel() > 1 and surprise.shape[-1] != self.mean.numel():
            raise ValueError(
                f"calibrated per step on {self.mean.numel()} frames, got surprise of {surprise.shape[-1]}; "
                "score trajectories as long as the calibration runs, or calibrate with per_step=False."
            )
        return (surprise.double() - self.mean.to(surprise.device)) / self.std.to(surprise.device)

    def detect(self, surprise: torch.Tensor) -> torch.Tensor:
        """surprise (B, L) -> flags (B, L) bool; NaN steps (no prediction) are never flagged."""
        return self.zscore(surprise) > self.threshold


def calibrate(nominal: torch.Tensor, false_alarm_rate: float = 0.01, per_step: bool = True,
              min_std: float = 1e-12) -> Calibration:
    """Fit a `Calibration` to nominal surprise (N, L) (NaN columns allowed).

    The threshold is the (1 - false_alarm_rate) quantile (the next value up) of the runs'
    leave-one-out z-scores: each run scored against the mean and std (ddof 1) of the other N - 1.
    A fresh run is scored the same way, against N - 1 of the runs (all but the last finite one of
    each step), so that its z-scores and the calibration runs' are alike in distribution and the
    threshold flags the target fraction of fresh nominal steps at any N with enough z-scores: with
    fewer than 1 / false_alarm_rate - 1 the threshold is their maximum, exceeded by about 1 in
    (their number + 1) fresh steps, more than the target (a warning says so). Scored against all N
    instead, fresh z-scores have lighter tails than those the threshold came from and too few steps
    are flagged at small N (Gaussian surprise, 19 steps, 1% target: 0.2% at N = 3, 0.5% at N = 5).
    In-sample z-scores, for their part, cannot exceed (N - 1) / sqrt(N) and sit closer to 0 than a
    fresh run's, so a threshold taken from them flags too many (21% at N = 3, 1.2% at N = 100).
    Needs at least 3 finite runs in some step; a step with fewer than 3 has no std and is never
    flagged.
    """
    if not 0.0 <= false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be in [0, 1), got {false_alarm_rate}")
    x = nominal.double()
    if x.ndim != 2 or not torch.isfinite(x).any():
        raise ValueError(f"nominal surprise must be (N, L) with finite values, got shape {tuple(x.shape)}")
    if not per_step:
        x = x[torch.isfinite(x)].view(-1, 1)  # (N*L, 1)
    finite = torch.isfinite(x)
    count = finite.sum(0)  # (L,)
    if int(count.max()) < 3:
        raise ValueError(f"calibrate needs at least 3 nominal runs with a finite surprise at some step, got "
                         f"{int(count.max())} (nominal shape {tuple(nominal.shape)}): pass more calibration runs")
    n = count.double()
    mean = torch.where(finite, x, 0.0).sum(0) / n  # (L,), NaN where no finite value
    d = torch.where(finite, x - mean, 0.0)  # (N, L) deviations, 0 where not finite
    ss = d.pow(2).sum(0)  # (L,)
    # leave-one-out: mean_-i = mean - d_i / (n - 1), SS_-i = SS - d_i^2 n / (n - 1)
    mean_loo = mean - d / (n - 1)  # (N, L)
    diff = d * n / (n - 1)  # x_i - mean_-i
    ss_loo = ss - d.pow(2) * n / (n - 1)
    # These cancel where one run dominates its step (one 1e8 times the others: the std 2% off):
    # those few, whose SS_-i is under 1e-4 of SS, are computed from the other runs directly.
    for i, j in (finite & (ss_loo < 1e-4 * ss)).nonzero().tolist():
        others = x[:, j][finite[:, j] & (torch.arange(x.shape[0], device=x.device) != i)]
        mean_loo[i, j] = others.mean()
        diff[i, j] = x[i, j] - mean_loo[i, j]
        ss_loo[i, j] = (others - mean_loo[i, j]).pow(2).sum()
    std_loo = (ss_loo.clamp_min(0.0) / (n - 2)).sqrt().clamp_min(min_std)
    z = diff / std_loo  # (N, L)
    scores = z[finite & (count >= 3)]
    threshold = float(torch.quantile(scores, 1.0 - false_alarm_rate, interpolation="higher"))
    if 0 < false_alarm_rate and (scores.numel() + 1) * false_alarm_rate < 1:
        warnings.warn(f"calibrating a {false_alarm_rate:g} false-alarm rate on {scores.numel()} nominal z-scores: "
                      f"the threshold is their maximum, which a fresh nominal step exceeds about "
                      f"1/{scores.numel() + 1} = {1 / (scores.numel() + 1):.2%} of the time. Use more calibration "
                      f"runs (at least {math.ceil(1 / false_alarm_rate) - 1} z-scores)", stacklevel=2)
    # fresh runs: against the N - 1 runs left when each step's last finite run is left out, i.e. the
    # leave-one-out mean and std of that run
    rows = torch.arange(x.shape[0], device=x.device)[:, None]  # (N, 1)
    last = (torch.where(finite, rows, -1).amax(0).clamp_min(0), torch.arange(x.shape[1], device=x.device))
    enough = count >= 3
    ref_mean = torch.where(enough, mean_loo[last], float("nan"))  # (L,)
    ref_std = torch.where(enough, std_loo[last], float("nan"))
    return Calibration(ref_mean, ref_std, threshold, float(false_alarm_rate))


def first_detection(flags: torch.Tensor, start: int, window: int | None = None) -> torch.Tensor:
    """flags (B, L) -> (B,) long: steps from `start` to the first flag in [start, start + window), -1 if none."""
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1 step, got {window}")
    span = flags[:, start : None if window is None else start + window]  # (B, W)
    if span.shape[1] == 0:  # start past the last step: nothing to detect
        return torch.full((flags.shape[0],), -1, dtype=torch.long, device=flags.device)
    hit = span.any(1)
    return torch.where(hit, span.int().argmax(1), torch.full_like(hit, -1, dtype=torch.long))


def detection_rate(flags: torch.Tensor, start: int, window: int | None = None) -> float:
    """Fraction of runs with a flag in [start, start + window)."""
    return float((first_detection(flags, start, window) >= 0).double().mean())


def mean_latency(flags: torch.Tensor, start: int, window: int | None = None) -> float:
    """Mean steps from `start` to the first flag over the detected runs (NaN when none is)."""
    lat = first_detection(flags, start, window)
    return float(lat[lat >= 0].double().mean()) if (lat >= 0).any() else float("nan")


def false_alarm_rate(flags: torch.Tensor) -> float:
    """Fraction of flagged steps (pass nominal runs, only the steps that have a prediction)."""
    return float(flags.double().mean())


# ---- statistics ---------------------------------------------------------------------------------------
def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted as half (Mann-Whitney U / n_p n_n)."""
    pos, neg = positive.double().flatten(), negative.double().flatten()
    if len(pos) == 0 or len(neg) == 0 or not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise ValueError("auroc needs non-empty, finite positive and negative scores")
    scores = torch.cat([pos, neg])
    order = scores.argsort()
    _, group, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    counts = counts.double()  # ranks in float64: exact for any realistic count
    mid_rank = counts.cumsum(0) - (counts - 1) / 2.0  # 1-based average rank of each group of ties
    ranks = torch.empty_like(scores)
    ranks[order] = mid_rank[group]
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1].

    Evaluates the continued fraction of I_x(a, b) (modified Lentz) where it converges fast,
    x < (a + 1) / (a + b + 2), and uses I_x(a, b) = 1 - I_{1-x}(b, a) elsewhere.
    """
    if a <= 0 or b <= 0 or not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x == 0.0 or x == 1.0:
        return x
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0  # f -> 1 + d_1 / (1 + d_2 / (1 + ...)), one term per iteration
    for i in range(1, 400):
        m = i // 2
        if i % 2:  # odd terms d_{2m+1}
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # even terms d_{2m}
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) / (a * f)  # I_x(a, b) = x^a (1-x)^b / (a B(a, b)) / f


def student_t_sf2(t: float, df: float) -> float:
    """Two-sided tail P(|T| >= |t|) of Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_t_test(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Paired t-test of mean(x - y) = 0: (t statistic, two-sided p-value), df = n - 1.

    All differences equal to zero give (0, 1); equal non-zero differences give (+-inf, 0).
    """
    if x.shape != y.shape or x.numel() < 2:
        raise ValueError(f"paired_t_test needs two samples of equal shape and size >= 2, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    d = (x.double() - y.double()).flatten()
    if not torch.isfinite(d).all():
        raise ValueError("paired_t_test needs finite samples")
    n, mean, sd = d.numel(), float(d.mean()), float(d.std(correction=1))
    if sd == 0.0:
        return (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(n))
    return t, student_t_sf2(t, n - 1)
