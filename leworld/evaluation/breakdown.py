"""Success split by how far each goal was at the start, from a `plan.py` results JSON.

Example:
    python -m leworld.evaluation.breakdown runs/plan/pusht_tiny-paper-v3-seed0.json --split angle_deg:20

A protocol's pairs mix easy and hard goals. `plan.py` records, per episode, the env's goal errors
at the start (`start_errors`: Two-Room `agent_px`; Push-T `pose_px`, `agent_px`, `block_px`,
`angle_deg`). This splits the pairs at a threshold of one of them, the same pairs for every policy
in the file, and prints each policy's success on both groups with 95% Wilson intervals. For
Push-T, `--split angle_deg:20` separates the goals that need the block turned by more than the
success test's 20 degrees from those that do not. `--out` writes the split as JSON.

It also says how each policy's failures end on the same quantity (`final_errors`): how many end
above the threshold, and how many end further from the goal than they started (for Push-T's
`angle_deg`: the block was turned the wrong way, or pushed without turning it back). With
several files it adds the counts over all of them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from leworld.evaluation.evaluate import wilson_interval


def parse_split(text: str) -> tuple[str, float]:
    """'angle_deg:20' -> ('angle_deg', 20.0), with a clear error for anything else."""
    key, sep, value = text.partition(":")
    try:
        threshold = float(value)
    except ValueError:
        threshold = float("nan")
    if not sep or not key or not np.isfinite(threshold):
        raise ValueError(f"--split must be KEY:THRESHOLD, e.g. angle_deg:20, got {text!r}")
    return key, threshold


def breakdown(results: dict, key: str, threshold: float) -> dict:
    """Per policy of a results JSON, success on the pairs whose start error `key` is <= / > `threshold`.

    Returns {"key", "threshold", "pairs": {"at_most": n, "above": n}, "policies": [{"policy",
    "at_most": {...}, "above": {...}}]}, each group with episodes, successes, rate and ci95.
    """
    rows = check_results(results)
    starts = None
    out = []
    for row in rows:
        episodes = row.get("per_episode") or []
        if not episodes or any("start_errors" not in e for e in episodes):
            raise ValueError(f"policy {row.get('policy')!r} has no per-episode start_errors: rerun plan.py "
                             f"(files written before start_errors was recorded lack them)")
        available = sorted(episodes[0]["start_errors"])
        if key not in available:
            raise ValueError(f"no start error named {key!r}; this file has {available}")
        lacking = [i for i, e in enumerate(episodes) if key not in e["start_errors"]]
        if lacking:
            raise ValueError(f"policy {row.get('policy')!r}: episodes {lacking[:5]} have no start_errors[{key!r}] while "
                             "episode 0 has it; the file was edited or joined from other runs: rerun plan.py")
        s = np.array([e["start_errors"][key] for e in episodes], dtype=float)
        if starts is not None and (len(s) != len(starts) or not np.allclose(s, starts)):
            raise ValueError("the policies of this file were not run on the same pairs")
        starts = s
        success = np.array([e["success"] for e in episodes], dtype=bool)
        groups = {}
        for name, mask in (("at_most", s <= threshold), ("above", s > threshold)):
            k, n = int(success[mask].sum()), int(mask.sum())
            groups[name] = {"episodes": n, "successes": k, "rate": k / n if n else float("nan"),
                            "ci95": wilson_interval(k, n)}
        out.append({"policy": row.get("policy"), **groups})
    return {"key": key, "threshold": threshold,
            "pairs": {"at_most": int((starts <= threshold).sum()), "above": int((starts > threshold).sum())},
            "policies": out}


def check_results(results) -> list[dict]:
    """The policy rows of a plan.py results JSON, checked to have what a breakdown reads: a
    `per_episode` list of records with `success`. ValueError names what is missing."""
    hint = "is it a plan.py results JSON?"
    if not isinstance(results, dict):
        raise ValueError(f"it holds a JSON {type(results).__name__}, not an object: {hint}")
    rows = results.get("results")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"the results file has no policy rows under 'results': {hint}")
    for row in rows:
        episodes = row.get("per_episode")
        if not isinstance(episodes, list) or not all(isinstance(e, dict) and "success" in e for e in episodes):
            raise ValueError(f"policy {row.get('policy')!r} has no per_episode records with 'success': {hint}")
    return rows


def failures(results: dict, key: str, threshold: float) -> list[dict]:
    """Per policy, how its failed episodes end on `key`: [{"policy", "failures", "end_above",
    "end_further"}], with end_above counting final errors > `threshold` and end_further those
    whose final error is larger than the start error."""
    out = []
    for row in check_results(results):
        failed = [e for e in row.get("per_episode") or [] if not e["success"]]
        for field in ("start_errors", "final_errors"):
            if any(key not in (e.get(field) or {}) for e in failed):
                raise ValueError(f"policy {row.get('policy')!r} has no per-episode {field}[{key!r}]: rerun plan.py")
        end = np.array([e["final_errors"][key] for e in failed], dtype=float)
        start = np.array([e["start_errors"][key] for e in failed], dtype=float)
        out.append({"policy": row.get("policy"), "failures": len(failed),
                    "end_above": int((end > threshold).sum()), "end_further": int((end > start).sum())})
    return out


def add_failures(counts: list[list[dict]]) -> list[dict]:
    """Sum `failures` rows of several files, policy by policy (the files must list the same policies)."""
    names = [r["policy"] for r in counts[0]]
    if any([r["policy"] for r in c] != names for c in counts):
        raise ValueError("the files do not list the same policies: give results of the same kind")
    return [{"policy": name, **{k: sum(c[i][k] for c in counts) for k in ("failures", "end_above", "end_further")}}
            for i, name in enumerate(names)]


def print_failures(rows: list[dict], key: str, threshold: float) -> None:
    head = f"{'policy':<16}{'failures':>10}{f'end {key} > {threshold:g}':>24}{'end further than start':>24}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['policy']:<16}{r['failures']:>10}{r['end_above']:>24}{r['end_further']:>24}")


def print_breakdown(split: dict) -> None:
    key, t = split["key"], split["threshold"]
    n_low, n_high = split["pairs"]["at_most"], split["pairs"]["above"]
    print(f"pairs by start {key}: {n_low} at most {t:g}, {n_high} above")
    head = f"{'policy':<16}{f'{key} <= {t:g}':>26}{f'{key} > {t:g}':>26}"
    print(head)
    print("-" * len(head))
    for p in split["policies"]:
        cells = []
        for g in ("at_most", "above"):
            r = p[g]
            if r["episodes"]:
                lo, hi = r["ci95"]
                cells.append(f"{100 * r['rate']:5.1f}% [{100 * lo:4.1f}, {100 * hi:5.1f}]")
            else:
                cells.append("-")
        print(f"{p['policy']:<16}" + "".join(f"{c:>26}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="plan.py results JSON file(s)")
    parser.add_argument("--split", required=True, help="KEY:THRESHOLD, e.g. angle_deg:20 or agent_px:100")
    parser.add_argument("--out", default=None, help="write the split(s) as JSON here")
    args = parser.parse_args(argv)
    try:
        key, threshold = parse_split(args.split)
    except ValueError as e:
        parser.error(str(e))
    if args.out:
        from leworld.results import check_writable

        try:
            check_writable(args.out)
        except ValueError as e:
            parser.error(f"--out: {e}")
    splits = []
    for path in args.results:
        p = Path(path)
        if not p.is_file():
            parser.error(f"no results file at {p}: give the JSON that plan.py printed after 'results:'")
        try:
            results = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            parser.error(f"{p} is not JSON ({e}): give the JSON that plan.py printed after 'results:'")
        try:
            split, fails = breakdown(results, key, threshold), failures(results, key, threshold)
        except ValueError as e:
            parser.error(f"{p}: {e}")
        print(f"\n{p}")
        print_breakdown(split)
        print(f"\nhow the failures end, on {key}")
        print_failures(fails, key, threshold)
        splits.append({"file": str(p), **split, "failures": fails})
    if len(splits) > 1:
        try:
            total = add_failures([s["failures"] for s in splits])
        except ValueError as e:
            parser.error(str(e))
        print(f"\nall {len(splits)} files: how the failures end, on {key}")
        print_failures(total, key, threshold)
    if args.out:
        from leworld.results import write_json

        write_json(args.out, {"splits": splits, **({"failures": total} if len(splits) > 1 else {})})
        print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
