"""Planning latency: ms per CEM plan and plans/s, one env and many envs batched, for any config.

Example:
    python bench/plan_latency.py --config configs/tworoom_tiny.yaml --batch 1 50 --iterations 10
    python bench/plan_latency.py --config configs/pusht.yaml --batch 1 50 --amp --compile-mode reduce-overhead  # GPU
    python bench/plan_latency.py --config configs/pusht.yaml --batch 1 --amp --compile --graph  # GPU: one graph per plan

A plan is one call of the planner on a `LatentProblem`: the paper setting is CEM with 300
samples, 30 elites, 30 iterations, horizon 5 blocks, from a context of `history` frames
(history 3 at paper config). The model is randomly initialised at the config's architecture
(latency does not depend on the weights); context and goal are random embeddings. Each batch
size is timed over --repeats plans after --warmup, with the device synchronised around every
plan, exactly as `MPCPolicy` times them. Prints one line per batch size; --json appends JSON lines.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch
import yaml

from leworld.allocator import keep_freed_memory
from leworld.device import describe_device, resolve_device, synchronize
from leworld.model import LeWMConfig, LeWorldModel
from leworld.planning import LatentProblem, make_planner


def sync(device: torch.device) -> None:
    synchronize(device)


def run(config: str, batch: int, planner: str, num_samples: int, topk: int, iterations: int, horizon: int,
        repeats: int, warmup: int, device: str, compile: bool, amp: bool, compile_mode: str | None = None,
        graph: bool = False, share: bool = True, profile: str | None = None) -> dict:
    arch = yaml.safe_load(open(config))["model"]["model"]
    dev = resolve_device(device)
    model = LeWorldModel(LeWMConfig(**arch)).to(dev).eval().requires_grad_(False)
    c = model.config
    g = torch.Generator(device="cpu").manual_seed(0)
    context = torch.randn(batch, c.history, c.embed_dim, generator=g).to(dev)  # (B, H, D)
    context_actions = torch.randn(batch, c.history - 1, c.action_block_dim, generator=g).to(dev)  # (B, H-1, fs*A)
    goal = torch.randn(batch, c.embed_dim, generator=g).to(dev)  # (B, D)
    if graph and (dev.type != "cuda" or planner != "cem" or compile_mode == "reduce-overhead"):
        raise SystemExit("--graph needs a CUDA device and the cem planner, and replaces reduce-overhead's graphs")
    rollout = functools.partial(model.rollout, share_context=share)
    rollout = torch.compile(rollout, dynamic=False, mode=compile_mode) if compile else rollout
    problem = LatentProblem(model, context, goal, horizon, context_actions, rollout=rollout)
    kw = {"iterations": iterations, "num_samples": num_samples}
    if planner in ("cem", "icem"):
        kw["topk"] = topk
    plan = make_planner(planner, **kw)
    gen = torch.Generator(dev).manual_seed(0)
    times = []
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda",
                              cache_enabled=not graph)
    with torch.no_grad(), autocast:
        call = (lambda: plan.plan(problem, None, gen)) if not graph else graphed_plan(plan, problem, gen, dev)
        for i in range(warmup + repeats):
            sync(dev)
            if i == warmup and dev.type == "cuda":  # the peak of the timed plans, not of compiling or capturing
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            call()
            sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        if profile:
            write_profile(call, dev, profile)
    ms = statistics.median(times) * 1000
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {"config": config, "device": describe_device(dev),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "planner": planner,
            "num_samples": num_samples, "topk": topk, "iterations": iterations, "horizon": horizon,
            "history": c.history, "batch": batch, "compile": compile, "compile_mode": compile_mode, "amp": amp and dev.type == "cuda",
            "graph": graph, "share_context": share, "call_ms_median": ms,
            "call_ms_mean": statistics.mean(times) * 1000, "ms_per_plan": ms / batch, "plans_per_s": batch / (ms / 1000),
            "peak_gib": peak, "repeats": repeats}


def graphed_plan(plan, problem, gen: torch.Generator, dev: torch.device):
    """The whole CEM plan as one CUDA graph; returns a call that draws fresh noise and replays it."""
    noise = torch.randn(plan.noise_shape(problem), generator=gen, device=dev)  # (iterations, B, S, T, A)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(3):
            plan.plan(problem, None, noise=noise)
    torch.cuda.current_stream(dev).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = plan.plan(problem, None, noise=noise)

    def call() -> torch.Tensor:
        noise.normal_(generator=gen)
        g.replay()
        return out
    return call


def write_profile(call, dev: torch.device, path: str) -> None:
    """Per-kernel device time of one plan, as a table sorted by total time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        call()
        sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=40))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tworoom.yaml", help="training config YAML (its model section)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 50], help="envs planned together")
    p.add_argument("--planner", default="cem")
    p.add_argument("--num-samples", type=int, default=300)
    p.add_argument("--topk", type=int, default=30)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--horizon", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the rollout")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode, e.g. reduce-overhead (CUDA graphs); implies --compile")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--graph", action="store_true", help="capture each whole plan as one CUDA graph (CEM, CUDA)")
    p.add_argument("--no-share", action="store_true", help="compute the observed context for every sample")
    p.add_argument("--profile", help="write one plan's per-kernel time table here (last batch size)")
    p.add_argument("--json", help="append results as JSON lines to this file")
    args = p.parse_args()
    if args.repeats < 1 or args.warmup < 0 or min(args.batch) < 1:
        p.error("--repeats and every --batch value must be at least 1, --warmup at least 0")
    try:
        args.device = str(resolve_device(args.device))
    except ValueError as e:
        p.error(f"--device: {e}")
    keep_freed_memory()  # as train.py and plan.py do (leworld/allocator.py)
    for b in args.batch:
        r = run(args.config, b, args.planner, args.num_samples, args.topk, args.iterations, args.horizon,
                args.repeats, args.warmup, args.device, args.compile or bool(args.compile_mode), args.amp,
                args.compile_mode, args.graph, not args.no_share, args.profile)
        print(f"{r['device']}: batch {b:>3}  {r['call_ms_median']:9.1f} ms per call  {r['ms_per_plan']:8.1f} ms/plan  "
              f"{r['plans_per_s']:7.1f} plans/s  (history {r['history']}, {args.planner} {args.num_samples}x"
              f"{args.iterations}, horizon {args.horizon}, compile {r['compile']}{' ' + args.compile_mode if args.compile_mode else ''}, "
              f"amp {r['amp']}, graph {args.graph}, shared context {not args.no_share})")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
