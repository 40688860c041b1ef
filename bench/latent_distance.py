"""How far can a Two-Room model 'see'? Mean embedding distance to a goal, binned by true distance.

Example:
    python bench/latent_distance.py runs/tworoom_tiny runs/other_run

Places the agent on an 8 px grid over both rooms, encodes each frame, and for four goal cells
(one per room corner region) averages the squared embedding distance ||z - z_goal||^2 over
grid points in bins of true distance; each row is divided by its value for the farthest bin.
A terminal-cost planner gets a useful signal only where this curve still rises: where it is
flat, every sampled plan looks equally far from the goal.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import envs
from leworld.checkpoint import find_model, load_model, model_extra

BINS = (0, 10, 20, 40, 60, 80, 100, 130, 160, 300)
GOALS = ((40, 180), (180, 180), (60, 60), (180, 40))


def profile(model, resolution: int) -> np.ndarray:
    xs = np.arange(20, 205, 8.0)
    grid = np.array([(x, y) for x in xs for y in xs])
    grid = grid[(grid[:, 0] < 105) | (grid[:, 0] > 119)]  # (P, 2), off the wall
    env = envs.make_batch("tworoom", len(grid), resolution=resolution)
    env.set_state(np.concatenate([grid, grid], 1))
    with torch.no_grad():
        z = model.encode(torch.as_tensor(env.render()).permute(0, 3, 1, 2)[:, None])[:, 0]  # (P, D)
    rows = []
    for g in GOALS:
        i = np.argmin(np.linalg.norm(grid - g, axis=1))
        d = ((z - z[i]) ** 2).sum(-1).numpy()
        true = np.linalg.norm(grid - grid[i], axis=1)
        rows.append([d[(true >= lo) & (true < hi)].mean() for lo, hi in zip(BINS[:-1], BINS[1:])])
    r = np.mean(rows, 0)
    return r / r[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="exported model directories or run directories")
    args = p.parse_args()
    print("model".ljust(32) + "".join(f"{lo}-{hi}px".rjust(10) for lo, hi in zip(BINS[:-1], BINS[1:])))
    for path in args.models:
        model_dir = find_model(path)
        env = (model_extra(model_dir).get("dataset") or {}).get("env")
        if env not in (None, "tworoom"):
            raise SystemExit(f"error: {path} was trained on {env}; this benchmark draws Two-Room frames")
        model = load_model(model_dir)
        print(str(path).ljust(32) + "".join(f"{v:10.2f}" for v in profile(model, model.config.image_size)))


if __name__ == "__main__":
    main()
