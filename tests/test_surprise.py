"""Tests of leworld.surprise and surprise.py: exact-model detection, windowing, statistics, CLI.

Run: pytest tests/test_surprise.py -q
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from leworld.checkpoint import export_model
from leworld.model import LeWMConfig, LeWorldModel
from leworld.surprise import (
    auroc, betainc, calibrate, detection_rate, embedding_surprise, false_alarm_rate, first_detection,
    mean_latency, paired_t_test, student_t_sf2, trajectory_surprise,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(encoder="cnn", image_size=32, cnn_channels=(8, 16, 16), enc_width=32, embed_dim=32, proj_hidden=64,
            pred_depth=1, pred_heads=2, pred_head_dim=16, pred_mlp=64, action_hidden=32)
TWOROOM_DATA = {"env": "tworoom", "env_params": {"speed": 5.0, "num_envs": 1, "resolution": 32, "seed": 0},
                "policy": "expert", "noise": 2.0, "resolution": 32}


def load_cli():
    spec = importlib.util.spec_from_file_location("surprise_cli", ROOT / "surprise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- a model that predicts exactly: embedding = true position, Two-Room dynamics in free space -------
class ExactModel(nn.Module):
    """The embedding is the agent position; each env step moves it by speed * action (no walls).

    Actions are normalised as a / 2 and de-normalised inside `rollout`, so a block that is
    normalised twice, or not at all, or shifted by one frame, gives a non-zero nominal surprise.
    """

    def __init__(self, history: int = 1, frameskip: int = 5, speed: float = 5.0) -> None:
        super().__init__()
        self.config = SimpleNamespace(history=history, frameskip=frameskip, action_dim=2)
        self.speed = speed

    def encode(self, pixels):  # "pixels" (B, T, 2) are the positions themselves
        return pixels.double()

    def normalize_actions(self, a):
        return a / 2.0

    def rollout(self, context_emb, action_blocks, context_actions=None):
        B, S, T, _ = action_blocks.shape
        moves = 2.0 * action_blocks.view(B, S, T, self.config.frameskip, 2).sum(3) * self.speed  # (B, S, T, 2)
        return context_emb[:, -1, None, None] + moves.cumsum(2)  # (B, S, T, D=2)


def exact_trajectories(n: int, L: int, seed: int, teleport_at: int | None = None, frameskip: int = 5):
    """Integer positions and actions in {-1, 0, 1}: float64 arithmetic is exact, nominal surprise is 0."""
    g = torch.Generator().manual_seed(seed)
    actions = torch.randint(-1, 2, (n, L - 1, frameskip * 2), generator=g).double()  # (N, L-1, frameskip*A)
    moves = 5.0 * actions.view(n, L - 1, frameskip, 2).sum(2)  # (N, L-1, 2)
    start = torch.randint(20, 200, (n, 1, 2), generator=g).double()
    states = torch.cat([start, start + moves.cumsum(1)], 1)  # (N, L, 2)
    if teleport_at is not None:
        states[:, teleport_at:] += torch.tensor([60.0, -40.0])  # the agent jumps, then moves on from there
    return states, actions


@pytest.mark.parametrize("history", [1, 3])
def test_exact_model_flags_exactly_the_teleport_step(history):
    model, p = ExactModel(history).eval(), 6
    cal = calibrate(trajectory_surprise(model, *exact_trajectories(50, 12, seed=1)))
    nominal = trajectory_surprise(model, *exact_trajectories(20, 12, seed=2))
    teleported = trajectory_surprise(model, *exact_trajectories(20, 12, seed=2, teleport_at=p))
    assert torch.isnan(nominal[:, 0]).all() and (nominal[:, 1:] == 0).all()
    assert not cal.detect(nominal).any()
    flags = cal.detect(teleported)
    assert flags[:, p].all() and flags.sum() == 20
    assert torch.allclose(teleported[:, p], torch.tensor(60.0**2 + 40.0**2, dtype=torch.float64))
    assert detection_rate(flags, p, window=3) == 1.0 and mean_latency(flags, p, window=3) == 0.0


def test_exact_model_k_step_flags_the_k_frames_predicted_across_the_jump():
    model, p, k = ExactModel(history=2).eval(), 6, 3
    cal = calibrate(trajectory_surprise(model, *exact_trajectories(30, 12, seed=1), horizon=k))
    s = trajectory_surprise(model, *exact_trajectories(10, 12, seed=2, teleport_at=p), horizon=k)
    assert torch.isnan(s[:, :k]).all()
    flags = cal.detect(s)
    assert flags[:, p : p + k].all() and flags.sum() == 10 * k  # predictions made before p land on p .. p+k-1


# ---- windowing with history H > 1 against a direct per-step loop over `predict` -------------------------
def direct_surprise(model, emb, blocks, k):
    """Frame t + k from frames max(0, t-H+1) .. t, autoregressively with `predict`, one t at a time."""
    B, L, D = emb.shape
    H, out = model.config.history, torch.full((B, L), float("nan"))
    for t in range(L - k):
        frames = list(emb[:, max(0, t - H + 1) : t + 1].unbind(1))
        first = max(0, t - H + 1)  # index of frames[0]
        for j in range(k):
            lo = max(0, len(frames) - H)
            window = torch.stack(frames[lo:], 1)  # (B, <=H, D)
            acts = blocks[:, first + lo : first + len(frames)]  # the block after each window frame
            frames.append(model.predict(window, model.encode_actions(acts))[:, -1])
        out[:, t + k] = (frames[-1] - emb[:, t + k]).pow(2).sum(-1)
    return out


@pytest.mark.parametrize("history,k,L", [(3, 1, 9), (3, 2, 9), (2, 3, 8), (4, 1, 3), (1, 2, 6)])
def test_history_windows_match_a_direct_loop(history, k, L):
    torch.manual_seed(0)
    model = LeWorldModel(LeWMConfig(**TINY, history=history))
    for block in model.predictor.blocks:  # AdaLN-zero starts as identity: give actions and positions a say
        nn.init.normal_(block.adaLN[-1].weight, std=0.3)
        nn.init.normal_(block.adaLN[-1].bias, std=0.3)
    nn.init.normal_(model.predictor.pos_embed, std=1.0)
    nn.init.normal_(model.action_encoder[-1].weight, std=1.0)
    model.eval()
    emb, blocks = torch.randn(3, L, 32), torch.randn(3, L - 1, 10)
    with torch.no_grad():
        expected = direct_surprise(model, emb, blocks, k)
    got = embedding_surprise(model, emb, blocks, horizon=k)
    assert torch.isnan(got[:, :k]).all()
    torch.testing.assert_close(got[:, k:], expected[:, k:], rtol=1e-4, atol=1e-5)
    shifted = embedding_surprise(model, emb, blocks.roll(1, dims=1), horizon=k)
    assert (shifted[:, k:] - expected[:, k:]).abs().max() > 0.1  # the blocks matter: misalignment shows


def test_surprise_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="eval"):
        trajectory_surprise(ExactModel(), *exact_trajectories(2, 4, seed=0))


# ---- calibration and detection -------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_calibrated_threshold_gives_the_target_false_alarm_rate_on_fresh_samples(rate):
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(1.0, 5.0, 20, dtype=torch.float64)  # per-step scale: exponential(scale) per step
    draw = lambda n: -torch.log(torch.rand(n, 20, generator=g, dtype=torch.float64)) * scale  # (N, L)
    cal = calibrate(draw(5000), false_alarm_rate=rate)
    torch.testing.assert_close(cal.mean, scale, rtol=0.06, atol=0)  # exponential: mean = scale
    torch.testing.assert_close(cal.std, scale, rtol=0.08, atol=0)  # and std = scale
    assert abs(false_alarm_rate(cal.detect(draw(20000))) - rate) < 0.25 * rate
    assert cal.threshold == pytest.approx(-math.log(rate) - 1.0, rel=0.05)  # z of the exponential quantile


def test_threshold_flags_at_most_the_target_rate_of_the_calibration_runs():
    x = torch.randperm(100).double().view(50, 2)  # distinct values
    for rate in (0.0, 0.015, 0.05, 0.33):
        assert false_alarm_rate(calibrate(x, rate, per_step=False).detect(x)) <= rate


def test_threshold_is_the_quantile_of_leave_one_out_z_scores():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64).exp()  # (N, L), skewed like surprise
    x[0, 0] = x[3, 2] = float("nan")
    x[:, 4] = float("nan")
    x[1:, 4] = float("nan")
    x[0, 4] = 2.0  # one finite run in the last step: no std, never flagged
    rate = 0.1
    cal = calibrate(x, rate)
    xs = x.numpy()
    loo = []  # brute force: each run against the mean and std (ddof 1) of the other finite runs
    for j in range(4):
        col = xs[:, j]
        for i in np.flatnonzero(np.isfinite(col)):
            others = np.delete(col, i)
            others = others[np.isfinite(others)]
            loo.append((col[i] - others.mean()) / others.std(ddof=1))
    assert cal.threshold == pytest.approx(float(np.quantile(loo, 1 - rate, method="higher")), rel=1e-12)
    for j in range(4):  # a fresh run is scored against the finite runs but the last one
        col = xs[:, j][np.isfinite(xs[:, j])][:-1]
        assert cal.mean[j].item() == pytest.approx(col.mean(), rel=1e-12)
        assert cal.std[j].item() == pytest.approx(col.std(ddof=1), rel=1e-12)
    assert math.isnan(cal.std[4].item()) and math.isnan(cal.mean[4].item())
    assert not cal.detect(torch.full((3, 5), 1e9, dtype=torch.float64))[:, 4].any()
    with pytest.raises(ValueError, match="at least 3 nominal runs"):
        calibrate(x[:2])


def test_few_calibration_runs_still_give_the_target_rate_on_fresh_runs():
    # in-sample z-scores of N = 10 runs set a threshold that flags about 4% of fresh Gaussian steps
    # at a 1% target; the leave-one-out threshold flags about 1%
    g = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(200):
        cal = calibrate(torch.randn(10, 19, generator=g, dtype=torch.float64), 0.01)
        rates.append(false_alarm_rate(cal.detect(torch.randn(500, 19, generator=g, dtype=torch.float64))))
    assert 0.007 < sum(rates) / len(rates) < 0.013


@pytest.mark.parametrize("n", [3, 4, 5])
def test_the_fewest_calibration_runs_give_the_target_rate_on_fresh_runs(n):
    """A fresh run's z-scores must be alike in distribution to the leave-one-out ones the threshold
    comes from. Scored against all N runs they are not: at a 5% target, 3 calibration runs flagged
    1.4% of fresh Gaussian steps, 4 runs 2.9%, 5 runs 3.8%."""
    g = torch.Generator().manual_seed(n)
    rates = []
    for _ in range(1000):
        cal = calibrate(torch.randn(n, 19, generator=g, dtype=torch.float64), 0.05)
        rates.append(false_alarm_rate(cal.detect(torch.randn(100, 19, generator=g, dtype=torch.float64))))
    assert 0.043 < sum(rates) / len(rates) < 0.057


def test_a_run_that_dominates_its_step_leaves_the_others_statistics_exact():
    """The leave-one-out shortcuts (the mean less the run's share; SS less its term) cancel when
    one run is 1e8 times the others: the reference std came out 1.29 instead of 1.32. Against the
    definition, with each run left out in turn:"""
    g = torch.Generator().manual_seed(0)
    x = -torch.log(torch.rand(20, 3, generator=g, dtype=torch.float64))  # exponential, like surprise
    x[-1, 0] = 1.23e8 * x[:-1, 0].mean()  # the last run, which fresh runs are scored without
    x[4, 1] = 1e9
    cal = calibrate(x, 0.05)
    xs = x.numpy()
    loo = [(xs[i, j] - np.delete(xs[:, j], i).mean()) / np.delete(xs[:, j], i).std(ddof=1)
           for j in range(3) for i in range(20)]
    assert cal.threshold == pytest.approx(float(np.quantile(loo, 0.95, method="higher")), rel=1e-12)
    for j in range(3):
        assert cal.mean[j].item() == pytest.approx(xs[:-1, j].mean(), rel=1e-12)
        assert cal.std[j].item() == pytest.approx(xs[:-1, j].std(ddof=1), rel=1e-12)


def test_too_few_calibration_z_scores_for_the_rate_are_warned_about():
    """With fewer than 1 / rate - 1 z-scores the threshold is their maximum, which about 1 in
    (their number + 1) fresh steps exceeds: 3 runs of 19 steps flag 1.4% at a 1% target."""
    g = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match=r"on 57 nominal z-scores: the threshold is their maximum, .* 1/58 = 1.72%"):
        calibrate(torch.randn(3, 19, generator=g, dtype=torch.float64), 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate(torch.randn(6, 19, generator=g, dtype=torch.float64), 0.01)  # 114 z-scores


def test_pooled_calibration_and_length_check():
    x = torch.randn(100, 8, dtype=torch.float64) * 2 + 3
    cal = calibrate(x, per_step=False)
    assert cal.mean.shape == (1,) and cal.mean.item() == pytest.approx(x.flatten()[:-1].mean().item(), rel=1e-12)
    assert cal.std.item() == pytest.approx(x.flatten()[:-1].std().item(), rel=1e-12)
    assert cal.detect(torch.randn(4, 30)).shape == (4, 30)  # pooled: any length
    with pytest.raises(ValueError, match="per_step=False"):
        calibrate(x).detect(torch.randn(4, 30))


def test_first_detection_rate_latency_and_false_alarms():
    flags = torch.zeros(4, 10, dtype=torch.bool)
    flags[0, 5] = flags[1, 6] = flags[1, 7] = flags[2, 9] = flags[3, 2] = True
    assert first_detection(flags, 5, window=3).tolist() == [0, 1, -1, -1]
    assert first_detection(flags, 5).tolist() == [0, 1, 4, -1]
    assert detection_rate(flags, 5, 3) == 0.5 and mean_latency(flags, 5, 3) == 0.5
    assert math.isnan(mean_latency(flags, 0, 1))
    assert first_detection(flags, 10).tolist() == [-1] * 4  # start past the last step: nothing to detect
    assert detection_rate(flags, 12, 3) == 0.0 and math.isnan(mean_latency(flags, 12, 3))
    with pytest.raises(ValueError, match="window must be at least 1"):
        first_detection(flags, 2, window=0)
    assert false_alarm_rate(flags) == 5 / 40


def test_first_detection_equals_a_loop_over_the_window():
    """Every start and window (edges included) against a plain search of [start, start + window)."""
    flags = torch.rand(40, 12, generator=torch.Generator().manual_seed(0)) < 0.15  # (B, L)
    for start in range(14):
        for window in (None, 1, 2, 3, 5, 20):
            end = 12 if window is None else min(12, start + window)
            want = [next((t - start for t in range(start, end) if flags[b, t]), -1) for b in range(40)]
            assert first_detection(flags, start, window).tolist() == want, (start, window)
            assert detection_rate(flags, start, window) == sum(w >= 0 for w in want) / 40


# ---- statistics against independent computations -------------------------------------------------------
def test_auroc_equals_brute_force_pair_counting_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        pos, neg = torch.randint(0, 6, (37,), generator=g).float(), torch.randint(0, 5, (23,), generator=g).float()
        wins = sum(float(a > b) + 0.5 * float(a == b) for a in pos.tolist() for b in neg.tolist())
        assert auroc(pos, neg) == pytest.approx(wins / (37 * 23), abs=1e-12)
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert auroc(torch.ones(3), torch.ones(5)) == 0.5


def test_betainc_closed_forms():
    for x in (0.01, 0.3, 0.5, 0.77, 0.999):
        assert betainc(2.5, 1.0, x) == pytest.approx(x**2.5, rel=1e-12)
        assert betainc(1.0, 3.5, x) == pytest.approx(1 - (1 - x) ** 3.5, rel=1e-12)
        assert betainc(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), rel=1e-12)
        assert betainc(3.0, 7.0, x) == pytest.approx(1 - betainc(7.0, 3.0, 1 - x), abs=1e-14)
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-14)  # binomial sum: P(Bin(4, 0.4) >= 2)


@pytest.mark.parametrize("t,df,p", [  # two-sided critical values of Student's t (printed tables)
    (12.706205, 1, 0.05), (4.302653, 2, 0.05), (2.570582, 5, 0.05), (2.228139, 10, 0.05),
    (3.169273, 10, 0.01), (2.085963, 20, 0.05), (2.749996, 30, 0.01), (1.959966, 10**7, 0.05),
])
def test_student_t_tail_matches_tables(t, df, p):
    assert student_t_sf2(t, df) == pytest.approx(p, rel=1e-5)
    assert student_t_sf2(-t, df) == pytest.approx(p, rel=1e-5)


def test_student_t_tail_closed_forms():
    for t in (0.0, 0.3, 1.0, 4.0, 50.0):
        assert student_t_sf2(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10, abs=1e-15)  # Cauchy
        assert student_t_sf2(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10, abs=1e-15)


def test_paired_t_statistic_matches_the_direct_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(1.0, 1.0, 15), rng.normal(0.4, 1.0, 15)
    d = x - y
    t_direct = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    t, p = paired_t_test(torch.from_numpy(x), torch.from_numpy(y))
    assert t == pytest.approx(t_direct, rel=1e-12)
    assert p == pytest.approx(student_t_sf2(t_direct, 14), rel=1e-12)
    assert paired_t_test(torch.ones(4), torch.ones(4)) == (0.0, 1.0)
    assert paired_t_test(torch.ones(4) * 2, torch.ones(4)) == (math.inf, 0.0)
    with pytest.raises(ValueError):
        paired_t_test(torch.ones(4), torch.ones(3))


# ---- the demo script --------------------------------------------------------------------------------------
@pytest.mark.parametrize("env", ["tworoom", "pusht"])
def test_conditions_share_the_trajectory_until_the_perturbation(env):
    cli, p = load_cli(), 3
    setup = {"env": env, "env_params": {}, "policy": cli.DEFAULT_POLICY[env][0], "noise": cli.DEFAULT_POLICY[env][1]}
    run = dict(n=6, num_frames=5, frameskip=2, resolution=32, seed=7, perturb_step=p)
    px = {c: cli.generate(setup, c, **run) for c in cli.CONDITIONS}
    for c in cli.CONDITIONS[1:]:
        assert np.array_equal(px[c][0][:, :p], px["nominal"][0][:, :p])
        assert np.array_equal(px[c][1][:, :p], px["nominal"][1][:, :p])  # blocks 0 .. p-1 precede the jump
        changed = (px[c][0][:, p] != px["nominal"][0][:, p]).any(axis=(1, 2, 3))
        assert changed.all(), c
    assert px["nominal"][1].shape == (6, 4, 4)  # (N, L-1, frameskip*A)


@pytest.mark.parametrize("env", ["tworoom", "pusht"])
def test_recorded_action_blocks_replay_the_recorded_frames(env):
    """The blocks generate() returns are the actions it executed: replayed from the same start in a
    fresh env they give the same frames."""
    import envs

    cli = load_cli()
    setup = {"env": env, "env_params": {}, "policy": cli.DEFAULT_POLICY[env][0], "noise": cli.DEFAULT_POLICY[env][1]}
    pixels, blocks = cli.generate(setup, "nominal", n=4, num_frames=4, frameskip=3, resolution=32, seed=5,
                                  perturb_step=10)
    env_seed = int(np.random.SeedSequence(5).generate_state(3)[0])  # generate()'s env stream
    replay = envs.make_batch(env, 4, resolution=32, seed=env_seed)
    frames = [replay.reset()["pixels"]]
    for k in range(3):
        for i in range(3):
            obs = replay.step(blocks[:, k, 2 * i : 2 * i + 2])
        frames.append(obs["pixels"])
    np.testing.assert_array_equal(np.stack(frames, 1), pixels)
    assert np.abs(blocks).max() > 0.1


@pytest.mark.parametrize("env", ["tworoom", "pusht"])
def test_teleport_moves_the_agent_or_block_far_and_keeps_the_two_room_target(env):
    import envs

    cli = load_cli()
    e = envs.make_batch(env, 16, resolution=32, seed=3)
    e.reset()
    before = e.get_state().copy()
    cli.teleport(e, env, seed=11)
    after = e.get_state()
    moved = slice(0, 2) if env == "tworoom" else slice(2, 4)
    jump = np.linalg.norm(after[:, moved] - before[:, moved], axis=1)
    assert (jump >= cli.MIN_JUMP[env]).mean() >= 0.9  # the farthest of 4 draws otherwise
    if env == "tworoom":
        np.testing.assert_array_equal(after[:, 2:], before[:, 2:])  # the target stays


def test_statistics_on_surprise_with_known_spikes():
    """Nominal N(0, 1) surprise; 'colour' adds a spike at the perturbation frame p, 'teleport' one
    frame later: AUROC 1 and detection of both, latencies 0 and 1, t-test and false alarms as
    written out here. The first `horizon` frames have no surprise (NaN)."""
    cli = load_cli()
    g = torch.Generator().manual_seed(0)
    n, L, p, horizon = 40, 14, 6, 2
    cal = calibrate(torch.randn(200, L, generator=g, dtype=torch.float64), 0.01)
    nominal = torch.randn(n, L, generator=g, dtype=torch.float64)
    nominal[:, :horizon] = float("nan")
    surprise = {"nominal": nominal, "colour": nominal.clone(), "teleport": nominal.clone()}
    surprise["colour"][:, p] += 50.0
    surprise["teleport"][:, p + 1] += 50.0
    stats = cli.statistics(surprise, cal, p, window=3, horizon=horizon)
    assert stats["colour"]["auroc"] == 1.0 and stats["teleport"]["auroc"] == 0.5  # all ties at p
    assert stats["colour"]["detection_rate"] == 1.0 and stats["colour"]["mean_latency"] == 0.0
    assert stats["teleport"]["detection_rate"] == 1.0 and stats["teleport"]["mean_latency"] == 1.0
    t, pval = paired_t_test(surprise["colour"][:, p], nominal[:, p])
    assert stats["colour"]["t_statistic"] == t and stats["colour"]["p_value"] == pval and t > 1e6
    flags = cal.detect(nominal)
    assert stats["nominal"]["false_alarm_rate_per_step"] == float(flags[:, horizon:].double().mean())
    assert stats["nominal"]["false_alarm_rate_in_window"] == float(flags[:, p:p + 3].any(1).double().mean())


def test_calibration_runs_are_other_runs_than_the_scored_ones(tmp_path, monkeypatch):
    """The threshold is set on nominal runs that are not the scored ones (their own seed)."""
    cli = load_cli()
    seeds = []
    real = cli.generate
    monkeypatch.setattr(cli, "generate", lambda setup, c, n, seed, **kw: seeds.append((c, seed)) or real(
        setup, c, n, seed=seed, **kw))
    model_dir = tiny_model(tmp_path / "model", TWOROOM_DATA)
    cli.main(["--model", str(model_dir), "--num-trajectories", "3", "--num-frames", "6", "--perturb-step", "3",
              "--out", str(tmp_path / "out"), "--no-progress"])
    calibration, scored = seeds[0][1], {s for c, s in seeds[1:]}
    assert len(scored) == 1 and calibration not in scored and len(seeds) == 1 + len(cli.CONDITIONS)


def test_cli_options_set_the_calibration_and_the_statistics(tmp_path, monkeypatch):
    """--num-calibration, --false-alarm-rate and --window reach what they set, and the
    calibration is fitted on its own nominal runs, not on the scored ones."""
    cli = load_cli()
    seen = {}
    calibrate_real, statistics_real = cli.calibrate, cli.statistics

    def calibrate_spy(nominal, rate):
        seen["nominal"], seen["rate"] = nominal, rate
        seen["cal"] = calibrate_real(nominal, rate)
        return seen["cal"]

    def statistics_spy(surprise, cal, p, window, horizon):
        seen["scored"], seen["stats_cal"], seen["window"] = surprise["nominal"], cal, window
        return statistics_real(surprise, cal, p, window, horizon)

    monkeypatch.setattr(cli, "calibrate", calibrate_spy)
    monkeypatch.setattr(cli, "statistics", statistics_spy)
    model_dir = tiny_model(tmp_path / "model", TWOROOM_DATA)
    base = ["--model", str(model_dir), "--num-frames", "6", "--perturb-step", "3", "--no-progress"]
    result = cli.main([*base, "--num-trajectories", "3", "--num-calibration", "5", "--false-alarm-rate", "0.2",
                       "--window", "2", "--out", str(tmp_path / "a")])
    assert seen["nominal"].shape[0] == 5 and seen["rate"] == 0.2 and seen["window"] == 2
    assert seen["stats_cal"] is seen["cal"]
    assert result["calibration"] == {"threshold_z": seen["cal"].threshold, "false_alarm_target": 0.2, "runs": 5}
    assert (result["settings"]["window"], result["settings"]["false_alarm_rate"]) == (2, 0.2)
    # as many calibration runs as scored ones: still other runs
    cli.main([*base, "--num-trajectories", "3", "--out", str(tmp_path / "b")])
    assert seen["nominal"].shape == seen["scored"].shape and not torch.equal(seen["nominal"], seen["scored"])


def test_a_second_version_of_a_run_names_the_results_it_replaced_and_the_figure_pairs_the_json(tmp_path,
                                                                                               monkeypatch, capsys):
    """Default folders name the run, not its version: a second version's results replace the
    first's, and say so. The figure takes its name only once the JSON has been written, and the JSON
    records its sha256."""
    import hashlib

    cli = load_cli()
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs" / "sr_tiny"
    first = tiny_model(runs / "version_0" / "model", TWOROOM_DATA)
    torch.manual_seed(1)
    second = export_model(LeWorldModel(LeWMConfig(**{**TINY, "history": 2})), runs / "version_1" / "model",
                          extra={"dataset": TWOROOM_DATA})
    base = ["--num-trajectories", "3", "--num-frames", "6", "--perturb-step", "3", "--no-progress"]
    out = Path("runs") / "surprise" / "sr_tiny"  # relative to the working directory, as the default
    for model in (first, first):
        cli.main(["--model", str(model), *base])
        assert "held the results of another model" not in capsys.readouterr().err
    result = cli.main(["--model", str(second), *base])
    assert f"{out} held the results of another model ({first}); they were replaced" in capsys.readouterr().err
    assert json.loads((out / "surprise.json").read_text())["model_dir"] == str(second) == result["model_dir"]
    png = (out / "surprise.png").read_bytes()
    assert hashlib.sha256(png).hexdigest() == result["figure_sha256"]

    def interrupted(*args):
        raise KeyboardInterrupt

    for where in ("write_json", "sha256_file"):  # writing the results, or hashing the weights before
        monkeypatch.setattr(cli, where, interrupted)
        with pytest.raises(KeyboardInterrupt):
            cli.main(["--model", str(first), *base, "--seed", "0", "--num-frames", "7"])
        monkeypatch.undo()
        monkeypatch.chdir(tmp_path)
        assert (out / "surprise.png").read_bytes() == png  # the figure of the results still there
        assert sorted(p.name for p in out.iterdir()) == ["surprise.json", "surprise.png"]  # no temporary file left


def tiny_model(path: Path, dataset: dict | None, **overrides) -> Path:
    torch.manual_seed(0)
    model = LeWorldModel(LeWMConfig(**{**TINY, "history": 2, **overrides}))
    return export_model(model, path, extra={"dataset": dataset} if dataset else {})


def test_cli_smoke_writes_figure_and_complete_json(tmp_path):
    model_dir = tiny_model(tmp_path / "model", TWOROOM_DATA)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "surprise.py"), "--model", str(model_dir), "--num-trajectories", "4",
           "--num-frames", "6", "--perturb-step", "3", "--seed", "1", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "teleport" in proc.stdout and "AUROC" in proc.stdout
    assert (out / "surprise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "surprise.json").read_text())
    for key in ("protocol", "leworld_version", "model", "model_sha256", "seed", "settings", "env", "env_params",
                "policy", "noise", "frameskip", "history", "calibration", "statistics", "median_surprise",
                "wall_seconds"):
        assert key in result, key
    assert result["env"] == "tworoom" and result["policy"] == "expert" and len(result["model_sha256"]) == 64
    assert result["settings"]["num_trajectories"] == 4 and result["settings"]["perturb_step"] == 3
    for c in ("colour", "teleport"):
        assert set(result["statistics"][c]) >= {"t_statistic", "p_value", "auroc", "detection_rate", "mean_latency"}
        assert 0.0 <= result["statistics"][c]["p_value"] <= 1.0
    assert set(result["statistics"]["nominal"]) >= {"false_alarm_rate_per_step", "false_alarm_rate_in_window"}
    assert len(result["median_surprise"]["nominal"]) == 6


def test_cli_table_never_rounds_an_imperfect_auroc_to_one():
    row = {"t_statistic": 3.5, "p_value": 8e-4, "detection_rate": 1.0, "mean_latency": 0.1}
    stats = {"colour": {**row, "auroc": 0.9997}, "teleport": {**row, "auroc": 1.0},
             "nominal": {"false_alarm_rate_in_window": 0.04, "false_alarm_rate_per_step": 0.011}}
    lines = load_cli().table(stats).splitlines()
    assert " 0.9997 " in lines[1] and " 1.0000 " in lines[2]


def test_cli_medians_average_the_two_middle_values():
    x = torch.tensor([[4.0, 1.0, 10.0, 2.0, float("nan")], [1.0, 1.0, 1.0, 3.0, 5.0]])
    assert load_cli().median(x[0, :4]) == 3.0  # torch.median would give 2.0
    assert load_cli().median(x[1]) == 1.0


def test_cli_pusht_in_process_with_horizon(tmp_path):
    data = {"env": "pusht", "env_params": {"damping": 0.0}, "policy": "random", "noise": None}
    model_dir = tiny_model(tmp_path / "model", data)
    result = load_cli().main(["--model", str(model_dir), "--num-trajectories", "3", "--num-frames", "5",
                              "--perturb-step", "3", "--horizon", "2", "--out", str(tmp_path / "out"), "--no-progress"])
    assert result["env"] == "pusht" and result["policy"] == "random"
    assert result["median_surprise"]["nominal"][:2] == [None, None]  # no 2-step prediction for frames 0, 1


@pytest.mark.parametrize("dataset,overrides,args,message", [
    (TWOROOM_DATA, {}, ["--env", "pusht"], "trained on 'tworoom'"),
    (TWOROOM_DATA, {"action_dim": 3}, [], "action_dim"),
    ({**TWOROOM_DATA, "resolution": 64}, {}, [], "64 px"),
    (None, {}, [], "pass --env"),
])
def test_cli_clear_errors_on_mismatch(tmp_path, capsys, dataset, overrides, args, message):
    model_dir = tiny_model(tmp_path / "model", dataset, **overrides)
    with pytest.raises(SystemExit, match=message):
        load_cli().main(["--model", str(model_dir), "--num-trajectories", "3", "--num-frames", "4",
                         "--perturb-step", "2", "--out", str(tmp_path / "out"), *args])


def test_cli_bad_model_path(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "surprise.py"), "--model", str(tmp_path / "nope")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "no model at" in proc.stderr


def test_cli_checks_horizon_device_and_out_before_any_work(tmp_path, capsys, monkeypatch):
    cli = load_cli()
    model_dir = tiny_model(tmp_path / "model", TWOROOM_DATA)
    base = ["--model", str(model_dir), "--num-trajectories", "3", "--num-frames", "4", "--perturb-step", "2"]
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args([*base, "--horizon", "0"])
    assert exit_info.value.code == 2 and "--horizon must be at least 1" in capsys.readouterr().err
    for counts in (["--num-trajectories", "2"], ["--num-calibration", "2"], ["--num-calibration", "0"]):
        with pytest.raises(SystemExit) as exit_info:  # 0 is refused too, not taken as "the default"
            cli.parse_args([*base, *counts])
        assert exit_info.value.code == 2 and "3 calibration runs" in capsys.readouterr().err
    (tmp_path / "afile").write_text("keep")
    for args, message in ((["--out", str(tmp_path / "afile")], "is a file: it names the output directory"),
                          (["--out", str(tmp_path / "afile" / "x")], "afile is a file, not a directory"),
                          (["--device", "bogus"], "unknown device 'bogus'")):
        with pytest.raises(SystemExit, match=message):
            cli.main([*base, *args])
    assert (tmp_path / "afile").read_text() == "keep"
    # the default folder is named after the run and, for a seed other than 0, the seed: no overwriting
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LEWORLD_KEEP_FREED_MEMORY", "0")
    cli.main([*base, "--seed", "3", "--no-progress"])
    cli.main([*base, "--no-progress"])
    from leworld.checkpoint import model_name

    name = model_name(model_dir)
    assert sorted(p.name for p in (tmp_path / "runs" / "surprise").iterdir()) == [name, f"{name}-seed3"]
