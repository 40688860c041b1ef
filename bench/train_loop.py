"""Training rate of the real Lightning loop (`Trainer.fit` on `LeWMModule`), and its host syncs.

Example:
    python bench/train_loop.py --config configs/tworoom_tiny.yaml --steps 20 --warmup 5
    python bench/train_loop.py --config configs/tworoom.yaml --steps 60 --warmup 20 --count-syncs   # on a GPU

`bench/train_throughput.py` times the bare training step; this runs the same step through the
Trainer, with everything `train.py` adds around it: logging (every `--log-every` steps, as the
configs), the learning-rate schedule, gradient clipping, the NaN check and the progress bar.
The clips come from one synthetic batch already on the device, so the difference between the
two numbers is the loop's own cost, not the data loader's. With `--data PATH` the clips come
from that HDF5 store through `LeWMDataModule` instead, to measure the loader as well.

`--count-syncs` (CUDA) turns on torch's sync debug mode and counts the host-device syncs of
each timed step: a training step should read nothing back except on logging steps.
Prints one line and, with --json, appends the result as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import lightning as L
import torch
import yaml

from leworld.allocator import keep_freed_memory
from leworld.device import describe_device, resolve_device, synchronize
from leworld.model import LeWMConfig
from leworld.module import LeWMModule


class OneBatch(torch.utils.data.IterableDataset):
    """The same batch forever (already on its device: Lightning moves nothing)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class Clock(L.Callback):
    """Wall time of the steps after `warmup`, with the device synchronised at both ends, and the
    host-device syncs of each timed step (from one step's start to the next: the logging and the
    progress bar that Lightning runs after a step's hooks belong to that step)."""

    def __init__(self, warmup: int, count_syncs: bool):
        self.warmup, self.count_syncs = warmup, count_syncs
        self.start = self.end = None
        self.syncs: list[int] = []
        self._context = self._records = None
        self._seen = 0

    def _sync(self, module):
        synchronize(module.device)

    def _count(self):
        if self._records is not None:
            total = sum("synchroniz" in str(w.message) for w in self._records)
            self.syncs.append(total - self._seen)
            self._seen = total

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self._sync(module)
            self.start = time.perf_counter()
            if self.count_syncs:
                self._context = warnings.catch_warnings(record=True)
                self._records = self._context.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
        elif trainer.global_step > self.warmup:
            self._count()

    def on_train_end(self, trainer, module):
        self._count()
        if self._context is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._context.__exit__(None, None, None)
        self._sync(module)
        self.end = time.perf_counter()


def run(config: str, steps: int, warmup: int, device: str, batch_size: int | None = None, log_every: int | None = None,
        compile: bool = False, data: str | None = None, count_syncs: bool = False, workers: int = 4,
        root: str = "bench/out") -> dict:
    dev = resolve_device(device)  # train where the batch already is: Lightning then moves nothing
    device = str(dev)
    settings = yaml.safe_load(open(config))
    module_args = dict(settings["model"])
    arch = module_args.pop("model")
    data_args = settings["data"]
    batch_size = batch_size or data_args["batch_size"]
    log_every = log_every or settings["trainer"].get("log_every_n_steps", 50)
    module = LeWMModule(LeWMConfig(**arch), **{**module_args, "compile": compile})
    cfg, T = module.config, data_args["num_frames"]
    if data:
        from leworld.data.datamodule import LeWMDataModule
        loader = LeWMDataModule(data, num_frames=T, frameskip=data_args["frameskip"], batch_size=batch_size,
                                num_workers=workers)
    else:
        g = torch.Generator().manual_seed(0)
        batch = {"pixels": torch.randint(0, 256, (batch_size, T, cfg.image_size, cfg.image_size, 3), generator=g,
                                         dtype=torch.uint8).to(device),
                 "action": torch.randn(batch_size, T - 1, cfg.action_block_dim, generator=g).to(device)}
        loader = torch.utils.data.DataLoader(OneBatch(batch), batch_size=None)
    cuda = device.startswith("cuda")
    clock = Clock(warmup, count_syncs and cuda)
    trainer = L.Trainer(accelerator={"cuda": "gpu", "mps": "mps"}.get(dev.type, "cpu"),
                        devices=[dev.index or 0] if dev.type == "cuda" else 1, max_steps=warmup + steps,
                        precision="bf16-mixed" if cuda else "32-true", gradient_clip_val=1.0,
                        log_every_n_steps=log_every, logger=L.pytorch.loggers.CSVLogger(root, name="train_loop"),
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_model_summary=False, callbacks=[clock])
    if data:
        trainer.fit(module, datamodule=loader)
    else:
        trainer.fit(module, train_dataloaders=loader)
    seconds = clock.end - clock.start
    result = {"config": config, "device": describe_device(dev), "data": data or "synthetic",
              "compile": compile, "batch_size": batch_size, "clip_frames": T, "log_every_n_steps": log_every,
              "steps": steps, "ms_per_step": round(1000 * seconds / steps, 2),
              "clips_per_s": round(batch_size * steps / seconds, 1), "torch": torch.__version__}
    if clock.syncs:
        logged = [s for i, s in enumerate(clock.syncs) if (warmup + i + 1) % log_every == 0]
        plain = [s for i, s in enumerate(clock.syncs) if (warmup + i + 1) % log_every != 0]
        result["syncs_per_step"] = round(sum(plain) / max(1, len(plain)), 2)
        result["syncs_per_logging_step"] = round(sum(logged) / max(1, len(logged)), 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tworoom_tiny.yaml", help="training config YAML")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    p.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    p.add_argument("--log-every", type=int, default=None, help="log_every_n_steps (default: the config's)")
    p.add_argument("--compile", action="store_true", help="train.py's --model.compile true (the parts, in place)")
    p.add_argument("--data", default=None, help="read clips from this HDF5 store instead of one synthetic batch")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers with --data")
    p.add_argument("--count-syncs", action="store_true", help="count host-device syncs per step (CUDA only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="append the result as a JSON line to this file")
    p.add_argument("--root", default="bench/out", help="where the run's CSV log and exported model go")
    a = p.parse_args()
    keep_freed_memory()  # as train.py and plan.py do (leworld/allocator.py)
    if a.steps < 1 or a.warmup < 1:
        p.error("--steps and --warmup must be at least 1")
    try:
        a.device = str(resolve_device(a.device))
    except ValueError as e:
        p.error(f"--device: {e}")
    result = run(a.config, a.steps, a.warmup, a.device, a.batch_size, a.log_every, a.compile, a.data, a.count_syncs,
                 a.workers, a.root)
    print(json.dumps(result))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
