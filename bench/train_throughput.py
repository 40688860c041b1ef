"""Training throughput (clips/s) and peak memory of one LeWM training step, for any config.

Example:
    python bench/train_throughput.py --config configs/tworoom_tiny.yaml --steps 20
    python bench/train_throughput.py --config configs/tworoom.yaml --compile   # on a GPU

One step = exactly what `LeWMModule.training_step` does (encode, predict, SIGReg, loss)
plus backward, gradient clipping at 1.0 and a (fused on CUDA) AdamW step, on synthetic
uint8 clips already on the device, so the number measures the model, not the data loader.
bf16 autocast on CUDA (SIGReg in float32), float32 elsewhere. Prints one line per run and,
with --json, appends the result as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import yaml

from leworld.allocator import keep_freed_memory
from leworld.device import describe_device, peak_rss_gib, resolve_device, synchronize
from leworld.model import LeWMConfig
from leworld.module import LeWMModule


def load_settings(path: str) -> tuple[dict, dict, dict]:
    config = yaml.safe_load(open(path))
    model_args = dict(config["model"])
    arch = model_args.pop("model")
    return arch, model_args, config["data"]


def run(config: str, steps: int, warmup: int, batch_size: int | None, compile: bool, device: str,
        compile_mode: str | None = None, profile: str | None = None, compile_parts: bool = False) -> dict:
    device = str(resolve_device(device))  # "cuda:0", "cpu": the checks below read its name
    arch, module_args, data = load_settings(config)
    batch_size = batch_size or data["batch_size"]
    T = data["num_frames"]
    module = LeWMModule(LeWMConfig(**arch), **module_args).to(device)
    cfg = module.config
    module.train()
    fused = device.startswith("cuda")
    opt = torch.optim.AdamW(module.parameters(), lr=module.hparams.lr, weight_decay=module.hparams.weight_decay,
                            fused=fused)
    g = torch.Generator(device="cpu").manual_seed(0)
    batch = {  # (B, T, Hp, Wp, C) uint8 frames and (B, T-1, frameskip*A) raw actions, already on the device
        "pixels": torch.randint(0, 256, (batch_size, T, cfg.image_size, cfg.image_size, 3), generator=g,
                                dtype=torch.uint8).to(device),
        "action": torch.randn(batch_size, T - 1, cfg.action_block_dim, generator=g).to(device),
    }
    lam = module.hparams.lambda_sigreg
    if compile_parts:  # what `train.py --model.compile true` does: the network's parts, in place
        module.hparams.compile = compile_mode or True
        module.configure_model()
    losses = torch.compile(module.losses, mode=compile_mode) if compile and not compile_parts else module.losses
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def step():
        with autocast:
            pred_loss, reg, _ = losses(batch)
            loss = pred_loss + lam * reg
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    dev = torch.device(device)

    def sync():
        synchronize(dev)

    for _ in range(warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    if profile:  # a few more steps under the profiler: where the time goes, kernel by kernel
        from torch.profiler import ProfilerActivity, profile as profiler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profiler(activities=activities) as prof:
            for _ in range(3):
                step()
            sync()
        key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
        with open(profile, "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90))
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**30
    else:
        peak = peak_rss_gib()  # the process's peak RSS
    name = describe_device(device)
    params = sum(p.numel() for p in module.parameters())
    return {"config": config, "device": name, "batch_size": batch_size, "frames": T, "compile": compile,
            "compile_mode": compile_mode, "compile_parts": compile_parts,
            "params_M": round(params / 1e6, 3), "step_s": seconds, "clips_per_s": batch_size / seconds,
            "peak_memory_GiB": peak, "loss": float(loss.detach()), "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tworoom_tiny.yaml", help="training config YAML")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    p.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss computation as one function")
    p.add_argument("--compile-parts", action="store_true",
                   help="compile as training does (LeWMModule(compile=True)): each part of the network in place")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--coordinate-descent", action="store_true",
                   help="let inductor tune its generated kernels' launch configs (longer compile)")
    p.add_argument("--no-cudnn-sdp", action="store_true",
                   help="keep cuDNN's attention out, so scaled_dot_product_attention uses FlashAttention")
    p.add_argument("--profile", default=None, help="write a per-kernel time table of 3 extra steps to this file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="append the result as a JSON line to this file")
    p.add_argument("--return-freed-memory", action="store_true",
                   help="leave glibc's thresholds alone (freed memory goes back to the kernel), as before "
                        "leworld.allocator; to measure what keeping it saves")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    try:
        args.device = str(resolve_device(args.device))
    except ValueError as e:
        p.error(f"--device: {e}")
    kept = False if args.return_freed_memory else keep_freed_memory()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.coordinate_descent:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    r = run(args.config, args.steps, args.warmup, args.batch_size,
            args.compile or args.compile_parts or bool(args.compile_mode), args.device, args.compile_mode, args.profile,
            args.compile_parts)
    r["coordinate_descent"], r["cudnn_sdp"], r["keep_freed_memory"] = (args.coordinate_descent, not args.no_cudnn_sdp,
                                                                       kept)
    mem = "peak GPU memory" if args.device.startswith("cuda") else "peak RSS"
    print(f"{r['config']}: {r['params_M']}M params, batch {r['batch_size']}x{r['frames']} on {r['device']}"
          f"{' (compiled' + (', ' + r['compile_mode'] if r['compile_mode'] else '') + (', parts in place' if r['compile_parts'] else '') + (', coordinate descent' if args.coordinate_descent else '') + (', no cuDNN attention' if args.no_cudnn_sdp else '') + ')' if r['compile'] else ''}: {r['step_s'] * 1000:.1f} ms/step, "
          f"{r['clips_per_s']:,.1f} clips/s, {mem} {r['peak_memory_GiB']:.2f} GiB"
          f"{'' if kept else ' (freed memory returned to the kernel)'}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
