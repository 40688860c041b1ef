"""Off-screen pygame renderer for Push-T: one frame of the T-block, the agent and (optionally) the goal T.

Example:
    >>> import envs, numpy as np
    >>> from envs.push_t import T_OUTLINE
    >>> from envs.push_t_render import PushTRenderer
    >>> renderer = PushTRenderer(resolution=64, t_outline=T_OUTLINE)
    >>> state = np.array([100.0, 100.0, 256.0, 256.0, 0.5, 0.0, 0.0])  # agent xy, block xy, angle, agent vel
    >>> frame = renderer.draw(state, block_rgb=(119, 136, 153), agent_rgb=(65, 105, 225))
    >>> frame.shape, frame.dtype
    ((64, 64, 3), dtype('uint8'))

The scene is drawn at `resolution` x `supersample` pixels (world coordinates scaled by that
size / 512), anti-aliased, into one reused 24-bit surface whose bytes are laid out R, G, B, so
reading the pixels is a plain contiguous copy with row = y. With `supersample` S > 1 each output
pixel is the rounded mean of an S x S block (box filter): polygon corners are snapped to the fine
grid, so the T's outline, and with it its angle, moves smoothly in the output frame instead of in
whole-pixel jumps. The agent is pygame's filled circle of whole-pixel radius r = round(15 x scale),
which covers about pi (r + 1/2)^2 surface pixels: larger than the world's 15-unit disc, most at low
resolution (at 64 px: 20 pixels against 11; with `supersample=4`, 14; at 224 px: 177 against 135).
Every Push-T dataset and model is drawn this way, so it stays as it is. No display is opened (`envs` sets SDL_VIDEODRIVER=dummy before pygame is
imported).
"""
from __future__ import annotations

import math

import numpy as np
import pygame
import pygame.gfxdraw

WORLD_SIZE = 512.0
BACKGROUND = (255, 255, 255)  # white
GOAL_RGB = (144, 238, 144)  # LightGreen


class PushTRenderer:
    """Draws Push-T states at a fixed `resolution`; one instance is reused for every env and step."""

    def __init__(self, resolution: int, t_outline: np.ndarray, agent_radius: float = 15.0, goal_overlay: bool = False,
                 supersample: int = 1):
        if int(resolution) < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
        if int(supersample) != supersample or not 1 <= int(supersample) <= 8:
            raise ValueError(f"supersample must be an integer from 1 to 8, got {supersample}")
        self.resolution, self.supersample = int(resolution), int(supersample)
        self.goal_overlay = bool(goal_overlay)
        side = self.resolution * self.supersample  # side of the surface drawn on
        self.scale = side / WORLD_SIZE  # surface pixels per world unit
        self._outline = [(float(x), float(y)) for x, y in np.asarray(t_outline, dtype=np.float64)]  # T in body coords
        self._radius = max(1, int(round(agent_radius * self.scale)))
        # 24-bit surface with masks chosen so that its memory reads R, G, B per pixel, row-major in y.
        self.surface = pygame.Surface((side, side), 0, 24, (0xFF, 0xFF00, 0xFF0000, 0))
        self._buffer = self.surface.get_buffer()  # keeps a view of the pixels; fill and gfxdraw still work
        pitch = self.surface.get_pitch()
        rows = np.frombuffer(self._buffer, dtype=np.uint8).reshape(side, pitch)
        self._pixels = rows[:, : 3 * side].reshape(side, side, 3)  # (RS, RS, 3) view

    def _to_pixel(self, x: float, y: float) -> tuple[int, int]:
        # world point -> index of the pixel that contains it (pixel centres sit at integer coordinates)
        return int(round(x * self.scale - 0.5)), int(round(y * self.scale - 0.5))

    def _block_points(self, x: float, y: float, angle: float) -> list[tuple[int, int]]:
        c, s = math.cos(angle), math.sin(angle)
        return [self._to_pixel(x + c * u - s * v, y + s * u + c * v) for u, v in self._outline]

    def _polygon(self, points, rgb) -> None:
        pygame.gfxdraw.filled_polygon(self.surface, points, rgb)
        pygame.gfxdraw.aapolygon(self.surface, points, rgb)

    def draw(self, state, block_rgb, agent_rgb, goal=None, out: np.ndarray | None = None) -> np.ndarray:
        """Render one state (7 numbers: agent xy, block xy, angle, agent vel) into `out` (R, R, 3) uint8.

        `goal` (a goal state, 7 numbers) is drawn under the block in light green when the renderer was
        built with `goal_overlay=True`.
        """
        surface = self.surface
        surface.fill(BACKGROUND)
        if self.goal_overlay and goal is not None:
            self._polygon(self._block_points(goal[2], goal[3], goal[4]), GOAL_RGB)
        self._polygon(self._block_points(state[2], state[3], state[4]), tuple(block_rgb))
        cx, cy = self._to_pixel(state[0], state[1])
        agent_rgb = tuple(agent_rgb)
        pygame.gfxdraw.filled_circle(surface, cx, cy, self._radius, agent_rgb)
        pygame.gfxdraw.aacircle(surface, cx, cy, self._radius, agent_rgb)
        pixels = self._pixels if self.supersample == 1 else self._box_filter()
        if out is None:
            return pixels.copy()
        np.copyto(out, pixels)
        return out

    def _box_filter(self) -> np.ndarray:
        """The (RS, RS, 3) surface reduced to (R, R, 3): the rounded mean of each S x S block."""
        r, s = self.resolution, self.supersample
        blocks = self._pixels.reshape(r, s, r, s, 3)
        rows = blocks[:, 0].astype(np.uint16)  # (R, R, S, 3): sums over the block's rows, added in place
        for i in range(1, s):
            rows += blocks[:, i]
        sums = rows[:, :, 0]
        for j in range(1, s):
            sums = sums + rows[:, :, j]  # (R, R, 3); at most 64 * 255 fits in uint16
        return ((sums + (s * s) // 2) // (s * s)).astype(np.uint8)
