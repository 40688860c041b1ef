"""Surprise demo: does the world model notice a colour change or a teleport in mid-trajectory?

Example:
    python surprise.py --model runs/tworoom_tiny/version_0/model

    python surprise.py --model runs/pusht_tiny/version_0/model --num-trajectories 100 --seed 0

The env, its parameters and the data policy come from the model's config.json
(`extra.dataset`; `--env` names the env of a model that does not record it). N trajectories of
`--num-frames` kept frames (every frameskip-th env step) run in one batched env for each of three
conditions that share the seed, so they are identical until the perturbation step p:
nominal; colour (Two-Room: agent, Push-T: block); teleport (Two-Room: agent, Push-T: agent and
block, to a reset-distribution state). Frame p is the first perturbed frame. Separate nominal
runs (another seed) calibrate per-step z-scores and the threshold (`--false-alarm-rate`).
Written to `--out` (default runs/surprise/<the model's run name>, with `-seed<N>` for a seed other
than 0; a note says when results of another model there were replaced): surprise.json (protocol
`surprise-v3`, settings, the model's directory and weights sha256, every statistic, the figure's
sha256) and surprise.png; the table is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import envs
from envs.policies import make_policy
from leworld.allocator import keep_freed_memory
from leworld.cli import HelpFormatter
from leworld.checkpoint import find_model, load_model, model_name
from leworld.device import resolve_device
from leworld.results import (
    atomic_write, check_writable, finite, package_version, recorded_model, replaced_model_note, sha256_file,
    write_json,
)
from leworld.surprise import (
    auroc, calibrate, detection_rate, false_alarm_rate, mean_latency, paired_t_test, trajectory_surprise,
)

# v2: leave-one-out calibration threshold, true medians; v3: fresh runs scored against N - 1 runs
PROTOCOL = "surprise-v3"
CONDITIONS = ("nominal", "colour", "teleport")
DEFAULT_POLICY = {"tworoom": ("expert", 2.0), "pusht": ("mix", None)}  # when config.json names none
COLOUR = {"tworoom": (0, 0, 255), "pusht": (220, 20, 60)}  # red agent -> blue; grey block -> crimson
MIN_JUMP = {"tworoom": 56.0, "pusht": 128.0}  # world px a teleport tries to move (a quarter of the world)
CANDIDATES = 4  # reset-distribution draws per teleport; the first at least MIN_JUMP away is taken


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, default=argparse.SUPPRESS,
                   help="exported model directory (model.safetensors + config.json), or a run directory "
                   "(runs/<name>: its newest model)")
    p.add_argument("--env", choices=envs.ENV_NAMES, default=None,
                   help="env; default: the one in the model's config.json (extra.dataset.env)")
    p.add_argument("--num-trajectories", type=int, default=100, help="N trajectories per condition")
    p.add_argument("--num-calibration", type=int, default=None, help="nominal calibration runs (default N)")
    p.add_argument("--num-frames", type=int, default=20, help="kept frames L per trajectory")
    p.add_argument("--perturb-step", type=int, default=10, help="kept frame p that is the first perturbed one")
    p.add_argument("--horizon", type=int, default=1, help="k: surprise of a k-step rollout prediction")
    p.add_argument("--false-alarm-rate", type=float, default=0.01, help="target fraction of nominal steps flagged")
    p.add_argument("--window", type=int, default=3, help="a detection counts in frames p .. p+window-1")
    p.add_argument("--seed", type=int, default=0, help="seed of the trajectories (scored and calibration runs)")
    p.add_argument("--out", default=None,
                   help="output directory (default runs/surprise/<run name>, plus -seed<N> for a seed other than 0)")
    p.add_argument("--device", default="cpu", help="torch device of the model: cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    if args.num_calibration is not None and args.num_calibration < 3:
        p.error(f"--num-calibration needs at least 3 calibration runs (the threshold scores each against the mean "
                f"and std of the others), got {args.num_calibration}; leave it out to use --num-trajectories")
    if args.num_trajectories < 2 or (args.num_calibration or args.num_trajectories) < 3:
        p.error("need at least 2 trajectories (the t-test needs a spread) and 3 calibration runs (the threshold "
                "scores each against the mean and std of the others; --num-calibration defaults to "
                "--num-trajectories)")
    if args.horizon < 1:
        p.error(f"--horizon must be at least 1 (a 1-step prediction), got {args.horizon}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if not args.horizon <= args.perturb_step < args.num_frames:
        p.error(f"need horizon <= perturb-step < num-frames, got {args.horizon}, {args.perturb_step}, "
                f"{args.num_frames}: the perturbed frame must exist and have a prediction")
    if args.window < 1 or not 0.0 <= args.false_alarm_rate < 1.0:
        p.error("need window >= 1 and 0 <= false-alarm-rate < 1")
    return args


# ---- the env the model was trained on ------------------------------------------------------------
def resolve_env(model_dir: Path, config, env_arg: str | None) -> dict:
    """Env name, constructor kwargs, policy and noise for the model; clear errors on a mismatch."""
    info = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    data = (info.get("extra") or {}).get("dataset") or {}
    name = env_arg or data.get("env")
    if name is None:
        raise SystemExit(f"error: {model_dir}/config.json records no training env (extra.dataset.env); "
                         f"pass --env ({' or '.join(envs.ENV_NAMES)}).")
    if data.get("env") not in (None, name):
        raise SystemExit(f"error: the model was trained on {data['env']!r} data but --env is {name!r}; "
                         "its surprise would measure the env change, not the perturbation. Drop --env.")
    kwargs = {k: v for k, v in (data.get("env_params") or {}).items() if k not in ("num_envs", "resolution", "seed")}
    resolution = data.get("resolution", config.image_size)
    if resolution != config.image_size:
        raise SystemExit(f"error: config.json says the data was {resolution} px but the model takes "
                         f"{config.image_size} px frames (config.image_size); re-export the model.")
    probe = envs.make_batch(name, num_envs=1, resolution=config.image_size, **kwargs)
    if probe.action_dim != config.action_dim:
        raise SystemExit(f"error: {name} has action_dim {probe.action_dim} but the model takes "
                         f"{config.action_dim} (config.action_dim); use a model trained on {name}.")
    policy, noise = (data["policy"], data.get("noise")) if data.get("policy") else DEFAULT_POLICY[name]
    return {"env": name, "env_params": kwargs, "policy": policy, "noise": noise}


# ---- trajectories ------------------------------------------------------------------------------------
def teleport(env, name: str, seed: int) -> None:
    """Teleport every env to a reset-distribution state, the first of CANDIDATES at least MIN_JUMP away."""
    n, now = env.num_envs, env.get_state()  # (N, S)
    cand = np.stack([envs.make_batch(name, n, resolution=env.resolution, seed=seed + j).get_state()
                     for j in range(CANDIDATES)])  # (K, N, S): fresh reset states
    moved = slice(0, 2) if name == "tworoom" else slice(2, 4)  # agent xy / block xy
    jump = np.linalg.norm(cand[:, :, moved] - now[:, moved], axis=-1)  # (K, N)
    far = jump >= MIN_JUMP[name]
    pick = np.where(far.any(0), far.argmax(0), jump.argmax(0))  # (N,)
    new = cand[pick, np.arange(n)]  # (N, S)
    if name == "tworoom":
        new[:, 2:] = now[:, 2:]  # keep the target
    env.set_state(new)


def generate(setup: dict, condition: str, n: int, num_frames: int, frameskip: int, resolution: int,
             seed: int, perturb_step: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Run n trajectories -> pixels (N, L, Hp, Wp, C) uint8 and raw action blocks (N, L-1, frameskip*A).

    Same seed, same trajectories up to frame perturb_step - 1 for every condition.
    """
    name = setup["env"]
    env_seed, policy_seed, jump_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(3))
    env = envs.make_batch(name, n, resolution=resolution, seed=env_seed, **setup["env_params"])
    policy = make_policy(name, setup["policy"], env, noise=setup["noise"], seed=policy_seed)
    A = env.action_dim
    pixels = np.empty((n, num_frames, resolution, resolution, 3), np.uint8)
    actions = np.empty((n, num_frames - 1, frameskip * A), np.float32)
    obs = env.reset()
    policy.reset(env)
    for k in tqdm(range(num_frames), desc=condition, leave=False, disable=not progress):
        if k == perturb_step and condition == "colour":
            env.set_colour(COLOUR[name], **({"part": "block"} if name == "pusht" else {}))
        if k == perturb_step and condition == "teleport":
            teleport(env, name, jump_seed)
        pixels[:, k] = env.render() if k == perturb_step else obs["pixels"]
        if k == num_frames - 1:
            break
        for i in range(frameskip):  # block k: the frameskip actions after frame k, step-major
            a = np.asarray(policy.act(env), np.float32)  # (N, A)
            actions[:, k, i * A : (i + 1) * A] = a
            obs = env.step(a)
    return pixels, actions


def score(model, pixels: np.ndarray, actions: np.ndarray, horizon: int, device: str) -> torch.Tensor:
    """(N, L, Hp, Wp, C) uint8, (N, L-1, frameskip*A) -> surprise (N, L) float64 on the CPU."""
    frames = torch.from_numpy(pixels).permute(0, 1, 4, 2, 3)  # (N, L, C, Hp, Wp)
    return trajectory_surprise(model, frames, torch.from_numpy(actions).to(device), horizon).double().cpu()


# ---- statistics, figure, files -------------------------------------------------------------------------
def median(x: torch.Tensor) -> float:
    """The median (the mean of the two middle values for an even count; torch.median takes the lower)."""
    return float(torch.quantile(x.double(), 0.5))


def statistics(surprise: dict, cal, p: int, window: int, horizon: int) -> dict:
    """Per perturbed condition: paired t-test and AUROC at frame p, detection rate and latency."""
    nominal = surprise["nominal"]
    nominal_flags = cal.detect(nominal)
    out = {"nominal": {"false_alarm_rate_per_step": false_alarm_rate(nominal_flags[:, horizon:]),
                       "false_alarm_rate_in_window": detection_rate(nominal_flags, p, window),
                       "median_z_at_p": median(cal.zscore(nominal)[:, p])}}
    for c in CONDITIONS[1:]:
        flags = cal.detect(surprise[c])
        t, pval = paired_t_test(surprise[c][:, p], nominal[:, p])
        out[c] = {"t_statistic": t, "p_value": pval, "auroc": auroc(surprise[c][:, p], nominal[:, p]),
                  "detection_rate": detection_rate(flags, p, window), "mean_latency": mean_latency(flags, p, window),
                  "median_z_at_p": median(cal.zscore(surprise[c])[:, p])}
    return out


def table(stats: dict) -> str:
    # AUROC with 4 decimals: 0.9997 (3 of 10,000 pairs misordered) must not print as 1.000
    rows = [f"{'condition':<10} {'t':>8} {'p-value':>10} {'AUROC':>6} {'detect':>7} {'latency':>8} {'false alarm':>12}"]
    for c in CONDITIONS[1:]:
        s = stats[c]
        rows.append(f"{c:<10} {s['t_statistic']:>8.2f} {s['p_value']:>10.2e} {s['auroc']:>6.4f} "
                    f"{s['detection_rate']:>7.1%} {s['mean_latency']:>8.2f} {'':>12}")
    s = stats["nominal"]
    rows.append(f"{'nominal':<10} {'':>8} {'':>10} {'':>6} {'':>7} {'':>8} "
                f"{s['false_alarm_rate_in_window']:>12.1%}  (per step {s['false_alarm_rate_per_step']:.1%})")
    return "\n".join(rows)


def figure(path: Path, z: dict, pixels: dict, cal, p: int, title: str) -> None:
    """z-score over time (median and quartiles over runs) above before/after thumbnails of run 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(8, 5.6))
    grid = fig.add_gridspec(2, 4, height_ratios=(2.2, 1))
    ax = fig.add_subplot(grid[0, :])
    first = int(torch.isfinite(z["nominal"][0]).int().argmax())  # frames before `horizon` have no prediction
    steps = np.arange(first, z["nominal"].shape[1])
    for c, colour in zip(CONDITIONS, ("tab:gray", "tab:blue", "tab:red")):
        q25, q50, q75 = np.quantile(z[c][:, first:].numpy(), [0.25, 0.5, 0.75], axis=0)
        ax.plot(steps, q50, color=colour, marker="o", ms=3, label=f"{c} (median)")
        ax.fill_between(steps, q25, q75, color=colour, alpha=0.2, lw=0)
    ax.axvline(p, color="k", ls="--", lw=1, label=f"perturbation (frame {p})")
    ax.axhline(cal.threshold, color="tab:orange", ls=":", lw=1.5,
               label=f"threshold ({cal.false_alarm_rate:.0%} false alarms)")
    ax.set_yscale("symlog", linthresh=3)
    ax.set_ylim(bottom=-3)
    ax.set_xlabel("kept frame")
    ax.set_ylabel("surprise z-score")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    for j, (c, k) in enumerate([("colour", p - 1), ("colour", p), ("teleport", p - 1), ("teleport", p)]):
        thumb = fig.add_subplot(grid[1, j])
        thumb.imshow(pixels[c][0, k])
        thumb.set_title(f"{c}, frame {k}" + (" (after)" if k == p else " (before)"), fontsize=8)
        thumb.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()  # faster CPU steps on Linux (leworld/allocator.py)
    start = time.perf_counter()
    model_dir = find_model(args.model)  # a run directory (runs/<name>) means its newest model
    if model_dir.exists() and not model_dir.is_dir():
        raise SystemExit(f"error: --model must be the exported model directory, got the file {model_dir} (a training "
                         ".ckpt does not record the env's settings; training exports runs/<name>/version_N/model)")
    out = Path(args.out or Path("runs") / "surprise" / (model_name(args.model) + (f"-seed{args.seed}" if args.seed else "")))
    try:  # a bad --out fails now, not after the trajectories have run
        args.device = str(resolve_device(args.device))
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file: it names the output directory (surprise.json, surprise.png)")
        check_writable(out / "surprise.json")
        model = load_model(model_dir, map_location=args.device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    cfg = model.config
    setup = resolve_env(model_dir, cfg, args.env)
    n, L, p = args.num_trajectories, args.num_frames, args.perturb_step
    n_cal = n if args.num_calibration is None else args.num_calibration
    progress = not args.no_progress
    run = dict(num_frames=L, frameskip=cfg.frameskip, resolution=cfg.image_size, perturb_step=p, progress=progress)
    scored_seed, calibration_seed = (int(s) for s in np.random.SeedSequence(args.seed).generate_state(2))

    cal_pixels, cal_actions = generate(setup, "nominal", n_cal, seed=calibration_seed, **run)
    cal = calibrate(score(model, cal_pixels, cal_actions, args.horizon, args.device), args.false_alarm_rate)
    pixels, surprise = {}, {}
    for c in tqdm(CONDITIONS, desc="conditions", disable=not progress):
        pixels[c], actions = generate(setup, c, n, seed=scored_seed, **run)
        surprise[c] = score(model, pixels[c], actions, args.horizon, args.device)
    stats = statistics(surprise, cal, p, args.window, args.horizon)
    z = {c: cal.zscore(surprise[c]) for c in CONDITIONS}
    title = f"{setup['env']}: {args.model}  ({n} runs per condition, quartile bands)"
    # the figure is drawn beside its final name and takes it only once the JSON is written, so an
    # interruption leaves no figure of other results than the JSON's
    figure_tmp = out / f".surprise.png.{os.getpid()}.tmp"
    try:  # nor a temporary figure where the run stops before it is renamed
        figure(figure_tmp, z, pixels, cal, p, title)
        weights = model_dir / "model.safetensors"
        result = finite({
            "protocol": PROTOCOL, "leworld_version": package_version(), "model": str(args.model),
            "model_dir": str(model_dir), "model_sha256": sha256_file(weights), "seed": args.seed,
            "settings": dict(vars(args)), **setup,
            "frameskip": cfg.frameskip, "history": cfg.history, "colour": COLOUR[setup["env"]],
            "calibration": {"threshold_z": cal.threshold, "false_alarm_target": cal.false_alarm_rate, "runs": n_cal},
            "statistics": stats,
            "median_surprise": {c: surprise[c].nanquantile(0.5, dim=0).tolist() for c in CONDITIONS},
            "figure_sha256": sha256_file(figure_tmp),
            "wall_seconds": time.perf_counter() - start,
        })
        before = recorded_model(out / "surprise.json")
        write_json(out / "surprise.json", result)
        os.replace(figure_tmp, out / "surprise.png")
    finally:
        figure_tmp.unlink(missing_ok=True)
    replaced = replaced_model_note(out, before, result["model_sha256"])
    if replaced:
        print(replaced, file=sys.stderr)
    print(f"{setup['env']}: {n} trajectories per condition, perturbation at kept frame {p}, "
          f"threshold z > {cal.threshold:.2f}, detection window {args.window} frames")
    print(table(stats))
    print(f"wrote {out / 'surprise.json'} and {out / 'surprise.png'} in {result['wall_seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
