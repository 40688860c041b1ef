"""The gymnasium view of a batched env core: one env (`num_envs=1`) behind the gymnasium API.

Example:
    >>> import gymnasium as gym, envs
    >>> env = gym.make("leworld/TwoRoom-v0", resolution=64)  # a BatchView subclass
    >>> obs, info = env.reset(seed=0)

Subclasses build `self.batch` and the spaces and define `reset` and `_info`; stepping,
rendering, the goal image and teleporting are the same for every env.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np


class BatchView(gym.Env):
    """reward = float(success); `terminated` and `truncated` are always False (give a time limit
    with `max_episode_steps`)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    batch = None  # the batched core, num_envs=1

    def _set_render_mode(self, render_mode: str | None) -> None:
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode {render_mode!r} is not supported: use 'rgb_array'")
        self.render_mode = render_mode

    def step(self, action):
        action = np.asarray(action, np.float64)
        if action.shape != (self.batch.action_dim,):
            raise ValueError(f"action must have shape ({self.batch.action_dim},), got {action.shape}")
        obs = self.batch.step(action[None])
        info = self._info()
        return single(obs), float(info["success"]), False, False, info

    def render(self) -> np.ndarray:
        return self.batch.render()[0]

    def goal_pixels(self) -> np.ndarray:
        """(R, R, 3) uint8 frame of the goal: the goal image."""
        return self.batch.goal_pixels()[0]

    def get_state(self) -> np.ndarray:
        return self.batch.get_state()[0]

    def set_state(self, state) -> None:
        """Teleport to a (state_dim,) state (see the batched core for its layout)."""
        self.batch.set_state(np.asarray(state, np.float64).reshape(1, self.batch.state_dim))

    def _info(self) -> dict:
        raise NotImplementedError


def single(obs: dict) -> dict:
    """The first env's observation of a batched observation dict."""
    return {"pixels": obs["pixels"][0], "proprio": obs["proprio"][0]}
