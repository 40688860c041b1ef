"""Environments for leworld: Two-Room and Push-T, each a batched core plus a gymnasium view.

Example:
    >>> import gymnasium as gym, envs
    >>> env = gym.make("leworld/TwoRoom-v0", resolution=64)
    >>> obs, info = env.reset(seed=0)

`envs` never imports `leworld`.
"""
from __future__ import annotations

import os

# Rendering is off-screen; pygame must never look for a display or an audio device.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

from gymnasium.envs.registration import register, registry

ENV_NAMES = ("tworoom", "pusht")
ENV_IDS = {"tworoom": "leworld/TwoRoom-v0", "pusht": "leworld/PushT-v0"}

if ENV_IDS["tworoom"] not in registry:
    register(id=ENV_IDS["tworoom"], entry_point="envs.two_room:TwoRoomEnv")
if ENV_IDS["pusht"] not in registry:
    register(id=ENV_IDS["pusht"], entry_point="envs.push_t:PushTEnv")


def make_batch(name: str, num_envs: int, resolution: int = 224, seed: int = 0, **env_kwargs):
    """Build the batched core of environment `name` ("tworoom" or "pusht") with `num_envs` copies."""
    if name == "tworoom":
        from envs.two_room import TwoRoomBatch

        return TwoRoomBatch(num_envs=num_envs, resolution=resolution, seed=seed, **env_kwargs)
    if name == "pusht":
        from envs.push_t import PushTBatch

        return PushTBatch(num_envs=num_envs, resolution=resolution, seed=seed, **env_kwargs)
    raise ValueError(f"unknown env {name!r}: choose one of {', '.join(ENV_NAMES)}")
