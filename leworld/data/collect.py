"""Generate a dataset by running a scripted policy in one of our environments.

Example:
    python -m leworld.data.collect --env tworoom --episodes 200 --steps 100 --resolution 64 \\
        --policy expert --noise 2.0 --seed 0 --out data/tworoom.h5

The same from Python:
    >>> from leworld.data.collect import collect
    >>> collect("tworoom", episodes=200, steps=100, resolution=64, out="data/tworoom.h5")

Episodes are generated in fixed blocks of `chunk_size` episodes, each block seeded from
(seed, block index), so the file depends only on the arguments, not on the number of
worker processes. Blocks run in parallel worker processes and are written in order.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

import envs
from envs.policies import POLICIES, action_noise, make_policy
from leworld.cli import HelpFormatter
from leworld.data.store import EpisodeStore, EpisodeWriter
from leworld.results import package_version

DEFAULT_POLICY = {"tworoom": "expert", "pusht": "contact"}
DEFAULT_WORKERS = {"tworoom": 1, "pusht": os.cpu_count() or 1}
SUPERSAMPLED_ENVS = ("pusht",)  # envs whose renderer takes `supersample`
MAX_RESOLUTION = 1024  # frames beyond this are no world-model input; a typo would exhaust memory


def collect_block(env_name: str, num_episodes: int, steps: int, resolution: int, policy: str,
                  noise: float | None, seed: int, block: int, env_kwargs: dict | None = None) -> dict:
    """Run `num_episodes` episodes of `steps` steps in one batched env.

    Returns arrays shaped (E, steps + 1, ...); the action row of the last observation is NaN.
    """
    env_seed, policy_seed = np.random.SeedSequence([seed, block]).generate_state(2)
    env = envs.make_batch(env_name, num_envs=num_episodes, resolution=resolution, seed=int(env_seed),
                          **(env_kwargs or {}))
    pi = make_policy(env_name, policy, env, noise=noise, seed=int(policy_seed))
    n, length = num_episodes, steps + 1
    out = {
        "pixels": np.empty((n, length, resolution, resolution, 3), np.uint8),
        "action": np.full((n, length, env.action_dim), np.nan, np.float32),
        "proprio": np.empty((n, length, env.proprio_dim), np.float32),
        "state": np.empty((n, length, env.state_dim), np.float64),
    }
    obs = env.reset()
    pi.reset(env)
    for t in range(length):
        out["pixels"][:, t] = obs["pixels"]
        out["proprio"][:, t] = obs["proprio"]
        out["state"][:, t] = env.get_state()
        if t == steps:
            break
        action = np.clip(np.asarray(pi.act(env), np.float32), -1.0, 1.0)  # (N, A)
        out["action"][:, t] = action
        obs = env.step(action)
    return out


def _block_job(args: tuple) -> dict:
    return collect_block(*args)


def _ignore_interrupts() -> None:
    """Pool worker initialiser: Ctrl-C reaches the whole process group, but only the parent acts
    on it (it terminates the pool and deletes the partial file); a worker killed mid-block by
    the signal would leave the pool unable to shut down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _interrupts_abort():
    """While collecting, Ctrl-C (SIGINT) and SIGTERM (a job scheduler, `timeout`) abort the run.

    Yields a function that raises KeyboardInterrupt if either signal arrived. Python drops an
    exception raised inside a garbage-collection callback, so an interrupt that lands there
    would otherwise be lost and the run would go on to replace the output file; the collector
    calls the check after every block and before the final rename. Signals after the first are
    noted but raise nothing, so that pressing Ctrl-C again cannot interrupt the removal of the
    partial file. Outside the main thread (where handlers cannot be installed) the check never
    fires."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def handler(signum, frame):
        received.append(signum)
        if len(received) == 1:  # a second Ctrl-C must not cut short the cleanup the first one started
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def check() -> None:
        if received:
            raise KeyboardInterrupt(f"signal {signal.Signals(received[0]).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield check
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _as_int(name: str, value) -> int:
    """`value` as a Python int, or a clear error where it is not a whole number."""
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer, got {value!r}")
    return int(value)


def _check_args(env: str, episodes: int, steps: int, resolution: int, policy: str,
                noise: float | None, chunk_size: int, workers: int, supersample: int = 1, seed: int = 0) -> None:
    if env not in envs.ENV_NAMES:
        raise ValueError(f"unknown env {env!r}: choose one of {', '.join(envs.ENV_NAMES)}")
    if policy not in POLICIES[env]:
        raise ValueError(f"unknown policy {policy!r} for {env}: choose one of {', '.join(POLICIES[env])}")
    for name, value in (("episodes", episodes), ("steps", steps), ("chunk_size", chunk_size), ("workers", workers)):
        if int(value) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if int(seed) < 0:
        raise ValueError(f"--seed must be an integer >= 0 (numpy seeds are non-negative), got {seed}")
    if not 16 <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"--resolution must be between 16 and {MAX_RESOLUTION} px, got {resolution}")
    if noise is not None and not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"--noise is a standard deviation and must be a finite number >= 0, got {noise}")
    if supersample != 1 and env not in SUPERSAMPLED_ENVS:
        raise ValueError(f"--supersample is a Push-T rendering option; {env} draws at --resolution directly: "
                         "leave it at 1")


def collect(env: str, episodes: int, steps: int = 100, resolution: int = 224, policy: str | None = None,
            noise: float | None = None, seed: int = 0, out: str | os.PathLike = "data/dataset.h5",
            overwrite: bool = False, workers: int | None = None, chunk_size: int = 16,
            env_kwargs: dict | None = None, progress: bool = True, compression: str | None = None,
            supersample: int = 1) -> Path:
    """Collect `episodes` episodes of `steps` steps and write them atomically to `out`.

    `supersample` S > 1 (Push-T only) draws each frame at S x `resolution` and box-filters it
    down, so that the block's outline and angle move smoothly; the episodes are the same.
    """
    policy = policy or DEFAULT_POLICY.get(env, "random")
    workers = DEFAULT_WORKERS.get(env, 1) if workers is None else workers
    # numpy scalars (a sweep over np.arange, say) become plain numbers, which the metadata's JSON can hold
    episodes, steps, resolution, seed, chunk_size, workers, supersample = (
        _as_int(name, value) for name, value in (("episodes", episodes), ("steps", steps), ("resolution", resolution),
                                                 ("seed", seed), ("chunk_size", chunk_size), ("workers", workers),
                                                 ("supersample", supersample)))
    noise = None if noise is None else float(noise)
    _check_args(env, episodes, steps, resolution, policy, noise, chunk_size, workers, supersample, seed)
    if supersample != 1:
        env_kwargs = {**(env_kwargs or {}), "supersample": int(supersample)}
    if compression not in (None, "none", "lzf", "gzip"):
        raise ValueError(f"unknown compression {compression!r}: choose none, lzf or gzip")
    compression = None if compression == "none" else compression
    out = Path(out)
    probe = envs.make_batch(env, num_envs=1, resolution=resolution, seed=seed, **(env_kwargs or {}))
    metadata = {
        "env": env, "env_id": probe.env_id, "env_params": probe.params(), "policy": policy, "noise": noise,
        # what `noise` (None: the policy's default) comes to for this policy, as a number per sub-policy
        "policy_noise": action_noise(make_policy(env, policy, probe, noise=noise, seed=seed)),
        "seed": seed, "chunk_size": chunk_size, "resolution": resolution, "episodes": episodes, "steps": steps,
        "leworld_version": package_version(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    sizes = [min(chunk_size, episodes - start) for start in range(0, episodes, chunk_size)]
    jobs = [(env, n, steps, resolution, policy, noise, seed, b, env_kwargs) for b, n in enumerate(sizes)]
    start_time = time.perf_counter()
    writer = EpisodeWriter(out, resolution=resolution, action_dim=probe.action_dim, proprio_dim=probe.proprio_dim,
                           state_dim=probe.state_dim, metadata=metadata, overwrite=overwrite,
                           compression=compression)
    pool = None
    with _interrupts_abort() as check_interrupt:
        try:
            if workers > 1 and len(jobs) > 1:
                pool = mp.get_context("spawn").Pool(workers, initializer=_ignore_interrupts)
            blocks = pool.imap(_block_job, jobs) if pool else map(_block_job, jobs)
            with tqdm(total=episodes, desc=f"collect {env}", unit="ep", disable=not progress) as bar:
                for block in blocks:
                    check_interrupt()
                    writer.append(block)
                    bar.update(len(block["pixels"]))
            seconds = time.perf_counter() - start_time
            writer.update_metadata(seconds=seconds, steps_per_second=episodes * steps / seconds)
            check_interrupt()  # the last chance before the rename replaces an existing file
            writer.close()
        except BaseException:
            try:
                if pool:
                    pool.terminate()
            finally:
                writer.abort()
            raise
        finally:
            if pool:
                pool.close()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m leworld.data.collect", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--env", required=True, help=f"environment: {', '.join(envs.ENV_NAMES)}")
    p.add_argument("--episodes", type=int, default=100, help="number of episodes")
    p.add_argument("--steps", type=int, default=100, help="env steps per episode")
    p.add_argument("--resolution", type=int, default=224, help="frame size in pixels")
    p.add_argument("--supersample", type=int, default=1,
                   help="Push-T: draw at this many times --resolution and box-filter down (4: smooth block angle)")
    p.add_argument("--policy", default=None, help="data policy (default: expert for tworoom, contact for pusht)")
    p.add_argument("--noise", type=float, default=None, help="policy action noise std (default: the policy's)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", required=True, help="output .h5 file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: 1 tworoom, all cores pusht)")
    p.add_argument("--chunk-size", type=int, default=16, help="episodes per seeded block (changes the data)")
    p.add_argument("--compression", default="none", help="pixel compression: none, lzf or gzip")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = collect(args.env, args.episodes, args.steps, args.resolution, args.policy, args.noise, args.seed,
                       args.out, overwrite=args.overwrite, workers=args.workers, chunk_size=args.chunk_size,
                       progress=not args.quiet, compression=args.compression, supersample=args.supersample)
    except (ValueError, FileExistsError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(EpisodeStore(path).summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
