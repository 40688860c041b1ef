"""Goal separation: can the planning cost tell a state that passes the success test from a near miss?

Example:
    python -m leworld.separation --model runs/pusht_tiny --out runs/separation/pusht_tiny.json

The same from Python:
    >>> from leworld import load_model
    >>> from leworld.data.store import EpisodeStore
    >>> from leworld.separation import separation_of_model
    >>> result = separation_of_model(load_model("runs/pusht_tiny/version_0/model"), EpisodeStore("data/pusht_64.h5"))
    >>> result["misses"]["angle"]["auc"]  # 0.5: the cost cannot see the block angle; 1: it always can

`leworld.probe` asks whether a quantity can be read from an embedding at all; this asks whether
the planner's cost weighs it: a probe can read a direction that is too small to move the squared
distance. It scores the cost between true embeddings, so it is what a perfect predictor would let
CEM see. Protocol `separation-v1`:

- Frames: every `stride`-th frame of the validation episodes (the training run's split), at most
  `max_frames` (random whole episodes dropped beyond that); each is encoded once.
- Goals: `num_goals` of those frames, drawn with `seed`. Candidates for a goal: the frames of the
  other validation episodes (its own episode's neighbouring frames would be near copies of it).
- Each candidate's errors against the goal are those of the env's success test, in units of its
  thresholds: Push-T "pose" (norm of agent xy and block xy, / 20 px) and "angle" (wrapped block
  angle, / 20 degrees); Two-Room "agent" (distance / success radius). A candidate passes when
  every error is below 1; it is a near miss by q when error q is in [1, band) and all others
  are below 1: it fails the test by q alone, and not by much.
- Cost: the planner's terminal cost, ||z_candidate - z_goal||^2 (float64).
- Per miss kind q, the AUC of each goal with at least one passing candidate and one near miss by
  q: the probability that a random passing candidate costs less than a random near miss by q
  (ties count one half), averaged over those goals. 0.5: the cost does not see q there; 1: it
  always ranks a passing state first. `top1`: over the goals with a passing candidate, how often
  the cheapest candidate passes, beside the chance of a random candidate passing.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from leworld.allocator import keep_freed_memory
from leworld.cli import HelpFormatter
from leworld.data.clips import split_episodes
from leworld.probe import check_common_args, embed_frames, run_command

PROTOCOL = "separation-v1"
MISSES = {"tworoom": ("agent",), "pusht": ("pose", "angle")}
PUSHT_POSE_PX, PUSHT_ANGLE_RAD = 20.0, math.pi / 9  # the Push-T success test (envs/push_t_physics.py)
TWOROOM_RADIUS = 16.0  # Two-Room's default success radius (envs/two_room.py)


def goal_errors(env: str, states: np.ndarray, goals: np.ndarray, success_radius: float = TWOROOM_RADIUS) -> dict:
    """Errors of states (N, S) against goal states (G, S) in units of the success test's
    thresholds: {miss kind: (G, N)}; a state passes the test for a goal when all are below 1."""
    states, goals = np.asarray(states, np.float64), np.atleast_2d(np.asarray(goals, np.float64))
    if env == "pusht":
        pose = np.linalg.norm(states[None, :, :4] - goals[:, None, :4], axis=2)  # (G, N) agent xy and block xy
        angle = np.abs((states[None, :, 4] - goals[:, None, 4] + math.pi) % (2 * math.pi) - math.pi)  # (G, N)
        return {"pose": pose / PUSHT_POSE_PX, "angle": angle / PUSHT_ANGLE_RAD}
    if env == "tworoom":
        return {"agent": np.linalg.norm(states[None, :, :2] - goals[:, None, :2], axis=2) / success_radius}
    raise ValueError(f"no success test for env {env!r}: choose one of {', '.join(MISSES)}")


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random `pos` value < a random `neg` value), ties counting one half (Mann-Whitney U / (n m))."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("auc needs at least one value on each side")
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, side="left")  # (n,) negatives strictly below each positive
    tied = np.searchsorted(neg, pos, side="right") - below  # (n,) negatives equal to it
    return float((len(neg) - below - tied + 0.5 * tied).sum() / (len(pos) * len(neg)))


def separation(z: np.ndarray, states: np.ndarray, episode: np.ndarray, env: str, num_goals: int = 2000,
               band: float = 3.0, seed: int = 0, success_radius: float = TWOROOM_RADIUS,
               goal_chunk: int = 64) -> dict:
    """Goal separation of the squared-distance cost over embeddings z (N, D) of frames with true
    states (N, S) from episodes `episode` (N,) (protocol separation-v1, module docstring).

    Returns {"misses": {kind: {"auc", "goals", "pairs"}}, "top1": {"rate", "chance", "goals"},
    "goals", "frames", "band"}; an AUC is NaN when no goal had both a pass and such a near miss.
    """
    z, episode = np.asarray(z, np.float64), np.asarray(episode)
    n = len(z)
    if not (len(states) == len(episode) == n) or z.ndim != 2:
        raise ValueError(f"z (N, D), states (N, S) and episode (N,) must agree: got {z.shape}, "
                         f"{np.shape(states)}, {episode.shape}")
    if env not in MISSES:
        raise ValueError(f"no success test for env {env!r}: choose one of {', '.join(MISSES)}")
    if num_goals < 1 or not 1.0 < band < float("inf"):
        raise ValueError(f"num_goals must be positive and band above 1, got {num_goals} and {band}")
    if len(np.unique(episode)) < 2:
        raise ValueError("goal separation needs frames of at least 2 episodes (candidates come from other episodes)")
    goals = np.sort(np.random.default_rng(seed).choice(n, min(num_goals, n), replace=False))
    sq = (z ** 2).sum(1)  # (N,)
    aucs = {q: [] for q in MISSES[env]}
    pairs = {q: 0 for q in MISSES[env]}
    top1, chance = [], []
    for start in range(0, len(goals), goal_chunk):
        g = goals[start : start + goal_chunk]
        cost = sq[g, None] - 2.0 * z[g] @ z.T + sq[None, :]  # (G, N) ||z_n - z_g||^2
        other = episode[None, :] != episode[g, None]  # (G, N)
        err = goal_errors(env, states, states[g], success_radius)  # {kind: (G, N)}
        ok = {q: e < 1.0 for q, e in err.items()}
        passes = np.logical_and.reduce(list(ok.values())) & other  # (G, N)
        for i in np.flatnonzero(passes.any(1)):
            c, others = cost[i], np.flatnonzero(other[i])
            top1.append(bool(passes[i, others[np.argmin(c[others])]]))
            chance.append(passes[i].sum() / len(others))
            for q in MISSES[env]:
                rest = np.logical_and.reduce([ok[k][i] for k in MISSES[env] if k != q] + [other[i]])
                miss = rest & (err[q][i] >= 1.0) & (err[q][i] < band)
                if miss.any():
                    aucs[q].append(auc(c[passes[i]], c[miss]))
                    pairs[q] += int(passes[i].sum()) * int(miss.sum())
    misses = {q: {"auc": float(np.mean(aucs[q])) if aucs[q] else float("nan"), "goals": len(aucs[q]),
                  "pairs": pairs[q]} for q in MISSES[env]}
    return {"misses": misses, "top1": {"rate": float(np.mean(top1)) if top1 else float("nan"),
                                       "chance": float(np.mean(chance)) if chance else float("nan"),
                                       "goals": len(top1)},
            "goals": len(goals), "frames": n, "band": band}


def validation_frames(store, val_episodes: np.ndarray, stride: int = 1, max_frames: int | None = 20000,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every `stride`-th row of the validation episodes -> (rows (N,), episode of each (N,)); random
    whole episodes are dropped while there are more than `max_frames` rows."""
    episodes = np.sort(np.asarray(val_episodes, np.int64))
    per = {int(e): np.arange(0, int(store.episode_length[e]), stride) for e in episodes}
    if max_frames is not None:
        order = np.random.default_rng(seed).permutation(episodes)
        kept, total = [], 0
        for e in order:
            if total + len(per[int(e)]) > max_frames and kept:
                break
            kept.append(int(e))
            total += len(per[int(e)])
        episodes = np.sort(np.asarray(kept, np.int64))
    rows = [int(store.episode_offset[e]) + per[int(e)] for e in episodes]
    owner = [np.full(len(per[int(e)]), e) for e in episodes]
    return np.concatenate(rows), np.concatenate(owner)


def separation_of_model(model, store, env: str | None = None, val_fraction: float = 0.1, split_seed: int = 0,
                        stride: int = 1, max_frames: int | None = 20000, num_goals: int = 2000, band: float = 3.0,
                        seed: int = 0, batch_size: int = 256, progress: bool = True) -> dict:
    """Encode the validation frames of `store` with `model` (eval mode) and score the goal
    separation of its planning cost (protocol separation-v1)."""
    env = env or store.metadata.get("env")
    if env not in MISSES:
        raise ValueError(f"no success test for env {env!r}: choose one of {', '.join(MISSES)}")
    if model.config.image_size != store.resolution:
        raise ValueError(f"the model encodes {model.config.image_size} px frames but {store.path} holds "
                         f"{store.resolution} px frames: use the dataset the model was trained on")
    if stride < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    _, val_eps = split_episodes(store.num_episodes, val_fraction, split_seed)
    if len(val_eps) < 2:
        raise ValueError("goal separation needs at least 2 validation episodes: raise val_fraction or add episodes")
    rows, owner = validation_frames(store, val_eps, stride, max_frames, seed)
    if len(np.unique(owner)) < 2:  # the cap left one episode of the several there are
        raise ValueError(f"max_frames {max_frames} keeps the frames of 1 of the {len(val_eps)} validation episodes "
                         f"({len(rows)} frames at stride {stride}): goal separation needs at least 2; raise "
                         "--max-frames or --stride")
    t0 = time.perf_counter()
    z = embed_frames(model, store, rows, batch_size, progress)  # (N, D)
    t1 = time.perf_counter()
    radius = float((store.metadata.get("env_params") or {}).get("success_radius", TWOROOM_RADIUS))
    result = separation(z, store.read("state", rows), owner, env, num_goals, band, seed, radius)
    if result["top1"]["goals"] == 0:
        kept = len(np.unique(owner))
        fixes = ([f"lower --stride ({stride})"] if stride > 1 else []) + (
            [f"raise --max-frames ({max_frames}: {kept} of the {len(val_eps)} validation episodes kept)"]
            if kept < len(val_eps) else [])
        fixes.append(f"score more validation episodes ({len(val_eps)} here): a dataset with more episodes, generated "
                     "with the model's settings and passed with --data")
        raise ValueError(f"none of the goal frames has a frame of another episode that passes the success test "
                         f"({len(rows)} frames of {kept} episodes at stride {stride}): there is nothing to "
                         f"separate; {'; or '.join(fixes)}")
    return {"env": env, "val_episodes": len(np.unique(owner)), **result,
            "seconds": {"encode": t1 - t0, "score": time.perf_counter() - t1}}


# ---- command line -----------------------------------------------------------------------------------
def table(result: dict) -> str:
    """The result as text: one line per miss kind, then top-1."""
    lines = [f"{'near miss by':<14}{'AUC':>7}{'goals':>7}{'pairs':>12}"]
    for q, m in result["misses"].items():
        lines.append(f"{q:<14}{m['auc']:>7.3f}{m['goals']:>7}{m['pairs']:>12}")
    t = result["top1"]
    lines.append(f"cheapest candidate passes: {t['rate']:.3f} of {t['goals']} goals (a random one: {t['chance']:.3f})")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m leworld.separation", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="exported model directory, a run directory (its newest model), or a training .ckpt")
    p.add_argument("--data", default=None, help="dataset .h5 (default: extra.data.path in the model's config.json)")
    p.add_argument("--out", default=None, help="result JSON (default runs/separation/<run name>.json; with a --seed other than 0, <run name>-seed<N>.json)")
    p.add_argument("--num-goals", type=int, default=2000, help="goal frames drawn")
    p.add_argument("--band", type=float, default=3.0, help="a near miss fails one threshold by less than this factor")
    p.add_argument("--stride", type=int, default=1, help="every stride-th frame of the validation episodes")
    p.add_argument("--max-frames", type=int, default=20000, help="cap on the validation frames encoded")
    p.add_argument("--batch-size", type=int, default=256, help="frames per encoder call")
    p.add_argument("--seed", type=int, default=0, help="seed of the goal draw")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if min(args.num_goals, args.stride, args.max_frames, args.batch_size) < 1 or not 1 < args.band < float("inf"):
        p.error("num-goals, stride, max-frames and batch-size must be positive, and band a finite number above 1")
    check_common_args(p, args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()  # faster CPU steps on Linux (leworld/allocator.py)

    def score(model, store, env, val_fraction, split_seed):
        return separation_of_model(model, store, env=env, val_fraction=val_fraction, split_seed=split_seed,
                                   stride=args.stride, max_frames=args.max_frames, num_goals=args.num_goals,
                                   band=args.band, seed=args.seed, batch_size=args.batch_size,
                                   progress=not args.no_progress)

    def describe(result):
        return (f"{result['env']}: {result['frames']} validation frames ({result['val_episodes']} episodes), "
                f"{result['goals']} goals, near misses up to {result['band']:g}x a threshold; protocol {PROTOCOL}")

    return run_command("separation", PROTOCOL, args, score, describe, table)


if __name__ == "__main__":
    main(sys.argv[1:])
