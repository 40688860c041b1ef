"""Episode videos: start, goal and the executed trajectory side by side, written as GIFs.

Example:
    >>> from leworld.viz import write_episode_gif
    >>> write_episode_gif("ep000_success.gif", frames, goal)  # frames (T, R, R, 3), goal (R, R, 3) uint8
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from leworld.results import atomic_write


def episode_panels(frames: np.ndarray, goal: np.ndarray, gap: int = 2) -> np.ndarray:
    """frames (T, R, R, 3), goal (R, R, 3) -> (T, R, 3R + 2 gap, 3): start | goal | current."""
    T, R = frames.shape[:2]
    out = np.full((T, R, 3 * R + 2 * gap, 3), 255, np.uint8)
    out[:, :, :R] = frames[0]
    out[:, :, R + gap: 2 * R + gap] = goal
    out[:, :, 2 * R + 2 * gap:] = frames
    return out


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: int = 10, scale: int = 1) -> Path:
    """Write frames (T, H, W, 3) uint8 as a looping GIF, atomically (temp file, then rename)."""
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    return atomic_write(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                                                        duration=int(1000 / fps), loop=0))


def write_episode_gif(path: str | os.PathLike, frames: np.ndarray, goal: np.ndarray, fps: int = 10) -> Path:
    """One episode as start | goal | trajectory; small frames are upscaled to at least 128 px."""
    scale = max(1, 128 // frames.shape[1])
    return write_gif(path, episode_panels(frames, goal), fps=fps, scale=scale)
