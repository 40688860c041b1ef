"""Can the encoder architecture read the Push-T block angle at all? A supervised upper bound.

Example:
    OMP_NUM_THREADS=1 python bench/angle_readout.py --model runs/pusht_tiny --steps 1500

Builds a fresh model with the given model's config (same encoder, projector and image size,
new weights drawn with `--seed`), puts a Linear(D, 2) head on one frame's embedding and trains
encoder and head together, supervised, to output the block angle as (cos, sin). Frames come
from the model's own dataset (`extra.data.path` in its config.json), split by episode (10% of
episodes held out, drawn with `--seed`). It prints the held-out Pearson r of cos and sin.

The JEPA-trained embedding of the same architecture gives angle r about 0.1 under the linear
probe (`python -m leworld.probe`). If this script reaches a high r, the encoder can represent
the angle and the training objective is what leaves it out.
"""
from __future__ import annotations

import argparse
import json
import time

import h5py
import numpy as np
import torch

from leworld.checkpoint import find_model, load_model, recorded_data_path
from leworld.model import LeWorldModel
from leworld.probe import pearson


def load_frames(path: str, max_frames: int, val_fraction: float, seed: int):
    """Every 5th frame of each episode, split by episode.

    Returns [(pixels (N, C, H, W) uint8, targets (N, 2) cos/sin, rows (N,)) for train, for val].
    """
    with h5py.File(path, "r") as f:
        offsets, lengths = f["episode_offset"][:], f["episode_length"][:]
        order = np.random.default_rng(seed).permutation(len(offsets))
        n_val = max(1, int(round(val_fraction * len(offsets))))
        splits = []
        for episodes in (order[n_val:], order[:n_val]):
            rows = np.concatenate([np.arange(offsets[e], offsets[e] + lengths[e], 5) for e in np.sort(episodes)])
            rows = np.sort(rows[:max_frames])
            pixels = torch.from_numpy(f["pixels"][rows]).permute(0, 3, 1, 2)
            angle = f["state"][rows, 4]
            targets = torch.from_numpy(np.stack([np.cos(angle), np.sin(angle)], 1)).float()
            splits.append((pixels, targets, rows))
    return splits


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Push-T model directory or run directory")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-frames", type=int, default=20000, help="frames at most in each split (training, held-out)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model_dir = find_model(args.model)
    trained = load_model(model_dir)
    data = json.loads((model_dir / "config.json").read_text()).get("extra", {}).get("data", {})
    if not data.get("path"):
        raise SystemExit(f"{model_dir / 'config.json'} names no dataset (extra.data.path): retrain with the current train.py")
    (x_tr, y_tr, _), (x_va, y_va, _) = load_frames(recorded_data_path(model_dir, data["path"]), args.max_frames, 0.1,
                                                   args.seed)

    torch.manual_seed(args.seed)
    model = LeWorldModel(trained.config)
    head = torch.nn.Linear(trained.config.embed_dim, 2)
    params = list(model.encoder.parameters()) + list(model.projector.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(args.steps):
        i = torch.randint(0, len(x_tr), (args.batch_size,), generator=g)
        z = model.encode(x_tr[i][:, None])[:, 0]  # (B, D)
        loss = ((head(z) - y_tr[i]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([head(model.encode(x_va[j : j + 512][:, None])[:, 0]) for j in range(0, len(x_va), 512)])
    r = [float(x) for x in pearson(pred.numpy(), y_va.numpy())]  # (cos, sin)
    out = {"model": str(model_dir), "steps": args.steps, "train_frames": len(x_tr),
           "val_frames": len(x_va), "r_cos": r[0], "r_sin": r[1], "r_mean": float(np.mean(r)),
           "seconds": time.perf_counter() - t0}
    print(f"supervised angle read-out, {args.steps} steps, {len(x_tr)} training / {len(x_va)} held-out frames: "
          f"r cos {r[0]:.3f}, r sin {r[1]:.3f}, mean {np.mean(r):.3f} ({out['seconds']:.0f} s)")
    return out


if __name__ == "__main__":
    main()
