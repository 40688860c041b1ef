"""Goal-conditioned planning with a trained LeWM under a named evaluation protocol.

Example:
    python plan.py --model runs/tworoom_tiny/version_0/model --protocol paper-v3 --planner cem
    python plan.py --model runs/pusht_a runs/pusht_b --protocol paper-v3   # two models planned as an ensemble

Draws the protocol's start/goal pairs from the validation episodes of the model's training
data (or from --data), runs every episode in parallel in one batched env with latent MPC, and
runs the baselines (random, straight line, scripted expert) on the very same pairs. Prints a
table (success with a 95% Wilson interval, the rate without already-successful starts, ms per
plan, env steps per second of the whole evaluation, planning included) and writes a results JSON with the protocol, planner settings, model hash,
seed and package version. `--video` also writes one GIF per episode (start | goal | trajectory)
named after its outcome. `--policy straight` (or random, expert) evaluates a baseline alone.
Two privileged bounds run only when asked for: `--policy replay` replays the dataset's recorded
actions from each start, and `--policy oracle` (Push-T) plans with CEM in the env's own physics
(leworld/evaluation/oracle.py), with the success test as its cost (`--oracle-cost margin`, the
default), that test at the plan's end only (`terminal`) or a model's embedding distance
(`latent`, with `--model`):
    python plan.py --policy oracle --env pusht --data data/pusht_64_ss4.h5 --deadline --no-baselines
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import envs
from leworld.allocator import keep_freed_memory
from leworld.checkpoint import find_model, load_model, model_extra, model_name, recorded_data_path, weights_file
from leworld.data.store import RESOLUTION_HINT, DatasetError, EpisodeStore, fill_collect_hint
from leworld.device import describe_device, resolve_device
from leworld.evaluation import BASELINES, get_protocol, make_baseline, run_episodes, sample_pairs, summarize
from leworld.evaluation.baselines import ReplayBaseline
from leworld.evaluation.oracle import COSTS as ORACLE_COSTS, SimulatorOracle
from leworld.evaluation.protocols import PROTOCOLS, heldout_path
from leworld.model import ModelEnsemble
from leworld.planning import PLANNERS, MPCPolicy, make_planner
from leworld.planning.problem import COSTS
from leworld.results import check_writable, package_version, recorded_model, replaced_model_note, sha256_file, write_json

DEFAULT_ITERATIONS = {"tworoom": 10, "pusht": 30}  # the LeWM paper used 10 outside Push-T


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, nargs="+", help="exported model directory (runs/<run>/version_N/model), or a "
                   "run directory (runs/<run>: its newest version), or a training .ckpt. Several: plan with their "
                   "ensemble (the cost is the sum of the models' latent costs; leworld.model.ensemble)")
    p.add_argument("--env", choices=envs.ENV_NAMES, help="environment (default: the model's training env)")
    p.add_argument("--data", type=Path, help="dataset the pairs come from (default: the model's training data)")
    p.add_argument("--protocol", default="paper-v3", choices=sorted(PROTOCOLS),
                   help="evaluation preset (paper-v1-tworoom and far-tworoom-v1: Two-Room only). A held-out preset\n"
                        "(far-tworoom-v1) collects its own episodes once, into data/eval/ under the working\n"
                        "directory, unless --data gives that set")
    p.add_argument("--num-episodes", type=int, help="override the protocol's episode count (renames the protocol)")
    p.add_argument("--policy", default="model", choices=("model", *BASELINES, "replay", "oracle"),
                   help="what acts in the env. replay: privileged, the dataset's recorded actions from each start\n"
                        "(how reachable the pairs are). oracle (Push-T): privileged CEM-MPC in the true physics with the\n"
                        "success test as its cost, an upper bound for the search (leworld.evaluation.oracle);\n"
                        "its CEM defaults to 100 samples, 10 elites, 5 iterations (--num-samples, --topk,\n"
                        "--iterations, --init-std, --horizon and --deadline apply). --baselines never runs either"),
    p.add_argument("--oracle-cost", default="margin", choices=ORACLE_COSTS,
                   help="--policy oracle's cost: margin (the success test's, lowest over the rollout), terminal\n"
                        "(its value at the end) or latent (the --model's embedding distance of the last frame\n"
                        "to the goal image: true dynamics with the model's cost)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also run random/straight/expert on the same pairs (default: on)")
    p.add_argument("--planner", default="cem", choices=sorted(PLANNERS))
    p.add_argument("--num-samples", type=int, help="samples per iteration (default: the planner's, 300 for CEM)")
    p.add_argument("--topk", type=int, help="elites (CEM, iCEM; default 30)")
    p.add_argument("--iterations", type=int, help="planner iterations (default: 10 for tworoom, 30 for pusht)")
    p.add_argument("--init-std", type=float, default=1.0, help="initial sampling std in the planner's action space: z-scored\n"
                   "actions for a model, raw actions in [-1, 1] for --policy oracle")
    p.add_argument("--horizon", type=int, default=5, help="action blocks per plan")
    p.add_argument("--receding-horizon", type=int, help="blocks executed before replanning (default: horizon)")
    p.add_argument("--replan-every", type=int, help="env steps executed before replanning, instead of\n"
                   "--receding-horizon blocks; below the frameskip it replans inside a block (step-level MPC)")
    p.add_argument("--hold-actions", action="store_true",
                   help="search one action per block, held for its frameskip steps (a 2-d search per block\n"
                        "for Push-T and Two-Room instead of 10-d white noise over its steps)")
    p.add_argument("--cost", default="terminal", choices=COSTS,
                   help="the latent cost over a plan's predicted blocks: the last one's distance to the goal\n"
                        "(paper), their sum, their minimum (the goal reached at any block), or that minimum\n"
                        "plus the last one's (reach the goal, then stay)")
    p.add_argument("--warm-start", action="store_true", help="start each plan from the rest of the previous one")
    p.add_argument("--deadline", action="store_true",
                   help="shrink plans toward the protocol's budget: each plan ends at the goal by the last step "
                        "(shrinking-horizon MPC; the paper plans a full horizon every time)")
    p.add_argument("--compile", action="store_true", help="torch.compile the rollout")
    p.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile mode of the rollout (implies --compile); reduce-overhead = CUDA graphs")
    p.add_argument("--amp", action="store_true", help="plan under bfloat16 autocast (CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairs and the planner")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--out", type=Path, help="results JSON (default runs/plan/<run name>-<protocol>-seed<seed>.json; "
                   "for a baseline runs/plan/<env>-<protocol>-<policy>-seed<seed>.json)")
    p.add_argument("--video", action="store_true", help="write one GIF per episode next to the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# What each kind of policy reads. The baselines that run beside the model read none of these.
PLANNER_OPTIONS = ("planner", "receding_horizon", "replan_every", "hold_actions", "cost", "warm_start", "compile",
                   "compile_mode", "amp")  # the model's MPC only
# the model's MPC and the oracle
SEARCH_OPTIONS = ("num_samples", "topk", "iterations", "init_std", "horizon", "deadline")


def ignored_options(parser: argparse.ArgumentParser, args) -> list[str]:
    """The options given a value other than their default that `--policy` would not read."""
    if args.policy == "model":
        unused = ("oracle_cost",)
    elif args.policy == "oracle":
        unused = PLANNER_OPTIONS
    else:
        unused = PLANNER_OPTIONS + SEARCH_OPTIONS + ("oracle_cost",)
    return [f"--{k.replace('_', '-')}" for k in unused if getattr(args, k) != parser.get_default(k)]


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Reject option values no run can use before any work starts (argparse's usage error, exit 2)."""
    ignored = ignored_options(parser, args)
    if ignored:
        uses = {"model": "--oracle-cost sets the cost of --policy oracle",
                "oracle": "the oracle plans with CEM in the env's physics and reads --num-samples, --topk, "
                          "--iterations, --init-std, --horizon, --deadline and --oracle-cost"}
        parser.error(f"--policy {args.policy} does not use {', '.join(ignored)}: "
                     f"{uses.get(args.policy, 'a baseline takes no planning options')}")
    if args.warm_start and args.replan_every is None and args.receding_horizon in (None, args.horizon):
        parser.error("--warm-start starts each plan from the unexecuted rest of the previous one, but with "
                     "--receding-horizon equal to --horizon (the default) every plan runs to its end and leaves no "
                     "rest: replan earlier (--receding-horizon or --replan-every), or drop --warm-start")
    for flag in ("num_episodes", "num_samples", "iterations", "horizon", "receding_horizon", "replan_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.topk is not None and args.topk < 2:
        parser.error(f"--topk must be at least 2 (the refitted std needs two elites), got {args.topk}")
    if not (math.isfinite(args.init_std) and args.init_std > 0):
        parser.error(f"--init-std must be a positive number, got {args.init_std}")
    if args.receding_horizon is not None and args.replan_every is not None:
        parser.error("--receding-horizon and --replan-every both say when to replan: give one of them "
                     "(--replan-every N counts env steps, --receding-horizon N counts blocks)")
    if args.receding_horizon is not None and args.receding_horizon > args.horizon:
        parser.error(f"--receding-horizon ({args.receding_horizon}) executes blocks of a plan of --horizon "
                     f"{args.horizon} blocks: it can be at most {args.horizon}")
    uses_topk = args.policy == "oracle" or args.planner in ("cem", "icem")
    if args.topk is not None and not uses_topk:
        parser.error(f"--topk sets the elites of cem and icem (and the oracle's CEM); the {args.planner} planner "
                     "keeps none: drop --topk or pick --planner cem or icem")
    if uses_topk and args.topk is None and args.num_samples is not None:
        default = (10 if args.policy == "oracle"
                   else inspect.signature(PLANNERS[args.planner]).parameters["topk"].default)
        if args.num_samples < default:
            parser.error(f"--num-samples {args.num_samples} is below the {default} elites the planner keeps by "
                         f"default: give --topk too (2 to {args.num_samples})")
    if args.topk is not None and args.num_samples is not None and args.topk > args.num_samples:
        parser.error(f"--topk ({args.topk}) elites are chosen among --num-samples ({args.num_samples}): "
                     "it can be at most that")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.model is not None and len({os.path.abspath(find_model(m)) for m in args.model}) < len(args.model):
        parser.error("the same model is given twice to --model: an ensemble takes different models")
    if args.out is not None:  # the default path, named after the env and protocol, is checked once they are known
        try:
            check_writable(args.out)
        except ValueError as e:
            parser.error(f"--out: {e}")


def pick_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def model_info(path: Path) -> dict:
    """The model's `extra` record (config.json's, or rebuilt from a training .ckpt) and the sha256 of its weights."""
    weights = weights_file(path)
    return {"extra": model_extra(path), "sha256": sha256_file(weights) if weights.is_file() else None}


def check_members(paths: list[Path], infos: list[dict]) -> None:
    """The models of an ensemble must come from the same env and dataset split (the pairs are drawn from it)."""
    def where(extra: dict) -> tuple:
        data = extra.get("data") or {}
        return ((extra.get("dataset") or {}).get("env"), data.get("path"), data.get("val_fraction"),
                data.get("split_seed"))
    first = where(infos[0]["extra"])
    for path, info in zip(paths[1:], infos[1:]):
        if where(info["extra"]) != first:
            raise SystemExit(f"error: ensemble mismatch: {path} was trained on (env, data, val_fraction, split_seed) "
                             f"= {where(info['extra'])}, {paths[0]} on {first}; an ensemble takes only models "
                             "trained on the same data")


def model_record(paths: list[Path] | None, infos: list[dict], model) -> dict:
    """What the results JSON says of the model: path, weights sha256 and config (lists for an ensemble)."""
    if not paths:
        return {"path": None, "sha256": None, "config": None}
    if len(paths) == 1:
        return {"path": str(paths[0]), "sha256": infos[0]["sha256"], "config": model.config.to_dict()}
    return {"path": [str(p) for p in paths], "sha256": [i["sha256"] for i in infos],
            "config": [c.to_dict() for c in model.members_config], "ensemble": len(paths)}


def resolve(args, extra: dict, heldout_protocol: bool = False) -> tuple[str, Path | None, dict]:
    """Env name, dataset path and split settings, checked against the model's training data.
    The path is None only for a held-out protocol without --data (its own dataset is used)."""
    trained = (extra.get("dataset") or {}).get("env")
    env_name = args.env or trained
    if env_name is None and args.model is None:
        raise SystemExit(f"error: --policy {args.policy} without --model: pass --env and --data to say which "
                         "env and dataset the pairs come from")
    if env_name is None:
        raise SystemExit("error: pass --env: the model does not record its training env")
    if trained and args.env and args.env != trained:
        raise SystemExit(f"error: env/model mismatch: the model was trained on {trained!r} data, --env is {args.env!r}")
    data = extra.get("data") or {}
    path = args.data or (recorded_data_path(args.model[0], data.get("path")) if args.model else None)
    if path is None and not heldout_protocol:  # a held-out protocol has its own dataset (`heldout`)
        if args.model is None:
            raise SystemExit(f"error: --policy {args.policy} without --model: pass --data, the dataset the pairs "
                             "come from")
        raise SystemExit("error: pass --data: the model does not record its training dataset")
    split = {"val_fraction": float(data.get("val_fraction", 0.1)), "split_seed": int(data.get("split_seed", 0))}
    return env_name, path, split


def heldout(protocol, env_name: str, resolution: int | None) -> Path:
    spec = dict(protocol.dataset)
    if spec.pop("env") != env_name:
        raise SystemExit(f"error: protocol {protocol.name} is for {protocol.dataset['env']}, not {env_name}")
    if resolution is None:
        raise SystemExit(f"error: pass --data (or --model) to choose the resolution of {protocol.name}'s dataset")
    path = Path(heldout_path(protocol, resolution))
    if not path.exists():
        from leworld.data.collect import collect

        print(f"{path} does not exist: collecting the held-out set of {protocol.name} ({spec})")
        collect(env_name, resolution=resolution, out=path, **spec)
    return path


def check_heldout_data(store: EpisodeStore, protocol) -> None:
    """A held-out protocol given --data must get its own dataset (however generated, wherever
    kept): the same env, policy, noise, seed, episode count and env settings. Otherwise its name
    would be printed beside numbers measured on other episodes."""
    spec = dict(protocol.dataset)
    meta = store.metadata
    want = {"env": spec.pop("env"), **{k: spec[k] for k in ("policy", "noise", "seed", "episodes", "steps") if k in spec}}
    want.update({f"env_params.{k}": v for k, v in (spec.get("env_kwargs") or {}).items()})
    have = {k: (meta.get("env_params") or {}).get(k.split(".", 1)[1]) if k.startswith("env_params.") else meta.get(k)
            for k in want}
    differ = [f"{k} {have[k]!r} (the protocol's: {v!r})" for k, v in want.items() if have[k] != v]
    if differ:
        raise SystemExit(f"error: {store.path} is not the held-out set of {protocol.name}: {', '.join(differ)}. "
                         f"Leave out --data: it is generated once at {heldout_path(protocol, store.resolution)}; "
                         "or pick a protocol that draws from the model's data (paper-v3)")


def check_dataset(store: EpisodeStore, env_name: str, model) -> None:
    data_env = store.metadata.get("env")
    if data_env != env_name:
        raise SystemExit(f"error: env/dataset mismatch: {store.path} holds {data_env!r} episodes, not {env_name!r}")
    if model is None:
        return
    c = model.config
    if store.resolution != c.image_size or store.action_dim != c.action_dim:
        raise SystemExit(f"error: env/model mismatch: {store.path} has {store.resolution} px frames and "
                         f"{store.action_dim}-d actions; the model expects {c.image_size} px and {c.action_dim}-d "
                         "actions. Evaluate on data collected at the model's resolution.")


# What a dataset's metadata says it holds; a model records its training data's metadata.
_DATASET_KEYS = ("env", "env_params", "policy", "noise", "seed", "chunk_size", "resolution", "episodes", "steps")


def check_trained_data(store: EpisodeStore, extra: dict, explicit: bool) -> None:
    """A protocol whose pairs come from a dataset's validation episodes must read the dataset the model
    trained on (or one independent of it): the validation split of another file of the same settings
    but another size holds episodes the model trained on. Compared on what the model's record has, so
    models that record less are compared on less. A differing file the user named is used with a note."""
    recorded = extra.get("dataset") or {}
    differ = [f"{k} {store.metadata.get(k)!r} (the model's: {recorded[k]!r})" for k in _DATASET_KEYS
              if k in recorded and store.metadata.get(k) != recorded[k]]
    if not differ:
        return
    if explicit:
        print(f"note: {store.path} is not the dataset the model trained on ({', '.join(differ)}); its validation "
              "episodes are held out from the model's training only if its episodes are not the model's "
              "(another seed or policy)", file=sys.stderr)
        return
    raise SystemExit(f"error: {store.path} is not the dataset the model trained on: {', '.join(differ)}. Its "
                     "validation episodes may be episodes the model trained on: generate the model's dataset again "
                     "with its settings, or pass --data (the model's training dataset, or one independent of it)")


def make_env(store: EpisodeStore, env_name: str, n: int):
    params = {k: v for k, v in store.metadata.get("env_params", {}).items() if k not in ("num_envs", "resolution", "seed")}
    return envs.make_batch(env_name, n, resolution=store.resolution, seed=0, **params)


def planner_kwargs(args, env_name: str) -> dict:
    iterations = DEFAULT_ITERATIONS[env_name] if args.iterations is None else args.iterations
    kw = {"seed": args.seed, "iterations": iterations, "init_std": args.init_std}
    if args.num_samples is not None:
        kw["num_samples"] = args.num_samples
    if args.topk is not None:
        if args.planner not in ("cem", "icem"):
            raise SystemExit(f"error: --topk applies to cem and icem, not {args.planner}")
        kw["topk"] = args.topk
    return kw


def run_policy(name: str, policy, env, pairs, budget: int, record: bool, progress: bool) -> dict:
    result = run_episodes(env, policy, pairs, budget, record=record, progress=progress, desc=name)
    row = {"policy": name, **summarize(result.success, result.already),
           # env steps per second of the whole evaluation (planning included), and inside env.step alone
           "seconds": result.seconds, "env_steps_per_s": result.env_steps / max(result.seconds, 1e-9),
           "env_only_steps_per_s": result.env_steps / max(result.env_seconds, 1e-9),
           "per_episode": [{"success": bool(s), "already": bool(a), "first_success_step": int(f)}
                           for s, a, f in zip(result.success, result.already, result.first_success)]}
    if result.final_errors is not None:  # how far from the goal each episode ended, and came closest
        for i, episode in enumerate(row["per_episode"]):
            episode["final_errors"] = {k: round(float(v[i]), 3) for k, v in result.final_errors.items()}
            episode["min_errors"] = {k: round(float(v[i]), 3) for k, v in result.min_errors.items()}
            episode["start_errors"] = {k: round(float(v[i]), 3) for k, v in result.start_errors.items()}
        row["median_final_errors"] = {k: float(np.median(v)) for k, v in result.final_errors.items()}
        row["median_min_errors"] = {k: float(np.median(v)) for k, v in result.min_errors.items()}
        row["median_start_errors"] = {k: float(np.median(v)) for k, v in result.start_errors.items()}
    if isinstance(policy, MPCPolicy):
        ms = np.asarray(policy.plan_seconds) * 1000.0
        per_plan = ms / len(pairs.episode)  # one call plans every env of the batch
        row["planning"] = {"calls": len(ms), "plans": policy.plans, "call_ms_mean": float(ms.mean()),
                           "ms_per_plan_mean": float(per_plan.mean()), "ms_per_plan_median": float(np.median(per_plan)),
                           "batch": len(pairs.episode)}
    elif isinstance(policy, SimulatorOracle):  # one call plans the envs not yet successful, one after another
        ms = np.asarray(policy.plan_seconds) * 1000.0
        per_plan = ms / np.maximum(np.asarray(policy.plan_rows), 1)
        row["planning"] = {"calls": len(ms), "plans": policy.plans, "call_ms_mean": float(ms.mean()) if len(ms) else 0.0,
                           "ms_per_plan_mean": float(ms.sum() / max(policy.plans, 1)),
                           "ms_per_plan_median": float(np.median(per_plan)) if len(ms) else 0.0}
    return row, result


def print_table(protocol, rows: list[dict], seed: int, out: Path) -> None:
    print(f"\nprotocol {protocol.name} v{protocol.version}: {protocol.description}")
    print(f"  {protocol.num_episodes} episodes, goal +{protocol.goal_offset} steps, budget {protocol.budget}, "
          f"split {protocol.split}, seed {seed}")
    head = f"{'policy':<16}{'success':>9}  {'95% CI':<15}{'w/o solved starts':>19}  {'ms/plan':>9}{'median':>8}{'steps/s':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        lo, hi = r["ci95"]
        ex = r["excluding_already"]
        plan = r.get("planning")
        ms = f"{plan['ms_per_plan_mean']:9.1f}{plan['ms_per_plan_median']:8.1f}" if plan else f"{'-':>9}{'-':>8}"
        print(f"{r['policy']:<16}{100 * r['rate']:8.1f}%  [{100 * lo:4.1f}, {100 * hi:5.1f}]  "
              f"{100 * ex['rate']:9.1f}% (n={ex['episodes']:>3}) {ms}{r['env_steps_per_s']:9.0f}")
    print(f"already successful at the start: {rows[0]['already_successful']} of {rows[0]['episodes']}")
    if all("median_final_errors" in r for r in rows):
        keys = list(rows[0]["median_final_errors"])
        print(f"\nmedian distance to the goal, at the end / closest over the episode")
        print(f"{'policy':<16}" + "".join(f"{k:>14}" for k in keys))
        for r in rows:
            end, best = r["median_final_errors"], r["median_min_errors"]
            print(f"{r['policy']:<16}" + "".join(f"{f'{end[k]:.1f} / {best[k]:.1f}':>14}" for k in keys))
        start = rows[0].get("median_start_errors")
        if start:  # the same pairs for every policy: how far the goals were to begin with
            print(f"{'(at the start)':<16}" + "".join(f"{start[k]:>14.1f}" for k in keys))
    print(f"results: {out}")


def default_out_name(args, env_name: str, protocol_name: str) -> str:
    """The results file's name when --out is not given: one per model (an ensemble joins its
    members' names with `+`), protocol and seed, so planning another model does not overwrite it."""
    if args.policy == "oracle" and args.oracle_cost != "margin":  # one file per cost (and per model for latent)
        members = "".join(f"-{model_name(m)}" for m in args.model or [])
        return f"{env_name}-{protocol_name}-oracle-{args.oracle_cost}{members}-seed{args.seed}.json"
    if args.policy != "model":
        return f"{env_name}-{protocol_name}-{args.policy}-seed{args.seed}.json"
    members = "+".join(model_name(m) for m in args.model)
    return f"{members}-{protocol_name}-seed{args.seed}.json"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    keep_freed_memory()  # faster CPU rollouts on Linux (leworld/allocator.py)
    t_start = time.perf_counter()
    if args.policy == "model" and args.model is None:
        raise SystemExit("error: --model is required with --policy model (or pick a baseline with --policy)")
    model, info, infos = None, {"extra": {}, "sha256": None}, []
    device = pick_device(args.device)
    if args.model is not None:
        args.model = [find_model(m) for m in args.model]
        for path in args.model:
            if not path.exists():
                preset = Path("configs") / f"{path.name}.yaml"  # runs/<name> is trained by configs/<name>.yaml
                config = preset if preset.is_file() else "configs/<preset>.yaml"
                raise SystemExit(f"error: no model at {path}: train one with `python train.py fit --config "
                                 f"{config}`, then pass its run directory (runs/<name>) or a "
                                 "runs/<name>/version_N/model directory")
        try:
            models = [load_model(path, map_location=device) for path in args.model]
            infos = [model_info(path) for path in args.model]
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        info = infos[0]
        for path, member in zip(args.model, infos):  # a run directory resolves to its newest export: say which
            print(f"model: {path} (sha256 {str(member['sha256'])[:12]})")
        if len(models) == 1:
            model = models[0]
        else:
            check_members(args.model, infos)
            try:
                model = ModelEnsemble(models)
            except ValueError as e:
                raise SystemExit(f"error: {e}")
    protocol = get_protocol(args.protocol)
    if args.num_episodes is not None:
        protocol = protocol.replace(num_episodes=args.num_episodes)
    env_name, data_path, split = resolve(args, info["extra"], heldout_protocol=protocol.dataset is not None)
    if protocol.env is not None and protocol.env != env_name:
        raise SystemExit(f"error: protocol {protocol.name} is for {protocol.env}, not {env_name}: choose one of "
                         f"{', '.join(n for n, p in PROTOCOLS.items() if p.env in (None, env_name))}")
    if protocol.dataset is not None and args.data is None:  # a held-out set: generate it once
        data_path = heldout(protocol, env_name, model.config.image_size if model is not None else None)
    try:
        store = EpisodeStore(data_path)
    except FileNotFoundError:
        raise SystemExit(f"error: dataset {data_path} does not exist: generate it (the training command does) or pass --data")
    except DatasetError as e:
        # the collect command it suggests, with this env and the model's frames where known
        if model is None:
            message = fill_collect_hint(str(e), env_name).replace(RESOLUTION_HINT, "<frame size in px>")
        else:
            params = (info["extra"].get("dataset") or {}).get("env_params") or {}
            message = fill_collect_hint(str(e), env_name, model.config.image_size, params.get("supersample"))
        raise SystemExit(f"error: {message}")
    check_dataset(store, env_name, model if args.policy in ("model", "oracle") else None)
    if protocol.dataset is not None and args.data is not None:
        check_heldout_data(store, protocol)
    if protocol.dataset is None and protocol.split == "val":
        check_trained_data(store, info["extra"], explicit=args.data is not None)
    if args.policy == "oracle" and env_name != "pusht":
        raise SystemExit(f"error: --policy oracle plans in Push-T's physics; it has no {env_name} version")
    if args.policy == "oracle" and (args.oracle_cost == "latent") != (model is not None):
        raise SystemExit("error: --oracle-cost latent plans with a model's cost and needs --model; the other oracle "
                         "costs use none")
    if args.amp and device.type != "cuda":
        print(f"note: --amp applies on CUDA only; planning on {device.type} in float32", file=sys.stderr)

    try:
        pairs = sample_pairs(store, protocol, seed=args.seed, **split)
    except ValueError as e:  # too few episodes or steps for the protocol's pairs
        raise SystemExit(f"error: {e}") from None
    torch.manual_seed(args.seed)

    policies = [args.policy] + ([b for b in BASELINES if b != args.policy] if args.baselines else [])
    rows, settings = [], None
    out = args.out or Path("runs/plan") / default_out_name(args, env_name, protocol.name)
    try:  # a bad --out fails now, not after the episodes have run
        check_writable(out)
    except ValueError as e:
        raise SystemExit(f"error: --out: {e}") from None
    videos = out.with_suffix("").with_name(out.stem + "_videos") if args.video else None
    videos_tmp = None  # GIFs go here first, replacing `videos` only once the results are written
    try:
        for name in policies:
            row, policy_settings, videos_tmp = run_one(name, args, model, store, env_name, protocol, pairs, device,
                                                       out, videos_tmp)
            if name == args.policy:
                settings = policy_settings
            rows.append(row)
        results = {
            "protocol": protocol.to_dict(),
            "env": env_name,
            "env_params": store.metadata.get("env_params"),
            "data": {"path": str(data_path), **split, "dataset": {k: store.metadata.get(k) for k in
                                                                  ("env", "policy", "noise", "seed", "episodes", "steps")}},
            "model": model_record(args.model, infos, model),
            "policy": args.policy,
            "planner": settings,
            "seed": args.seed,
            "pairs": pairs.to_records(),
            "results": rows,
            "videos": str(videos) if videos else None,
            "leworld_version": package_version(),
            "torch_version": torch.__version__,
            "device": describe_device(device),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "wall_seconds": time.perf_counter() - t_start,
        }
        before = recorded_model(out)
        write_json(out, results)
        replaced = replaced_model_note(out, before, results["model"]["sha256"])
        if replaced:
            print(replaced, file=sys.stderr)
        if videos_tmp is not None:  # this run's GIFs replace any earlier run's, never mix with them
            if videos.exists():
                shutil.rmtree(videos)
            os.replace(videos_tmp, videos)
            videos_tmp = None
        else:  # nor outlive the results they showed
            stale = out.with_name(out.stem + "_videos")
            if stale.is_dir() and all(re.fullmatch(r"ep\d+_(success|failure)\.gif", f.name) for f in stale.iterdir()):
                shutil.rmtree(stale)
                print(f"note: removed {stale}: its GIFs showed the episodes of the results {out} held before",
                      file=sys.stderr)
    finally:
        if videos_tmp is not None:
            shutil.rmtree(videos_tmp, ignore_errors=True)
    print_table(protocol, rows, args.seed, out)
    distinct = len(np.unique(pairs.episode))
    if distinct < len(pairs.episode):
        print(f"note: the {len(pairs.episode)} pairs come from {distinct} dataset episodes (distinct starts); pairs "
              "of one episode are not independent, so the 95% intervals are too narrow: evaluate on a dataset with "
              f"at least {len(pairs.episode)} {'validation ' if protocol.split == 'val' else ''}episodes")
    return 0


def run_one(name: str, args, model, store, env_name: str, protocol, pairs, device, out: Path, videos_tmp):
    """Run one policy (the model's MPC, a baseline or a privileged bound) on the pairs. Returns its
    results row, its settings (None for a baseline) and the folder its GIFs went to."""
    settings = None
    try:
        if name == "model":
            planner = make_planner(args.planner, **planner_kwargs(args, env_name))
            policy = MPCPolicy(model, planner, args.horizon, args.receding_horizon, args.cost,
                               warm_start=args.warm_start, compile=args.compile, amp=args.amp, device=device,
                               seed=args.seed, compile_mode=args.compile_mode,
                               deadline=protocol.budget if args.deadline else None, replan_every=args.replan_every,
                               hold_actions=args.hold_actions)
            settings, label = policy.settings(), f"model ({args.planner})"
        elif name == "replay":
            steps = pairs.goal - pairs.start  # (N,), the protocol's goal offset
            at = store.episode_offset[pairs.episode][:, None] + pairs.start[:, None] + np.arange(steps.max())
            actions = store.read("action", at.ravel()).reshape(len(at), steps.max(), -1)
            policy, label = ReplayBaseline(actions), name
        elif name == "oracle":
            policy = SimulatorOracle(100 if args.num_samples is None else args.num_samples,
                                     10 if args.topk is None else args.topk,
                                     5 if args.iterations is None else args.iterations, args.init_std,
                                     args.horizon, model.config.frameskip if model is not None else 5,
                                     protocol.budget if args.deadline else None, seed=args.seed,
                                     cost=args.oracle_cost, model=model)
            settings, label = policy.settings(), name
        else:
            policy, label = make_baseline(name, env_name, seed=args.seed), name
    except ValueError as e:  # a planner setting that does not fit the others (e.g. --topk above the samples)
        raise SystemExit(f"error: {name}: {e}") from None
    record = args.video and name == args.policy
    row, result = run_policy(label, policy, make_env(store, env_name, protocol.num_episodes), pairs,
                             protocol.budget, record, not args.no_progress)
    if record:
        from leworld.viz import write_episode_gif

        out.parent.mkdir(parents=True, exist_ok=True)
        videos_tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.stem}_videos."))
        os.chmod(videos_tmp, 0o755)  # mkdtemp makes it private; the videos are shared like the results (0o644)
        for i in range(protocol.num_episodes):
            tag = "success" if result.success[i] else "failure"
            write_episode_gif(videos_tmp / f"ep{i:03d}_{tag}.gif", result.frames[i], result.goal_frames[i])
    return row, settings, videos_tmp


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: a line, not the traceback of wherever planning was
        print("\ninterrupted: no results file was written (one is written once every policy has run)",
              file=sys.stderr)
        sys.exit(130)
