"""Benchmark dataset generation and clip reading.

Example:
    python bench/data_speed.py --episodes 256 --steps 100 --resolutions 64 224 --workers 1 2

Prints, for each resolution, Two-Room collection throughput in env steps/s (rendering and
HDF5 writing included, wall clock of `leworld.data.collect.collect`) for each worker count,
then clip-reading throughput (4 frames every 5 steps, through a DataLoader with 2 workers,
file in page cache) in clips/s.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from leworld.data.clips import ClipDataset, collate_batch
from leworld.data.collect import collect


def bench_collect(out: Path, episodes: int, steps: int, resolution: int, workers: int) -> float:
    start = time.perf_counter()
    collect("tworoom", episodes, steps, resolution, out=out, overwrite=True, workers=workers, progress=False)
    return episodes * steps / (time.perf_counter() - start)


def bench_clips(path: Path, num_clips: int, loader_workers: int, batch_size: int = 64) -> float:
    clips = ClipDataset(path, num_frames=4, frameskip=5)
    sampler = torch.randperm(len(clips), generator=torch.Generator().manual_seed(0))[:num_clips].tolist()
    loader = DataLoader(clips, batch_size=batch_size, sampler=sampler, num_workers=loader_workers,
                        persistent_workers=loader_workers > 0, collate_fn=collate_batch)
    for i, _ in enumerate(loader):  # warm-up pass: page cache and worker start (the timed pass reuses them)
        if i == 2:
            break
    start = time.perf_counter()
    count = sum(len(batch["pixels"]) for batch in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=256)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 224])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="collector worker processes")
    p.add_argument("--clips", type=int, default=8192, help="clips read per clip benchmark")
    p.add_argument("--loader-workers", type=int, default=2)
    args = p.parse_args()
    if args.steps < 1 or args.clips < 1:
        p.error("--steps and --clips must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        for res in args.resolutions:
            out = Path(tmp) / f"tworoom_{res}.h5"
            for w in args.workers:
                rate = bench_collect(out, args.episodes, args.steps, res, w)
                print(f"collect tworoom {res:>3d} px  workers={w}: {rate:>9,.0f} env steps/s")
            rate = bench_clips(out, args.clips, args.loader_workers)
            print(f"clips   tworoom {res:>3d} px  4 frames, {args.loader_workers} loader workers: {rate:>7,.0f} clips/s")


if __name__ == "__main__":
    main()
