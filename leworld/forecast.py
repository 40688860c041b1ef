"""Forecast probing: how well the predictor foresees physical state, and what the planning cost weighs.

Example:
    python -m leworld.forecast --model runs/pusht_tiny --out runs/forecast/pusht_tiny.json

The same from Python:
    >>> from leworld import load_model
    >>> from leworld.data.store import EpisodeStore
    >>> from leworld.forecast import forecast
    >>> result = forecast(load_model("runs/pusht_tiny/version_0/model"), EpisodeStore("data/pusht_64.h5"))
    >>> result["quantities"]["block"]["steps"][-1]["skill"]  # 1 - forecast error / error of "nothing moves"

`leworld.probe` asks what one frame's embedding holds; this asks what a plan can rely on.
Protocol `forecast-v1`:

- Probes: one linear probe per quantity (`leworld.probe.fit_linear`), fitted on encoder
  embeddings of training-episode frames, exactly as `probe-v1` draws them.
- Forecasts: `num_clips` random clips of validation episodes, each `history` context frames plus
  `horizon` frames one action block (`frameskip` steps) apart. The predictor rolls out from the
  context with the recorded actions (`LeWorldModel.rollout`), as CEM does with its samples.
  At each step k the probe reads the predicted embedding; its error against the true state is
  compared with the error of copying the last context frame's state ("nothing moves") and with
  the probe's own error on the true frame's embedding (the floor). skill = 1 - forecast error /
  copy error: 1 is a perfect forecast, 0 no better than assuming nothing moves. Errors are the
  mean Euclidean distance in world px for positions and the mean wrapped angle error in degrees
  for the Push-T block angle (read from the probe's cos, sin with atan2). `displacement_r` is the
  Pearson r between the forecast and the true change since the last context frame (x and y
  pooled; for the angle, the wrapped change in degrees).
- Cost weights: over the same clips, the planning cost between the last context frame and the
  frame `horizon` blocks later (a `paper-v3`-like start and goal) is fitted by least squares as
  ||z_start - z_goal||^2 ~ sum_q w_q * d_q^2 + c, with d_q the true change of quantity q (px or
  degrees). sqrt(w_q) is the cost's slope per px (degree): the ratio of two slopes is how many
  px of one quantity the planner trades for one of the other. R^2 below 1 means the cost is not
  quadratic in the state change there (it saturates, or depends on other things).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from leworld.allocator import keep_freed_memory
from leworld.cli import HelpFormatter
from leworld.data.clips import ClipDataset, split_episodes
from leworld.probe import (
    QUANTITIES, LinearProbe, check_common_args, embed_frames, fit_linear, pearson, run_command, select_frames, targets,
)

PROTOCOL = "forecast-v1"
UNITS = {"agent": "px", "block": "px", "angle": "degrees"}


def wrap_degrees(a: np.ndarray) -> np.ndarray:
    """Angles in degrees wrapped into [-180, 180)."""
    return (np.asarray(a, np.float64) + 180.0) % 360.0 - 180.0


def state_quantity(env: str, name: str, state: np.ndarray) -> np.ndarray:
    """The true quantity from states (N, S): positions (N, 2) in px, the angle (N,) in degrees."""
    if name == "angle":
        return np.degrees(np.asarray(state, np.float64)[:, 4])
    return targets(env, np.asarray(state, np.float64))[name]


def read_quantity(name: str, probe_: LinearProbe, z: np.ndarray) -> np.ndarray:
    """The probe's reading of embeddings (N, D): positions (N, 2), the angle (N,) in degrees."""
    y = probe_.predict(z)  # (N, K)
    return np.degrees(np.arctan2(y[:, 1], y[:, 0])) if name == "angle" else y


def change(name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """b - a: (N, 2) for positions, (N,) wrapped degrees for the angle."""
    return wrap_degrees(b - a) if name == "angle" else b - a


def distance(name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row distance (N,): Euclidean px for positions, absolute wrapped degrees for the angle."""
    d = change(name, a, b)
    return np.abs(d) if name == "angle" else np.linalg.norm(d, axis=1)


def fit_probes(model, store, env: str, train_episodes: np.ndarray, frames_per_episode: int = 8,
               max_frames: int | None = 20000, ridge: float | None = None, seed: int = 0, batch_size: int = 256,
               progress: bool = True) -> dict[str, LinearProbe]:
    """Linear probes {quantity: LinearProbe} on encoder embeddings of training-episode frames."""
    rng = np.random.default_rng(seed)
    rows, owner = select_frames(store, train_episodes, frames_per_episode, max_frames, rng)
    if len(np.unique(owner)) < 2:
        raise ValueError(f"the probes need training frames from at least 2 episodes, got {len(rows)} frames from "
                         f"{len(np.unique(owner))}: raise --max-train-frames (at least 2 x --frames-per-episode)")
    z = embed_frames(model, store, rows, batch_size, progress)  # (N, D)
    y = targets(env, store.read("state", rows))
    return {name: fit_linear(z, y[name], ridge, owner, seed=seed) for name in QUANTITIES[env]}


def cost_weights(env: str, z_start: np.ndarray, z_goal: np.ndarray, s_start: np.ndarray,
                 s_goal: np.ndarray) -> dict:
    """Least-squares fit of the squared embedding distance on squared state changes, in float64.

    z_start, z_goal (N, D) embeddings; s_start, s_goal (N, S) states. Returns per quantity the
    weight w (cost per px^2 or degree^2) and slope sqrt(max(w, 0)), the intercept, R^2 and the
    number of pairs.
    """
    names = QUANTITIES[env]
    cost = ((np.asarray(z_start, np.float64) - np.asarray(z_goal, np.float64)) ** 2).sum(1)  # (N,)
    d2 = [distance(q, state_quantity(env, q, s_start), state_quantity(env, q, s_goal)) ** 2 for q in names]
    design = np.stack(d2 + [np.ones_like(cost)], axis=1)  # (N, Q + 1)
    if len(cost) <= design.shape[1]:
        raise ValueError(f"fitting the cost needs more than {design.shape[1]} pairs, got {len(cost)}")
    coef = np.linalg.lstsq(design, cost, rcond=None)[0]
    resid = cost - design @ coef
    total = ((cost - cost.mean()) ** 2).sum()
    r2 = float(1.0 - (resid ** 2).sum() / total) if total > 0 else float("nan")
    weights = {q: {"weight": float(w), "slope": float(np.sqrt(max(w, 0.0))), "unit": UNITS[q]}
               for q, w in zip(names, coef[:-1])}
    return {"quantities": weights, "intercept": float(coef[-1]), "r2": r2, "pairs": len(cost),
            "mean_cost": float(cost.mean())}


@torch.no_grad()
def forecast_clips(model, batch: dict, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch of clips (pixels (B, H+T, Hp, Wp, C), action (B, H+T-1, frameskip*A)) ->
    (encoder embeddings (B, H+T, D), rolled-out predictions (B, T, D)), float32 numpy."""
    H = model.config.history
    device = next(model.parameters()).device
    pixels = batch["pixels"].permute(0, 1, 4, 2, 3).to(device)  # (B, H+T, C, Hp, Wp)
    emb = model.encode(pixels).float()  # (B, H+T, D)
    blocks = model.normalize_actions(batch["action"].to(device).float())  # (B, H+T-1, frameskip*A)
    pred = model.rollout(emb[:, :H], blocks[:, H - 1 : H - 1 + horizon][:, None], blocks[:, : H - 1])[:, 0]
    return emb.cpu().numpy(), pred.float().cpu().numpy()


def forecast(model, store, env: str | None = None, horizon: int = 5, num_clips: int = 2000,
             val_fraction: float = 0.1, split_seed: int = 0, frames_per_episode: int = 8,
             max_train_frames: int | None = 20000, ridge: float | None = None, seed: int = 0,
             batch_size: int = 128, probes: dict[str, LinearProbe] | None = None, progress: bool = True) -> dict:
    """Score the predictor's forecasts of physical state on validation clips (protocol forecast-v1).

    Args:
        model: a LeWorldModel in eval mode whose image_size matches the store's frames.
        store: the EpisodeStore the model was trained on.
        env: "tworoom" or "pusht"; default the store's.
        horizon: action blocks rolled out (5 in `paper-v3` planning).
        num_clips: validation clips drawn (all of them when fewer exist).
        val_fraction, split_seed: the training run's episode split.
        frames_per_episode, max_train_frames, ridge: how the probes are fitted (as in `leworld.probe`).
        seed: seed of the frame and clip draws.
        batch_size: clips per rollout call.
        probes: ready probes {quantity: LinearProbe}; default: fitted here on training episodes.
        progress: show progress bars.
    Returns a dict: per quantity and step the forecast, copy and probe-floor errors, skill and
    displacement r; the embedding's forecast and copy errors per step; the cost weights.
    """
    env = env or store.metadata.get("env")
    if env not in QUANTITIES:
        raise ValueError(f"no forecast quantities for env {env!r}: choose one of {', '.join(QUANTITIES)}")
    if model.training:
        raise ValueError("forecasting needs the model in eval mode (BatchNorm in the projector): call model.eval().")
    if model.config.image_size != store.resolution:
        raise ValueError(f"the model encodes {model.config.image_size} px frames but {store.path} holds "
                         f"{store.resolution} px frames: use the dataset the model was trained on")
    if horizon < 1 or num_clips < 1 or batch_size < 1:
        raise ValueError(f"horizon, num_clips and batch_size must be positive, got {horizon}, {num_clips}, {batch_size}")
    H = model.config.history
    train_eps, val_eps = split_episodes(store.num_episodes, val_fraction, split_seed)
    if len(val_eps) == 0:
        raise ValueError("no validation episodes: forecasting needs val_fraction > 0 and at least 2 episodes")
    if probes is not None:
        missing = sorted(set(QUANTITIES[env]) - set(probes))
        if missing:
            raise ValueError(f"probes are missing for {missing}: pass one LinearProbe per quantity of {env}")
    clips = ClipDataset(store, val_eps, num_frames=H + horizon, frameskip=model.config.frameskip, with_state=True)
    rng = np.random.default_rng(seed + 1)
    picked = np.sort(rng.choice(len(clips), min(num_clips, len(clips)), replace=False))
    need = len(QUANTITIES[env]) + 2  # the cost weights fit one weight per quantity and an intercept
    if len(picked) < need:
        raise ValueError(f"forecasting {env} needs at least {need} validation clips (the cost weights fit "
                         f"{need - 1} numbers), got {len(picked)} of the {len(clips)} that {len(val_eps)} validation "
                         f"episodes give at horizon {horizon}: raise --num-clips, or lower --horizon")
    if probes is None:
        probes = fit_probes(model, store, env, train_eps, frames_per_episode, max_train_frames, ridge, seed,
                            progress=progress)
    embs, preds, states = [], [], []
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(picked), batch_size), desc="forecast", unit="batch", disable=not progress):
        batch = clips.__getitems__(picked[start : start + batch_size].tolist())
        emb, pred = forecast_clips(model, batch, horizon)
        embs.append(emb)
        preds.append(pred)
        states.append(batch["state"].numpy().astype(np.float64))
    emb, pred, state = np.concatenate(embs), np.concatenate(preds), np.concatenate(states)  # (N, H+T, D) ...
    seconds = time.perf_counter() - t0
    now = H - 1  # index of the last context frame
    quantities = {}
    for q in QUANTITIES[env]:
        true_now = state_quantity(env, q, state[:, now])
        read_now = read_quantity(q, probes[q], emb[:, now])
        steps = []
        for k in range(1, horizon + 1):
            true_k = state_quantity(env, q, state[:, now + k])
            read_pred = read_quantity(q, probes[q], pred[:, k - 1])
            err = float(distance(q, read_pred, true_k).mean())
            copy = float(distance(q, true_now, true_k).mean())
            floor = float(distance(q, read_quantity(q, probes[q], emb[:, now + k]), true_k).mean())
            disp_r = pearson(change(q, read_now, read_pred).ravel(), change(q, true_now, true_k).ravel())
            steps.append({"step": k, "env_steps": k * model.config.frameskip, "error": err, "copy_error": copy,
                          "probe_floor": floor, "skill": 1.0 - err / copy if copy > 0 else float("nan"),
                          "displacement_r": disp_r})
        quantities[q] = {"unit": UNITS[q], "steps": steps}
    embedding = []
    for k in range(1, horizon + 1):
        err = float(((pred[:, k - 1] - emb[:, now + k]) ** 2).sum(1).mean())
        copy = float(((emb[:, now] - emb[:, now + k]) ** 2).sum(1).mean())
        embedding.append({"step": k, "error": err, "copy_error": copy,
                          "skill": 1.0 - err / copy if copy > 0 else float("nan")})
    return {
        "env": env, "horizon": horizon, "history": H, "frameskip": model.config.frameskip, "clips": len(picked),
        "val_episodes": len(val_eps), "quantities": quantities, "embedding": embedding,
        "cost_weights": cost_weights(env, emb[:, now], emb[:, -1], state[:, now], state[:, -1]),
        "seconds": {"forecast": seconds},
    }


# ---- command line -----------------------------------------------------------------------------------
def table(result: dict) -> str:
    """The result as text: per quantity and step the errors and skill, then the cost weights."""
    lines = [f"{'quantity':<10}{'step':>5}{'forecast':>10}{'copy':>9}{'floor':>9}{'skill':>8}{'disp. r':>9}"]
    for name, q in result["quantities"].items():
        for s in q["steps"]:
            # a space before every number: a large one (skill -1438.91) must not run into its neighbour
            lines.append(f"{name + ' (' + q['unit'][:3] + ')':<10}{s['step']:>5} {s['error']:>9.1f} "
                         f"{s['copy_error']:>8.1f} {s['probe_floor']:>8.1f} {s['skill']:>7.2f} "
                         f"{s['displacement_r']:>8.3f}")
    last = result["embedding"][-1]
    lines.append(f"embedding, step {last['step']}: squared error {last['error']:.4g}, copying "
                 f"{last['copy_error']:.4g}, skill {last['skill']:.2f}")
    c = result["cost_weights"]
    slopes = ", ".join(f"{q} {w['slope']:.4g}/{w['unit'][:3]}" for q, w in c["quantities"].items())
    lines.append(f"cost ||z_start - z_goal||^2 over {c['pairs']} pairs {result['horizon']} blocks apart: "
                 f"slopes {slopes}; R^2 {c['r2']:.2f}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m leworld.forecast", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="exported model directory, a run directory (its newest model), or a training .ckpt")
    p.add_argument("--data", default=None, help="dataset .h5 (default: extra.data.path in the model's config.json)")
    p.add_argument("--out", default=None, help="result JSON (default runs/forecast/<run name>.json; with a --seed other than 0, <run name>-seed<N>.json)")
    p.add_argument("--horizon", type=int, default=5, help="action blocks rolled out")
    p.add_argument("--num-clips", type=int, default=2000, help="validation clips forecast")
    p.add_argument("--frames-per-episode", type=int, default=8, help="training frames per episode for the probes")
    p.add_argument("--max-train-frames", type=int, default=20000, help="cap on the probes' training frames")
    p.add_argument("--ridge", type=float, default=None, help="fixed ridge strength (default: chosen on held-out episodes)")
    p.add_argument("--batch-size", type=int, default=128, help="clips per rollout call")
    p.add_argument("--seed", type=int, default=0, help="seed of the frame and clip draws")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    if min(args.horizon, args.num_clips, args.batch_size, args.frames_per_episode) < 1:
        p.error("horizon, num-clips, batch-size and frames-per-episode must be positive")
    if args.max_train_frames < 2 * args.frames_per_episode:
        p.error(f"--max-train-frames ({args.max_train_frames}) must keep the frames of at least 2 episodes: at "
                f"least 2 x --frames-per-episode = {2 * args.frames_per_episode}")
    check_common_args(p, args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()  # faster CPU steps on Linux (leworld/allocator.py)

    def score(model, store, env, val_fraction, split_seed):
        return forecast(model, store, env=env, horizon=args.horizon, num_clips=args.num_clips,
                        val_fraction=val_fraction, split_seed=split_seed, frames_per_episode=args.frames_per_episode,
                        max_train_frames=args.max_train_frames, ridge=args.ridge, seed=args.seed,
                        batch_size=args.batch_size, progress=not args.no_progress)

    def describe(result):
        return (f"{result['env']}: {result['clips']} validation clips ({result['val_episodes']} episodes), history "
                f"{result['history']}, {result['horizon']} blocks of {result['frameskip']} steps; protocol {PROTOCOL}")

    return run_command("forecast", PROTOCOL, args, score, describe, table)


if __name__ == "__main__":
    main(sys.argv[1:])
