"""Episode videos (`leworld.viz`): the start | goal | current panels and the GIF written from them."""
from __future__ import annotations

import numpy as np
from PIL import Image

from leworld.viz import episode_panels, write_episode_gif, write_gif


def frames_and_goal(T: int = 4, R: int = 8):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (T, R, R, 3), dtype=np.uint8), rng.integers(0, 256, (R, R, 3), dtype=np.uint8)


def test_panels_hold_the_start_the_goal_and_the_current_frame_with_white_gaps():
    frames, goal = frames_and_goal()
    panels = episode_panels(frames, goal, gap=2)  # (T, R, 3R + 4, 3)
    assert panels.shape == (4, 8, 28, 3)
    for t in range(4):
        np.testing.assert_array_equal(panels[t, :, 0:8], frames[0])  # the start, in every frame
        np.testing.assert_array_equal(panels[t, :, 10:18], goal)
        np.testing.assert_array_equal(panels[t, :, 20:28], frames[t])  # the frame of step t
        assert (panels[t, :, 8:10] == 255).all() and (panels[t, :, 18:20] == 255).all()


def test_gif_has_every_frame_at_the_frame_rate_and_scale(tmp_path):
    frames, goal = frames_and_goal(T=5, R=16)
    path = write_episode_gif(tmp_path / "ep000_success.gif", frames, goal, fps=4)
    with Image.open(path) as gif:
        assert gif.n_frames == 5 and gif.size == (8 * (3 * 16 + 4), 8 * 16)  # upscaled 8x to 128 px high
        assert gif.info["duration"] == 250 and gif.info["loop"] == 0
        gif.seek(4)
        last = np.asarray(gif.convert("RGB"))
    panels = episode_panels(frames, goal)
    # the GIF palette may round colours: compare the upscaled last frame's blocks with a tolerance of the quantisation
    want = panels[4].repeat(8, 0).repeat(8, 1).astype(int)
    assert np.abs(last.astype(int) - want).mean() < 12
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_a_small_gif_keeps_its_size(tmp_path):
    frames = np.zeros((2, 4, 6, 3), np.uint8)
    frames[1] = 200
    path = write_gif(tmp_path / "a.gif", frames, fps=10, scale=1)
    with Image.open(path) as gif:
        assert gif.size == (6, 4) and gif.n_frames == 2 and gif.info["duration"] == 100
