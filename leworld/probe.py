"""Probing (as in the LeWM paper's Tables 1 and 3): how much physical state one frame's embedding holds.

Example:
    python -m leworld.probe --model runs/tworoom_tiny/version_0/model --out runs/probe/tworoom_tiny.json

The same from Python:
    >>> from leworld import load_model
    >>> from leworld.data.store import EpisodeStore
    >>> from leworld.probe import probe
    >>> result = probe(load_model("runs/tworoom_tiny/version_0/model"), EpisodeStore("data/tworoom_64.h5"))
    >>> result["quantities"]["agent"]["linear"]["r"]  # mean Pearson r of x and y on validation episodes

Protocol `probe-v1`. Frames: the episode split of training (`split_episodes` with the model's
val_fraction and split_seed); `frames_per_episode` random rows of each episode, at most
`max_train_frames` / `max_val_frames` (random whole episodes dropped beyond that). One frame ->
one embedding (D,) -> one quantity: Two-Room agent position (x, y); Push-T agent position, block
position, block angle as (cos, sin). Each quantity gets its own probes, fitted on training
episodes only: a linear probe (closed-form ridge regression, float64) and an MLP probe (one
hidden layer, GELU, Adam, early stopping) that learns the residual of a linear probe, so that it
starts at the linear fit, and its stopping epoch is never worse than that start on the held-out
training rows by the criterion it stops on: the mean over outputs of the squared residual error,
each output divided by the std of its training residual. By another weighting of the outputs (the
targets' own stds, or original units), or on validation episodes, it can still score below the
linear probe. Features and targets are standardised with
training statistics; the ridge strength and the MLP's stopping epoch are chosen on held-out
training episodes (`holdout_fraction`), never on validation episodes. Scores on validation
episodes, in original units (world px for positions): MSE and Pearson r per output; the
quantity's MSE and r are the means over its outputs (x and y, or cos and sin).
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from leworld.allocator import keep_freed_memory
from leworld.cli import HelpFormatter
from leworld.checkpoint import find_model, load_model, model_extra, recorded_data_path, result_path, weights_file
from leworld.device import resolve_device
from leworld.results import (
    check_writable, package_version, recorded_model, replaced_model_note, sha256_file, write_json,
)
from leworld.data.clips import split_episodes
from leworld.data.store import DatasetError, EpisodeStore, fill_collect_hint

PROTOCOL = "probe-v1"
RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # tried on standardised features
OUTPUTS = {"agent": ("x", "y"), "block": ("x", "y"), "angle": ("cos", "sin")}
QUANTITIES = {"tworoom": ("agent",), "pusht": ("agent", "block", "angle")}
UNITS = {"tworoom": "world px (224 x 224 world)", "pusht": "world units (512 x 512 world); angle: cos, sin"}
PAPER_LINEAR_R = {"tworoom": {"agent": 0.996}, "pusht": {"agent": 0.974, "block": 0.986, "angle": 0.902}}
PAPER_MLP_R = {"tworoom": {}, "pusht": {"agent": 0.998, "block": 0.999, "angle": 0.990}}


def targets(env: str, state: np.ndarray) -> dict[str, np.ndarray]:
    """state (N, S) float64 -> {quantity: (N, 2)} (the state layouts of envs/two_room.py, envs/push_t.py)."""
    if env not in QUANTITIES:
        raise ValueError(f"no probe quantities for env {env!r}: choose one of {', '.join(QUANTITIES)}")
    out = {"agent": state[:, 0:2]}
    if env == "pusht":
        out["block"] = state[:, 2:4]
        out["angle"] = np.stack([np.cos(state[:, 4]), np.sin(state[:, 4])], axis=1)
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of a, b in float64: (N, K) -> (K,) per column, (N,) -> a float; NaN for a constant column."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim not in (1, 2) or len(a) < 2:
        raise ValueError(f"pearson needs two arrays of equal shape (N,) or (N, K), N >= 2, got {a.shape}, {b.shape}")
    ac, bc = a - a.mean(0), b - b.mean(0)
    den = np.sqrt((ac * ac).sum(0) * (bc * bc).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (ac * bc).sum(0) / den, np.nan)
    return r if r.ndim else float(r)


def holdout_split(n: int, groups: np.ndarray | None, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held_out) of n rows; whole groups (episodes) are held out when given."""
    rng = np.random.default_rng(seed)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    unique = rng.permutation(np.unique(groups))
    if len(unique) < 2:
        raise ValueError("a held-out part needs rows from at least 2 episodes (groups)")
    num_held = held_out_count(len(unique), fraction)
    held = np.isin(groups, unique[:num_held])
    return np.flatnonzero(~held), np.flatnonzero(held)


def held_out_count(groups: int, fraction: float) -> int:
    """How many of `groups` episodes `holdout_split` holds out."""
    return min(groups - 1, max(1, round(fraction * groups)))


def check_holdouts(train_episodes: int, fraction: float) -> None:
    """The MLP probe holds out training episodes to stop on, and its linear base chooses its ridge
    on a second hold-out inside the rest, which needs at least 2 episodes: ValueError otherwise."""
    rest = train_episodes - held_out_count(train_episodes, fraction) if train_episodes >= 2 else train_episodes
    if rest < 2:
        raise ValueError(
            f"the probes have {train_episodes} training episode(s); the MLP probe holds out "
            f"{train_episodes - rest} of them (--holdout-fraction {fraction}) and chooses its linear base's ridge on "
            f"a second hold-out inside the other {rest}, which needs at least 2: keep more training episodes "
            "(raise --max-train-frames, or lower --frames-per-episode) or lower --holdout-fraction")


@dataclass
class Standardiser:
    """z = (a - mean) / std with training statistics; a constant column gets std 1."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, a: np.ndarray) -> "Standardiser":
        std = a.std(0)
        return cls(a.mean(0), np.where(std > 1e-12 * (1 + np.abs(a).max(0)), std, 1.0))

    def __call__(self, a: np.ndarray) -> np.ndarray:
        return (a - self.mean) / self.std


# ---- linear probe ------------------------------------------------------------------------------
@dataclass
class LinearProbe:
    """y = x @ weight + bias in original units; weight (D, K), bias (K,)."""

    weight: np.ndarray
    bias: np.ndarray
    ridge: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.weight + self.bias  # (N, K)


def _ridge_solve(xs: np.ndarray, ys: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W |xs W - ys|^2 / n + ridge |W|^2 for centred xs (n, D), ys (n, K) -> W (D, K)."""
    n, d = xs.shape
    if ridge == 0.0:
        return np.linalg.lstsq(xs, ys, rcond=None)[0]
    return np.linalg.solve(xs.T @ xs / n + ridge * np.eye(d), xs.T @ ys / n)


def select_ridge(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, holdout_fraction: float = 0.2,
                 seed: int = 0) -> float:
    """The strength in RIDGES whose probe, fitted on all but the held-out rows, has the least MSE on them.

    The held-out rows (whole `groups`, a `holdout_fraction` of them) take no part in the fit: features
    and targets are standardised with the fitting rows' statistics, and the MSE is that of the
    targets so standardised.
    """
    fit, held = holdout_split(len(x), groups, holdout_fraction, seed)
    fx, fy = Standardiser.fit(x[fit]), Standardiser.fit(y[fit])
    xf, yf, xh, yh = fx(x[fit]), fy(y[fit]), fx(x[held]), fy(y[held])  # fitting rows centred
    errors = [np.mean((xh @ _ridge_solve(xf, yf, lam) - yh) ** 2) for lam in RIDGES]
    return RIDGES[int(np.argmin(errors))]


def fit_linear(x: np.ndarray, y: np.ndarray, ridge: float | None = None, groups: np.ndarray | None = None,
               holdout_fraction: float = 0.2, seed: int = 0) -> LinearProbe:
    """Ridge regression x (N, D) -> y (N, K) on standardised features and targets, in float64.

    ridge None: the strength in RIDGES with the least held-out MSE (`select_ridge`: held-out rows are
    whole `groups`, a `holdout_fraction` of them, and take no part in that fit), then refitted on all
    rows; a number fixes it (0: least squares).
    """
    if ridge is not None and not (np.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"the ridge strength must be a finite number >= 0 (0: least squares), got {ridge}")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if ridge is None:
        ridge = select_ridge(x, y, groups, holdout_fraction, seed)
    fx, fy = Standardiser.fit(x), Standardiser.fit(y)
    xs, ys = fx(x), fy(y)  # (N, D), (N, K), both centred
    ws = _ridge_solve(xs, ys, ridge)  # (D, K) in standardised units
    weight = ws / fx.std[:, None] * fy.std[None, :]  # (D, K): y = my + sy * ((x - mx) / sx) @ ws
    return LinearProbe(weight, fy.mean - fx.mean @ weight, float(ridge))


# ---- MLP probe ------------------------------------------------------------------------------------
@dataclass
class MLPProbe:
    """The linear probe plus a one-hidden-layer MLP on its residual:
    y = linear(x) + de-standardise(Linear(hidden, K)(GELU(Linear(D, hidden)(standardise(x)))))."""

    net: nn.Module
    fx: Standardiser
    fy: Standardiser  # of the linear probe's residual
    linear: LinearProbe
    best_epoch: int
    epochs_run: int

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        xs = torch.from_numpy(self.fx(x)).float()  # (N, D)
        return self.linear.predict(x) + self.net(xs).double().numpy() * self.fy.std + self.fy.mean  # (N, K)


@contextmanager
def _one_thread():
    """Tiny matrices gain little from a second thread, and threads stall each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_mlp(x: np.ndarray, y: np.ndarray, hidden: int = 256, epochs: int = 200, lr: float = 1e-3,
            batch_size: int = 256, patience: int = 20, groups: np.ndarray | None = None,
            holdout_fraction: float = 0.2, seed: int = 0) -> MLPProbe:
    """One-hidden-layer MLP x (N, D) -> y (N, K) on top of a linear probe, Adam on the MSE.

    A ridge probe is fitted first (on the training rows only); the MLP learns its residual,
    starting from zero output, so training begins at the linear solution. Trains on all but the
    held-out groups; keeps the weights of the epoch (0: the linear probe alone) with the least
    held-out MSE and stops after `patience` epochs without improvement. A plain MLP on a
    low-rank embedding fits the noise of its many weak dimensions and can score below the linear
    probe; this one cannot, on the held-out rows, by its stopping criterion: the MSE of the
    residual standardised per output by its training std, averaged over outputs (weighted
    otherwise, e.g. in original units, the kept epoch can score below epoch 0). Seeded: same inputs, same probe (the global
    torch RNG and thread count are left as they were). Runs on one thread.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    fit, held = holdout_split(len(x), groups, holdout_fraction, seed)
    linear = fit_linear(x[fit], y[fit], None, None if groups is None else np.asarray(groups)[fit], holdout_fraction,
                        seed)
    residual = y - linear.predict(x)  # (N, K)
    fx, fy = Standardiser.fit(x[fit]), Standardiser.fit(residual[fit])
    xf, yf = (torch.from_numpy(a).float() for a in (fx(x[fit]), fy(residual[fit])))  # (n, D), (n, K)
    xh, yh = (torch.from_numpy(a).float() for a in (fx(x[held]), fy(residual[held])))
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Linear(hidden, y.shape[1]))
        nn.init.zeros_(net[-1].weight)  # epoch 0 is the linear probe
        nn.init.zeros_(net[-1].bias)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        with torch.no_grad():
            best = float((net(xh) - yh).pow(2).mean())
        best_state, best_epoch, epoch = {k: v.clone() for k, v in net.state_dict().items()}, 0, 0
        for epoch in range(1, epochs + 1):
            for idx in torch.randperm(len(xf)).split(batch_size):
                loss = (net(xf[idx]) - yf[idx]).pow(2).mean()  # MSE of the standardised residual
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                held_mse = float((net(xh) - yh).pow(2).mean())
            if held_mse < best:
                best, best_epoch = held_mse, epoch
                best_state = {name: v.clone() for name, v in net.state_dict().items()}
            elif epoch - best_epoch >= patience:
                break
    net.load_state_dict(best_state)
    return MLPProbe(net.eval(), fx, fy, linear, best_epoch, epoch)


# ---- frames and embeddings ---------------------------------------------------------------------
def select_frames(store, episodes: np.ndarray, frames_per_episode: int, max_frames: int | None,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random rows of `episodes` -> (rows (N,), episode of each row (N,)), sorted by row.

    Each episode gives min(frames_per_episode, its length) distinct rows; when that exceeds
    `max_frames`, a random subset of max_frames // frames_per_episode episodes is kept.
    """
    episodes = np.sort(np.asarray(episodes, np.int64))
    if max_frames is not None and max_frames < frames_per_episode:
        raise ValueError(f"a cap of {max_frames} frames keeps no episode's {frames_per_episode} frames: raise the "
                         "cap (--max-train-frames / --max-val-frames) or lower --frames-per-episode")
    if max_frames is not None and len(episodes) * frames_per_episode > max_frames:
        episodes = np.sort(rng.choice(episodes, max(1, max_frames // frames_per_episode), replace=False))
    rows, owner = [], []
    for e in episodes:
        length = int(store.episode_length[e])
        picked = np.sort(rng.choice(length, min(frames_per_episode, length), replace=False))
        rows.append(int(store.episode_offset[e]) + picked)
        owner.append(np.full(len(picked), e))
    return np.concatenate(rows), np.concatenate(owner)


@torch.no_grad()
def embed_frames(model, store, rows: np.ndarray, batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """Embeddings (N, D) float32 of the single frames `rows` of `store`, encoded in batches."""
    if model.training:
        raise ValueError("probing needs the model in eval mode (BatchNorm in the projector): call model.eval().")
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc="encode", unit="batch", disable=not progress):
        pixels = torch.from_numpy(store.read("pixels", rows[start : start + batch_size]))  # (B, Hp, Wp, C)
        pixels = pixels.permute(0, 3, 1, 2)[:, None].to(device)  # (B, 1, C, Hp, Wp)
        out.append(model.encode(pixels)[:, 0].float().cpu())  # (B, D)
    return torch.cat(out).numpy()


def _scores(pred: np.ndarray, true: np.ndarray) -> dict:
    mse = ((pred - true) ** 2).mean(0)  # (K,)
    r = pearson(pred, true)  # (K,)
    return {"mse": float(mse.mean()), "r": float(r.mean()), "mse_per_output": mse.tolist(), "r_per_output": r.tolist()}


def probe(model, store, env: str | None = None, val_fraction: float = 0.1, split_seed: int = 0,
          frames_per_episode: int = 8, max_train_frames: int | None = 20000, max_val_frames: int | None = 5000,
          seed: int = 0, ridge: float | None = None, mlp_hidden: int = 256, mlp_epochs: int = 200,
          mlp_patience: int = 20, holdout_fraction: float = 0.2, batch_size: int = 256,
          progress: bool = True) -> dict:
    """Fit linear and MLP probes on training episodes, score them on validation episodes.

    Args:
        model: a LeWorldModel in eval mode whose image_size matches the store's frames.
        store: the EpisodeStore the model was trained on (its metadata names the env).
        env: "tworoom" or "pusht"; default the store's.
        val_fraction, split_seed: the training run's episode split (`split_episodes`).
        frames_per_episode: random frames drawn from each episode.
        max_train_frames, max_val_frames: caps on the frames of each side (None: no cap).
        seed: seed of the frame draws, the held-out training episodes and the MLP.
        ridge: linear probe strength; None chooses it from RIDGES on held-out training episodes. The
            MLP probe's linear base always chooses its own (`fit_mlp`).
        mlp_hidden, mlp_epochs, mlp_patience: the MLP probe's width, epoch budget and early stop.
        holdout_fraction: training episodes held out to choose the ridge and stop the MLP.
        batch_size: frames per encoder call.
        progress: show progress bars.
    Returns a dict: env, units, frame counts, and per quantity its outputs, linear and MLP scores
    (mse, r: means over outputs; per-output lists) and the paper's r.
    """
    env = env or store.metadata.get("env")
    if env not in QUANTITIES:
        raise ValueError(f"no probe quantities for env {env!r}: choose one of {', '.join(QUANTITIES)}")
    if model.config.image_size != store.resolution:
        raise ValueError(f"the model encodes {model.config.image_size} px frames but {store.path} holds "
                         f"{store.resolution} px frames: probe the dataset the model was trained on")
    train_eps, val_eps = split_episodes(store.num_episodes, val_fraction, split_seed)
    if len(val_eps) == 0:
        raise ValueError("no validation episodes: probing needs val_fraction > 0 and at least 2 episodes")
    rng = np.random.default_rng(seed)
    train_rows, train_owner = select_frames(store, train_eps, frames_per_episode, max_train_frames, rng)
    val_rows, val_owner = select_frames(store, val_eps, frames_per_episode, max_val_frames, rng)
    check_holdouts(len(np.unique(train_owner)), holdout_fraction)  # before the frames are encoded
    t0 = time.perf_counter()
    x_train = embed_frames(model, store, train_rows, batch_size, progress)  # (N, D)
    x_val = embed_frames(model, store, val_rows, batch_size, progress)  # (M, D)
    t1 = time.perf_counter()
    y_train, y_val = targets(env, store.read("state", train_rows)), targets(env, store.read("state", val_rows))
    quantities = {}
    for name in tqdm(QUANTITIES[env], desc="fit probes", disable=not progress):
        linear = fit_linear(x_train, y_train[name], ridge, train_owner, holdout_fraction, seed)
        mlp = fit_mlp(x_train, y_train[name], mlp_hidden, mlp_epochs, patience=mlp_patience, groups=train_owner,
                      holdout_fraction=holdout_fraction, seed=seed)
        quantities[name] = {
            "outputs": list(OUTPUTS[name]),
            "linear": {**_scores(linear.predict(x_val), y_val[name]), "ridge": linear.ridge},
            "mlp": {**_scores(mlp.predict(x_val), y_val[name]), "best_epoch": mlp.best_epoch,
                    "epochs_run": mlp.epochs_run},
            "paper_linear_r": PAPER_LINEAR_R[env].get(name), "paper_mlp_r": PAPER_MLP_R[env].get(name),
        }
    return {
        "env": env, "units": UNITS[env], "embed_dim": int(x_train.shape[1]),
        "frames": {"train": len(train_rows), "val": len(val_rows), "train_episodes": len(np.unique(train_owner)),
                   "val_episodes": len(np.unique(val_owner))},
        "seconds": {"encode": t1 - t0, "fit": time.perf_counter() - t1},
        "quantities": quantities,
    }


# ---- command line -----------------------------------------------------------------------------------
def table(result: dict) -> str:
    """The result as a text table: our scores on validation episodes beside the paper's r."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"{'quantity':<16}{'linear MSE':>12}{'linear r':>10}{'MLP MSE':>12}{'MLP r':>10}"
             f"{'paper linear r':>16}{'paper MLP r':>13}"]
    for name, q in result["quantities"].items():
        label = f"{name} ({', '.join(q['outputs'])})"
        lines.append(f"{label:<16}{q['linear']['mse']:>12.4g}{q['linear']['r']:>10.4f}{q['mlp']['mse']:>12.4g}"
                     f"{q['mlp']['r']:>10.4f}{fmt(q['paper_linear_r']):>16}{fmt(q['paper_mlp_r']):>13}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m leworld.probe", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="exported model directory (model.safetensors + config.json), a "
                   "run directory (its newest model), or a training .ckpt (probed with the data settings saved in it)")
    p.add_argument("--data", default=None, help="dataset .h5 (default: extra.data.path in the model's config.json)")
    p.add_argument("--out", default=None, help="result JSON (default runs/probe/<run name>.json; with a --seed other than 0, <run name>-seed<N>.json)")
    p.add_argument("--val-fraction", type=float, default=None, help="episode split (default: the model's)")
    p.add_argument("--split-seed", type=int, default=None, help="episode split seed (default: the model's)")
    p.add_argument("--frames-per-episode", type=int, default=8, help="random frames drawn from each episode")
    p.add_argument("--max-train-frames", type=int, default=20000, help="cap on training frames")
    p.add_argument("--max-val-frames", type=int, default=5000, help="cap on validation frames")
    p.add_argument("--ridge", type=float, default=None, help="fixed ridge strength of the linear probe (default: chosen on held-out episodes; the MLP probe's "
                   "linear base always chooses its own)")
    p.add_argument("--mlp-hidden", type=int, default=256, help="MLP probe hidden width")
    p.add_argument("--mlp-epochs", type=int, default=200, help="MLP probe epoch budget")
    p.add_argument("--mlp-patience", type=int, default=20, help="epochs without held-out improvement before stopping")
    p.add_argument("--holdout-fraction", type=float, default=0.2, help="training episodes held out for model selection")
    p.add_argument("--batch-size", type=int, default=256, help="frames per encoder call")
    p.add_argument("--seed", type=int, default=0, help="seed of the frame draws, held-out episodes and MLP")
    p.add_argument("--device", default="cpu", help="torch device that encodes the frames")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    if args.frames_per_episode < 1 or args.batch_size < 1 or args.mlp_epochs < 1 or args.mlp_hidden < 1:
        p.error("frames-per-episode, batch-size, mlp-epochs and mlp-hidden must be positive")
    if args.mlp_patience < 1:
        p.error(f"--mlp-patience must be at least 1, got {args.mlp_patience}")
    if args.split_seed is not None and args.split_seed < 0:
        p.error(f"--split-seed must be >= 0, got {args.split_seed}")
    for flag in ("max_train_frames", "max_val_frames"):
        if getattr(args, flag) < 2 * args.frames_per_episode:
            p.error(f"--{flag.replace('_', '-')} ({getattr(args, flag)}) must keep the frames of at least 2 "
                    f"episodes: at least 2 x --frames-per-episode = {2 * args.frames_per_episode}")
    if not 0.0 < args.holdout_fraction < 1.0:
        p.error(f"holdout-fraction must be in (0, 1), got {args.holdout_fraction}")
    check_common_args(p, args)
    return args


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks of the options `leworld.probe`, `leworld.forecast` and `leworld.separation` share,
    before any work: the ridge strength, the seed, the device and the result path."""
    ridge = getattr(args, "ridge", None)
    if ridge is not None and not (np.isfinite(ridge) and ridge >= 0):
        p.error(f"--ridge must be a finite number >= 0 (0: least squares), got {ridge}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    try:
        args.device = str(resolve_device(args.device))
        if args.out is not None:
            check_writable(args.out)
    except ValueError as e:
        p.error(str(e))


def open_model_and_data(model_arg, data_arg=None, device: str = "cpu"):
    """The command-line loading shared by `leworld.probe` and `leworld.forecast`: a model in eval
    mode and its dataset (`data_arg` or the one the model's record names), checked to be of the
    same env. The model is an exported directory, a run directory (its newest model) or a
    Lightning .ckpt written during training. Returns (model path, model, store, data_path,
    data_env, the record's data settings); every problem exits with a clear error."""
    model_path = find_model(model_arg)  # a run directory (runs/<name>) means its newest model
    is_ckpt = model_path.is_file() and model_path.suffix == ".ckpt"
    if not is_ckpt and (not (model_path / "config.json").is_file() or not (model_path / "model.safetensors").is_file()):
        raise SystemExit(f"error: no exported model at {model_path} (expected a directory with model.safetensors "
                         "and config.json, e.g. runs/tworoom_tiny/version_0/model, or a training .ckpt)")
    try:
        model = load_model(model_path, map_location=device).eval()
        extra = model_extra(model_path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    record = f"the checkpoint {model_path}" if is_ckpt else f"{model_path}/config.json"
    data = extra.get("data") or {}
    data_path = data_arg or recorded_data_path(model_path, data.get("path"))
    if data_path is None:
        raise SystemExit(f"error: {record} names no dataset: pass --data")
    try:
        store = EpisodeStore(data_path)
    except DatasetError as e:
        hint = "" if data_arg else f" (the path comes from {record}; --data overrides it)"
        dataset = extra.get("dataset") or {}
        message = fill_collect_hint(str(e), dataset.get("env"), model.config.image_size,
                                    (dataset.get("env_params") or {}).get("supersample"))
        raise SystemExit(f"error: {message}{hint}") from None
    model_env, data_env = (extra.get("dataset") or {}).get("env"), store.metadata.get("env")
    if model_env is not None and data_env != model_env:
        raise SystemExit(f"error: the model was trained on {model_env} but {data_path} holds {data_env} "
                         "episodes: pass the model's own dataset with --data")
    return model_path, model, store, data_path, data_env, data


def command_record(protocol: str, args: argparse.Namespace, model_path, data_path, val_fraction: float,
                   split_seed: int) -> dict:
    """The head of a command's result JSON, shared by `leworld.probe`, `leworld.forecast` and
    `leworld.separation`: protocol, package version, model and its weights' sha256, dataset, seed
    and the settings."""
    return {
        "protocol": protocol, "leworld_version": package_version(), "model": str(args.model),
        "model_dir": str(model_path), "model_sha256": sha256_file(weights_file(model_path)), "data": str(data_path), "seed": args.seed,
        "settings": {**vars(args), "data": str(data_path), "val_fraction": val_fraction, "split_seed": split_seed},
    }


def run_command(kind: str, protocol: str, args: argparse.Namespace, score: Callable, describe: Callable,
                table: Callable, split: Callable | None = None) -> dict:
    """The body of the `main` of `leworld.probe`, `leworld.forecast` and `leworld.separation`.

    Opens the model and its data (`open_model_and_data`), scores them with
    `score(model, store, env, val_fraction, split_seed) -> dict`, writes the result JSON (the
    `command_record` head, the scores, torch threads and wall time) to `args.out` or
    `runs/<kind>/...`, and prints `describe(result)`, `table(result)` and where it was written.
    `split(model_path, data_path, data settings) -> (val_fraction, split_seed)` chooses the split;
    by default the one the model was trained with. A ValueError from `score` exits with its message.
    """
    start = time.perf_counter()
    out = Path(args.out or result_path(kind, args.model, args.seed))
    try:  # the default path too, before any work (an explicit --out was checked with the arguments)
        check_writable(out)
    except ValueError as e:
        raise SystemExit(f"error: {e}; pass --out to write elsewhere") from None
    model_path, model, store, data_path, data_env, data = open_model_and_data(args.model, args.data, args.device)
    if split is None:
        val_fraction, split_seed = data.get("val_fraction", 0.1), data.get("split_seed", 0)
    else:
        val_fraction, split_seed = split(model_path, data_path, data)
    try:
        result = score(model, store, data_env, val_fraction, split_seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    result = {**command_record(protocol, args, model_path, data_path, val_fraction, split_seed), **result,
              "torch_threads": torch.get_num_threads(), "wall_seconds": time.perf_counter() - start}
    before = recorded_model(out)
    write_json(out, result)
    print(describe(result))
    print(table(result))
    print(f"wrote {out} in {result['wall_seconds']:.1f} s")
    replaced = replaced_model_note(out, before, result["model_sha256"])
    if replaced:
        print(replaced, file=sys.stderr)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()  # faster CPU steps on Linux (leworld/allocator.py)

    def split(model_path, data_path, data):
        val_fraction = data.get("val_fraction", 0.1) if args.val_fraction is None else args.val_fraction
        split_seed = data.get("split_seed", 0) if args.split_seed is None else args.split_seed
        trained_on = recorded_data_path(model_path, data.get("path"))
        own_data = trained_on is not None and Path(data_path).resolve() == Path(trained_on).resolve()
        if own_data and (val_fraction, split_seed) != (data.get("val_fraction", 0.1), data.get("split_seed", 0)):
            print(f"warning: --val-fraction {val_fraction} / --split-seed {split_seed} is not the split the model "
                  f"was trained with ({data.get('val_fraction', 0.1)} / {data.get('split_seed', 0)}) on this "
                  "dataset: some 'validation' episodes were trained on, so the scores are optimistic", file=sys.stderr)
        return val_fraction, split_seed

    def score(model, store, env, val_fraction, split_seed):
        return probe(model, store, env=env, val_fraction=val_fraction, split_seed=split_seed,
                     frames_per_episode=args.frames_per_episode, max_train_frames=args.max_train_frames,
                     max_val_frames=args.max_val_frames, seed=args.seed, ridge=args.ridge,
                     mlp_hidden=args.mlp_hidden, mlp_epochs=args.mlp_epochs, mlp_patience=args.mlp_patience,
                     holdout_fraction=args.holdout_fraction, batch_size=args.batch_size,
                     progress=not args.no_progress)

    def describe(result):
        f = result["frames"]
        return (f"{result['env']}: {f['train']} training frames ({f['train_episodes']} episodes), {f['val']} "
                f"validation frames ({f['val_episodes']} episodes); MSE in {result['units']}; r: mean over outputs")

    return run_command("probe", PROTOCOL, args, score, describe, table, split)


if __name__ == "__main__":
    main(sys.argv[1:])
