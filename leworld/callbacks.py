"""What a training run interrupted with Ctrl-C leaves behind, said in one line.

Example:
    python train.py fit --config configs/tworoom_tiny.yaml   # Ctrl-C during training prints, e.g.:
    interrupted at step 812: resume from the newest checkpoint (step 500) with
      python train.py fit --config runs/tworoom_tiny/version_0/config.yaml --ckpt_path runs/.../last.ckpt

`LeWMModule.configure_callbacks` adds `InterruptNote` to every Trainer that fits the module.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import lightning as L

from leworld.checkpoint import read_checkpoint


class InterruptNote(L.Callback):
    """On Ctrl-C (KeyboardInterrupt), say which checkpoint the run can resume from and how, or
    that it wrote none yet (Lightning itself only says that it shuts down).

    Only this run's checkpoints are named: those written since its fit began, or the one it
    resumed from. Runs without a logger share one checkpoint folder, where the newest file may be
    an earlier run's."""

    def __init__(self) -> None:
        self.started_ns: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # file times may be truncated to whole seconds (or two, on some file systems): a checkpoint
        # written in the first moments of the run must not look older than the run
        self.started_ns = time.time_ns() - 2_000_000_000

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt) or not trainer.is_global_zero:
            return
        step = trainer.global_step
        newest = newest_checkpoint(trainer, since_ns=self.started_ns)
        if newest is None:
            every = [c._every_n_train_steps for c in trainer.checkpoint_callbacks  # ModelCheckpoint's setting
                     if getattr(c, "_every_n_train_steps", 0)]
            when = f" (checkpoints every {min(every)} steps)" if every else ""
            print(f"\ninterrupted at step {step}: no checkpoint was written yet{when}, so nothing of this run can "
                  "be resumed", file=sys.stderr)
            return
        try:
            saved = read_checkpoint(newest).get("global_step", "?")
        except ValueError:  # unreadable: still name it
            saved = "?"
        if isinstance(saved, int) and 0 <= trainer.max_steps <= saved:  # stopped after the last step
            print(f"\ninterrupted after the last step ({saved}), before the run ended: its newest checkpoint "
                  f"{newest} loads as the trained model (plan.py --model {newest}, leworld.load_model)",
                  file=sys.stderr)
            return
        # not trainer.log_dir: that is a collective, and only rank 0 gets here
        folder = trainer.loggers[0].log_dir if trainer.loggers else trainer.default_root_dir
        config = Path(folder or trainer.default_root_dir) / "config.yaml"
        config_arg = f"--config {config}" if config.is_file() else "--config <the run's config>"
        print(f"\ninterrupted at step {step}: resume from the newest checkpoint (step {saved}) with\n"
              f"  python train.py fit {config_arg} --ckpt_path {newest}", file=sys.stderr)


def newest_checkpoint(trainer: L.Trainer, since_ns: int | None = None) -> Path | None:
    """The most recently written .ckpt of the trainer's checkpoint callbacks, or None.

    With `since_ns` (a `time.time_ns()`), only files written since then count, and the checkpoint
    the trainer resumed from (`trainer.ckpt_path`) stands for the run when it wrote none since."""
    found = []
    for callback in trainer.checkpoint_callbacks:
        folder = getattr(callback, "dirpath", None)
        if folder and Path(folder).is_dir():
            found += [p for p in Path(folder).glob("*.ckpt") if p.is_file()]
    if since_ns is not None:
        found = [p for p in found if p.stat().st_mtime_ns >= since_ns]
        resumed = getattr(trainer, "ckpt_path", None)
        if not found and resumed and os.path.isfile(resumed):
            return Path(resumed)
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None
