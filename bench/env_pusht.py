"""Push-T environment speed: env steps/s with rendering, ours vs gym-pusht (PyPI), 1 process and all cores.

Example:
    python bench/env_pusht.py --steps 2000
    python bench/env_pusht.py --steps 500 --no-gym-pusht    # ours only

Ours: `envs.push_t.PushTBatch` (`--num-envs` copies per process) stepped with random actions and with the
`contact` data policy (random targets near the block: frequent contact; its time is included),
frames rendered at each resolution. gym-pusht: `gym_pusht/PushT-v0` with pixel observations at
the same resolution and random actions, run in its own virtual environment (default under
~/.cache/leworld; created with `pip install gym-pusht` on first use; never a dependency of this
project). If that install fails the script says so and still prints our numbers. "All cores"
runs one process per core at once and reports their summed rate.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside the gym-pusht virtual environment: prints one JSON line per (resolution, processes).
GYM_PUSHT_CHILD = r"""
import json, multiprocessing as mp, os, queue, sys, time
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
def gather(workers, results):
    out = []
    while len(out) < len(workers):
        try:
            out.append(results.get(timeout=1.0))
        except queue.Empty:
            if any(w.exitcode not in (None, 0) for w in workers):
                raise RuntimeError("a gym-pusht benchmark worker died (see its traceback above)")
    return out
def run(args, barrier=None, results=None):
    resolution, steps, seed = args
    import gymnasium as gym, gym_pusht  # noqa: F401
    try:
        env = gym.make("gym_pusht/PushT-v0", obs_type="pixels", observation_width=resolution,
                       observation_height=resolution)
    except TypeError:  # older gym-pusht: fixed 96 px observations
        env = gym.make("gym_pusht/PushT-v0", obs_type="pixels")
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    shape = list(obs.shape)
    for _ in range(20):  # warm-up
        env.step(env.action_space.sample())
    if barrier is not None:
        barrier.wait()
    start, done = time.perf_counter(), 0
    while done < steps:
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        done += 1
        if terminated or truncated:
            env.reset()
    out = (done / (time.perf_counter() - start), shape)
    if results is not None:
        results.put(out)
    return out
if __name__ == "__main__":
    steps, procs = int(sys.argv[1]), [int(p) for p in sys.argv[2].split(",")]
    import gym_pusht, importlib.metadata as md
    for resolution in [int(r) for r in sys.argv[3].split(",")]:
        for p in procs:
            ctx = mp.get_context("spawn")
            barrier, results = ctx.Barrier(p), ctx.Queue()
            workers = [ctx.Process(target=run, args=((resolution, steps, s), barrier, results)) for s in range(p)]
            for w in workers:
                w.start()
            out = gather(workers, results)
            for w in workers:
                w.join()
            print(json.dumps({"resolution": resolution, "processes": p, "steps_per_s": sum(o[0] for o in out),
                              "obs_shape": out[0][1], "version": md.version("gym-pusht")}), flush=True)
"""


def run_ours(args, barrier=None, results=None) -> float:
    """Env steps/s of one process: `num_envs` copies, random actions or the contact policy."""
    resolution, steps, num_envs, policy_name, seed = args
    sys.path.insert(0, str(ROOT))
    import numpy as np

    import envs
    from envs.policies import make_policy

    env = envs.make_batch("pusht", num_envs=num_envs, resolution=resolution, seed=seed)
    env.reset()
    rng = np.random.default_rng(seed)
    policy = make_policy("pusht", policy_name, env, seed=seed) if policy_name != "random" else None
    if policy is not None:
        policy.reset(env)
    act = (lambda: policy.act(env)) if policy else (lambda: rng.uniform(-1, 1, (num_envs, 2)))
    for _ in range(5):  # warm-up
        env.step(act())
    if barrier is not None:
        barrier.wait()  # all processes start timing together
    start, done = time.perf_counter(), 0
    while done < steps:
        env.step(act())
        done += num_envs
    rate = done / (time.perf_counter() - start)
    if results is not None:
        results.put(rate)
    return rate


def measure_ours(resolution: int, steps: int, num_envs: int, policy: str, processes: int) -> float:
    """Summed env steps/s of `processes` processes timed over the same interval."""
    jobs = [(resolution, steps, num_envs, policy, seed) for seed in range(processes)]
    if processes == 1:
        return run_ours(jobs[0])
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=run_ours, args=(job, barrier, results)) for job in jobs]
    for w in workers:
        w.start()
    rates = []
    while len(rates) < processes:
        try:
            rates.append(results.get(timeout=1.0))
        except queue.Empty:
            if any(w.exitcode not in (None, 0) for w in workers):
                raise RuntimeError("a benchmark worker died (see its traceback above)")
    for w in workers:
        w.join()
    return sum(rates)


def gym_pusht_python(venv: Path) -> tuple[Path | None, str]:
    """Python of a virtual environment with gym-pusht installed (created on first use), or None and why."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import gym_pusht"], capture_output=True).returncode == 0:
        return python, "cached"
    print(f"creating {venv} and installing gym-pusht from PyPI (first run only) ...", flush=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "gym-pusht"]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            return None, f"`{' '.join(cmd)}` failed:\n{(res.stderr or res.stdout).strip()[-1500:]}"
    return python, "installed"


def measure_gym_pusht(python: Path, resolutions, steps: int, processes) -> tuple[list[dict], str]:
    script = python.parent.parent / "leworld_bench_gym_pusht.py"  # a file: spawned workers re-import it
    script.write_text(GYM_PUSHT_CHILD)
    cmd = [str(python), str(script), str(steps), ",".join(map(str, processes)), ",".join(map(str, resolutions))]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SDL_VIDEODRIVER": "dummy"})
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return rows, "" if res.returncode == 0 else (res.stderr.strip()[-1500:] or "gym-pusht run failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4000, help="env steps to time per process and setting")
    parser.add_argument("--num-envs", type=int, default=8, help="copies in each of our batched envs")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 64], help="frame sizes in px")
    parser.add_argument("--processes", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                        help="process counts to time (default: 1 and all cores)")
    parser.add_argument("--policies", nargs="+", default=["random", "contact"],
                        choices=["random", "contact", "pusher", "mix"], help="what drives our env (policy time included)")
    parser.add_argument("--gym-pusht", action=argparse.BooleanOptionalAction, default=True,
                        help="also time gym-pusht from PyPI in its own virtual environment")
    parser.add_argument("--venv", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "leworld" / "bench-gym-pusht-venv", help="where the gym-pusht virtual environment lives")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.steps < 1 or min(args.processes) < 1:
        parser.error("--steps and every --processes value must be at least 1")

    results = []
    print(f"{'env':<28} {'res':>4} {'procs':>5} {'steps/s':>10} {'per proc':>9}")
    for resolution in args.resolutions:
        for policy in args.policies:
            for p in args.processes:
                rate = measure_ours(resolution, args.steps, args.num_envs, policy, p)
                results.append({"env": f"leworld PushT ({policy})", "resolution": resolution, "processes": p,
                                "steps_per_s": rate})
                print(f"{'leworld PushT (' + policy + ')':<28} {resolution:>4} {p:>5} {rate:>10.0f} {rate / p:>9.0f}",
                      flush=True)
    if args.gym_pusht:
        python, how = gym_pusht_python(args.venv)
        if python is None:
            print(f"gym-pusht: could not install it, so no comparison ({how})")
        else:
            rows, error = measure_gym_pusht(python, args.resolutions, args.steps, args.processes)
            for row in rows:
                name = f"gym-pusht {row['version']} (random)"
                rate = row["steps_per_s"]
                print(f"{name:<28} {row['resolution']:>4} {row['processes']:>5} {rate:>10.0f} "
                      f"{rate / row['processes']:>9.0f}  obs {row['obs_shape']}")
                results.append({"env": name, **row})
            if error:
                print(f"gym-pusht: run failed, numbers above may be incomplete:\n{error}")
    if args.json:
        from leworld.results import write_json

        write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})


if __name__ == "__main__":
    main()
