"""Training clips: `num_frames` frames every `frameskip` steps, with action blocks between them.

Example:
    >>> from leworld.data.clips import ClipDataset, split_episodes
    >>> train_eps, val_eps = split_episodes(num_episodes=100, val_fraction=0.1, seed=0)
    >>> clips = ClipDataset("data/tworoom.h5", episodes=train_eps, num_frames=4, frameskip=5)
    >>> clip = clips[0]  # pixels (T, Hp, Wp, C) uint8, action (T-1, frameskip*A) float32
    >>> batch = clips.__getitems__([0, 5, 9])  # pixels (B, T, Hp, Wp, C): what the DataLoader returns
    >>> rows = ClipDataset("data/tworoom.h5", train_eps, read_pixels=False).__getitems__([0])["rows"]
    >>> rows.shape  # (B, T) file rows of the frames, for frames already held in memory
    torch.Size([1, 4])

A clip starting at step t0 keeps frames t0, t0 + frameskip, ..., t0 + (T-1)*frameskip.
Action block k holds the `frameskip` actions executed after kept frame k, i.e. the actions
of steps t0 + k*frameskip ... t0 + (k+1)*frameskip - 1, flattened step-major into
frameskip*A numbers. Every step of an episode that leaves room for a whole clip is a start.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from leworld.data.store import EpisodeStore


def split_episodes(num_episodes: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Episode-level train/validation split: no clip of a validation episode is in training.

    Returns sorted (train, val) episode indices; validation gets round(val_fraction * E)
    episodes, at least one when val_fraction > 0 and there are two or more episodes.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(num_episodes)
    num_val = int(round(val_fraction * num_episodes))
    if val_fraction > 0 and num_episodes >= 2:
        num_val = max(1, num_val)
    num_val = min(num_val, num_episodes - 1)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def action_stats(store: EpisodeStore, episodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the actions taken in `episodes` (the NaN rows excluded)."""
    chunks = []
    for e in episodes:
        start = int(store.episode_offset[e])
        chunks.append(store.read("action", slice(start, start + int(store.episode_length[e]) - 1)))
    actions = np.concatenate(chunks).astype(np.float64)  # (N, A)
    bad = ~np.isfinite(actions).all(1)
    if bad.any():  # NaN or inf among the actions taken: every clip that holds one would train on NaN
        raise ValueError(f"{store.path} has {int(bad.sum())} non-finite action row(s) inside its episodes "
                         f"(the first in episode {_episode_of(episodes, chunks, int(np.argmax(bad)))}): "
                         "the data is corrupt; collect it again")
    std = actions.std(0)
    return actions.mean(0).astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def _episode_of(episodes: np.ndarray, chunks: list[np.ndarray], row: int) -> int:
    """The episode whose chunk holds row `row` of the concatenated `chunks`."""
    ends = np.cumsum([len(c) for c in chunks])
    return int(episodes[int(np.searchsorted(ends, row, side="right"))])


class ClipDataset(Dataset):
    """Clips of the given episodes of a dataset file; the file opens lazily in each worker."""

    def __init__(self, path: str | os.PathLike | EpisodeStore, episodes: np.ndarray | None = None,
                 num_frames: int = 4, frameskip: int = 5, with_state: bool = False, read_pixels: bool = True):
        """`read_pixels=False` returns each clip's frame rows (`rows`, (T,) int64) instead of its
        pixels, for a caller that holds all frames in memory (`LeWMDataModule(frames_on_device=True)`)."""
        if num_frames < 2 or frameskip < 1:
            raise ValueError(f"need num_frames >= 2 and frameskip >= 1, got {num_frames} and {frameskip}")
        self.store = path if isinstance(path, EpisodeStore) else EpisodeStore(path)
        self.num_frames, self.frameskip, self.with_state = num_frames, frameskip, with_state
        self.read_pixels = read_pixels
        self.episodes = np.arange(self.store.num_episodes) if episodes is None else np.asarray(episodes, np.int64)
        span = (num_frames - 1) * frameskip  # steps covered by one clip
        starts = []
        for e in self.episodes:
            num_steps = int(self.store.episode_length[e]) - 1
            offset = int(self.store.episode_offset[e])
            if num_steps >= span:
                starts.append(offset + np.arange(num_steps - span + 1))
        if not starts:
            raise ValueError(
                f"no episode of {self.store.path} is long enough for a clip of {num_frames} frames with "
                f"frameskip {frameskip} ({span} steps): collect longer episodes or lower num_frames/frameskip"
            )
        self.starts = np.concatenate(starts)  # (N,) global row of each clip's first frame

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch read straight into one buffer (the DataLoader calls this with a batch of
        indices; `collate_batch` passes it through). In a worker process the buffer is allocated in
        shared memory, so handing it to the main process copies nothing."""
        starts = self.starts[np.asarray(indices, np.int64)]  # (B,)
        rows = starts[:, None] + self.frameskip * np.arange(self.num_frames)  # (B, T) kept frames
        store, r = self.store, self.store.resolution
        if self.read_pixels:
            pixels = torch.empty((len(starts), self.num_frames, r, r, 3), dtype=torch.uint8)  # (B, T, Hp, Wp, C)
            if torch.utils.data.get_worker_info() is not None:
                pixels.share_memory_()
            store.read_into(rows.ravel(), pixels.numpy().reshape(-1, r, r, 3))
            batch = {"pixels": pixels}
        else:
            batch = {"rows": torch.from_numpy(rows)}  # (B, T) int64
        span = (self.num_frames - 1) * self.frameskip
        action_rows = (starts[:, None] + np.arange(span)).ravel()  # (B*span,)
        actions = store.read("action", action_rows).reshape(len(starts), self.num_frames - 1, -1)
        batch["action"] = torch.from_numpy(actions)  # (B, T-1, frameskip*A)
        if self.with_state:
            batch["state"] = torch.from_numpy(store.read("state", rows.ravel()).reshape(*rows.shape, -1))
            batch["proprio"] = torch.from_numpy(store.read("proprio", rows.ravel()).reshape(*rows.shape, -1))
        return batch


def collate_batch(batch):
    """DataLoader collate_fn for `ClipDataset`: batches arrive already stacked by `__getitems__`."""
    if isinstance(batch, dict):
        return batch
    return torch.utils.data.default_collate(batch)
