"""Train a LeWorldModel with Lightning.

Example:
    python train.py fit --config configs/tworoom_tiny.yaml

Resume, override and inspect:
    python train.py fit --config configs/tworoom_tiny.yaml --ckpt_path runs/tworoom_tiny/version_0/checkpoints/last.ckpt
    python train.py fit --config configs/tworoom_tiny.yaml --trainer.max_steps 200 --model.lambda_sigreg 0.1
    python train.py fit --config configs/tworoom_tiny.yaml --print_config

Every run writes TensorBoard logs, the resolved config, Lightning checkpoints (for resuming)
and, at the end, an exported model (`model.safetensors` + `config.json`) to
`<default_root_dir>/<name>/version_N/`; load it with `leworld.load_model(path)`.
Multi-GPU: `--trainer.devices 4 --trainer.strategy ddp` (SIGReg stays exact across processes).

A resumed run (`--ckpt_path`) trains with the settings of its config and command line, not
those saved in the checkpoint, so `--model.lambda_sigreg 0.003` switches the SIGReg weight from
the resumed step on. It prints every setting that differs from the checkpoint's, and stops
before training when one cannot apply: the architecture (`model.model.*`: the weights would not
fit), the optimiser's `lr`, `weight_decay` and `fused` (the optimiser state, learning rates
included, is restored from the checkpoint), or the data's split and clips (`data.val_fraction`,
`data.split_seed`, `data.num_frames`, `data.frameskip`: a new split would hold out episodes the
model has trained on). `data.path` may change when the file moved, but the resumed run checks
that the file holds the same dataset. To resume a run as it was:
`--config runs/NAME/version_N/config.yaml`.

An error in the input (a missing dataset, a setting no run can use, a file in the way) prints one
line that names the problem and the fix; `LEWORLD_TRACEBACK=1` shows where it was raised.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from leworld.allocator import keep_freed_memory
from leworld.checkpoint import read_checkpoint, version_number
from leworld.data.datamodule import LeWMDataModule
from leworld.data.store import DatasetError
from leworld.module import LeWMModule

# Settings restored with the optimiser's state on resume: a new value would not take effect.
FIXED_ON_RESUME = ("lr", "weight_decay", "fused")
# Data settings that define the run's validation episodes and clips: a new split would score
# episodes the model trained on as held out (and the model's history and action blocks are fixed).
DATA_FIXED_ON_RESUME = ("val_fraction", "split_seed", "num_frames", "frameskip")


def _plain(value):
    """JSON-comparable form (tuples -> lists, Namespaces -> dicts) of a config value."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    return json.loads(json.dumps(value, default=str))


def resume_differences(saved: dict, current: dict) -> dict[str, tuple]:
    """{key: (checkpoint value, config value)} for the module settings that differ, architecture
    keys as `model.<name>`; keys that only one side has are skipped (older checkpoints)."""
    diffs = {}
    for key, old in saved.items():
        if key.startswith("_") or key not in current:
            continue
        if key == "model":
            new_model = _plain(current["model"]) or {}
            for k, v in _plain(old).items():
                if k in new_model and new_model[k] != v:
                    diffs[f"model.{k}"] = (v, new_model[k])
        elif _plain(old) != _plain(current[key]):
            diffs[key] = (_plain(old), _plain(current[key]))
    return diffs


class LeWMCLI(LightningCLI):
    def _last_checkpoint(self, sub: str) -> Path:
        """`--ckpt_path last`: the last.ckpt of the newest version of this config's run
        (`<save_dir>/<name>/version_N/checkpoints/`), or `<default_root_dir>/checkpoints/` without a
        logger. Lightning itself would look in the new version folder this run is about to open, find
        nothing and train from scratch."""
        trainer = _plain(self.config[sub]["trainer"])
        root, logger = Path(trainer.get("default_root_dir") or "."), trainer.get("logger")
        if isinstance(logger, list):
            logger = logger[0] if logger else False
        if isinstance(logger, dict):
            init = logger.get("init_args") or {}
            run = Path(init.get("save_dir") or root) / str(init.get("name") or "lightning_logs")
        elif logger in (None, True):
            run = root / "lightning_logs"
        else:
            run = None
        if run is not None:
            found = sorted(run.glob("version_*/checkpoints/last.ckpt"), key=lambda p: version_number(p.parents[1]))
            where = run / "version_*" / "checkpoints"
        else:
            found = [c for c in [root / "checkpoints" / "last.ckpt"] if c.is_file()]
            where = root / "checkpoints"
        if not found:
            self.parser.error(f"--ckpt_path last: no last.ckpt in {where}: give the checkpoint file to resume "
                              "from (a run's checkpoints are in runs/<name>/version_N/checkpoints/)")
        return found[-1]

    def _parse_ckpt_path(self) -> None:
        """Resume with the config's and command line's settings (Lightning >= 2.5.4 would replace
        them with the checkpoint's, silently dropping e.g. `--model.lambda_sigreg`): print what
        differs from the checkpoint, and stop on what cannot change on resume."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path:
            return
        if ckpt_path == "last":  # Lightning would look in this run's new, empty version folder
            ckpt_path = self._last_checkpoint(sub)
            self.config[sub]["ckpt_path"] = str(ckpt_path)
            print(f"note: --ckpt_path last is {ckpt_path}, the newest run's last checkpoint", file=sys.stderr)
        elif ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):
            print(f"note: --ckpt_path {ckpt_path} is found by Lightning when training starts, so this run's "
                  "settings are not compared with that checkpoint's; give the checkpoint's file to have them "
                  "checked", file=sys.stderr)
            return
        if not Path(ckpt_path).is_file():
            self.parser.error(f"--ckpt_path {ckpt_path}: no such checkpoint file (a run's checkpoints are in "
                              "runs/<name>/version_N/checkpoints/)")
        try:
            ckpt = read_checkpoint(Path(ckpt_path))
        except ValueError as e:
            self.parser.error(str(e))
        done, max_steps = int(ckpt.get("global_step") or 0), self.config[sub]["trainer"].get("max_steps")
        if sub == "fit" and max_steps is not None and 0 <= max_steps <= done:
            self.parser.error(f"{ckpt_path} has trained {done} steps and trainer.max_steps is {max_steps}: nothing "
                              f"is left to train. Raise --trainer.max_steps to train further (e.g. --trainer.max_steps "
                              f"{done + max(max_steps, 1)})")
        diffs = resume_differences(ckpt.get("hyper_parameters") or {}, _plain(self.config[sub]["model"]))
        data = resume_differences(ckpt.get("datamodule_hyper_parameters") or {}, _plain(self.config[sub]["data"]))
        diffs.update({f"data.{k}": v for k, v in data.items()})
        if not diffs:
            return
        lines = [f"  {k}: {new!r} (the checkpoint: {old!r})" for k, (old, new) in diffs.items()]
        why = {"model.": "the architecture must match the saved weights",
               "optimiser": "lr, weight_decay and fused are restored with the optimiser's state",
               "data.": "the data's split and clips are the run's (a new split would hold out episodes the model "
                        "trained on)"}

        def kind(key: str) -> str | None:  # scoring a checkpoint (validate, test) needs only its architecture
            if key.startswith("data."):
                return "data." if sub == "fit" and key[len("data."):] in DATA_FIXED_ON_RESUME else None
            if key.startswith("model."):
                return "model."
            return "optimiser" if sub == "fit" and key in FIXED_ON_RESUME else None

        fixed = [k for k in diffs if kind(k)]
        if fixed:
            run_config = Path(ckpt_path).resolve().parent.parent / "config.yaml"
            hint = f" (the run's own: --config {run_config})" if run_config.is_file() else ""
            reasons = "; ".join(why[r] for r in why if any(kind(k) == r for k in fixed))
            self.parser.error(
                f"cannot resume {ckpt_path} with these settings:\n" + "\n".join(
                    line for k, line in zip(diffs, lines) if k in fixed) +
                f"\n{reasons}. Use the checkpoint's values{hint}, or start a new run without --ckpt_path.")
        what = ("resuming {} with settings that differ from the checkpoint's; they apply from its step on" if sub == "fit"
                else "running {} with settings that differ from those it was trained with")
        print(what.format(ckpt_path) + ":\n" + "\n".join(lines), file=sys.stderr)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is not None and config.trainer.precision is None:
            # bf16 mixed precision on GPU (SIGReg still runs in float32), plain float32 elsewhere:
            # also on a GPU machine told to train on its CPU
            accelerator = config.trainer.get("accelerator", "auto")
            on_gpu = torch.cuda.is_available() and (accelerator in ("auto", "gpu", "cuda")
                                                    or type(accelerator).__name__ == "CUDAAccelerator")
            config.trainer.precision = "bf16-mixed" if on_gpu else "32-true"
        if config is not None:  # before a dataset is generated at a size the model cannot take
            generate = _plain(config.data.get("generate")) or {}
            model = _plain(config.model.get("model")) or {}
            if generate.get("resolution") and model.get("image_size") and generate["resolution"] != model["image_size"]:
                self.parser.error(f"data.generate.resolution is {generate['resolution']} px but "
                                  f"model.model.image_size is {model['image_size']} px: make them equal")
            self._check_clips_fit_the_model(config, model)

    def _check_clips_fit_the_model(self, config, model: dict) -> None:
        """The clip settings the model must agree with, before any data is read or generated (the
        module checks them again against the dataset itself)."""
        from leworld.model import LeWMConfig

        default = LeWMConfig()
        history, frameskip = model.get("history", default.history), model.get("frameskip", default.frameskip)
        num_frames, data_frameskip = config.data.get("num_frames"), config.data.get("frameskip")
        open_loop = config.model.get("open_loop_frames") or 0
        problems = []
        if num_frames is not None and num_frames - 1 != history:
            problems.append(f"data.num_frames is {num_frames}, which trains a history of {num_frames - 1}, but "
                            f"model.model.history is {history}: set data.num_frames = model.model.history + 1")
        if data_frameskip is not None and data_frameskip != frameskip:
            problems.append(f"data.frameskip is {data_frameskip} but model.model.frameskip is {frameskip}: make them "
                            "equal")
        if num_frames is not None and open_loop > num_frames - 1:
            problems.append(f"model.open_loop_frames {open_loop} needs clips of at least {open_loop + 1} frames, "
                            f"data.num_frames is {num_frames}")
        if problems:
            self.parser.error("the clips do not fit the model:\n  " + "\n  ".join(problems))


def main(args=None) -> LeWMCLI:
    keep_freed_memory()  # 1.25-1.65x faster CPU steps on Linux (leworld/allocator.py)
    return LeWMCLI(LeWMModule, LeWMDataModule, seed_everything_default=0, args=args,
                   save_config_kwargs={"overwrite": True},
                   trainer_defaults={"default_root_dir": "runs", "gradient_clip_val": 1.0, "precision": None,
                                     "log_every_n_steps": 10})


# Errors that name a problem of the input (a missing dataset, a bad setting, a file in the way):
# printed as one line, not as the traceback of wherever in Lightning they surfaced.
# Errors that name the problem and the fix: printed in a line, not as a traceback. A NaN loss is a
# FloatingPointError; an unwritable path an OSError; a setting Lightning refuses (max_steps -5) a
# MisconfigurationException; frames that do not fit in memory (data.frames_on_device) a MemoryError.
USER_ERRORS = (ValueError, OSError, DatasetError, FloatingPointError, MisconfigurationException, MemoryError)


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("LEWORLD_TRACEBACK"):
            raise
        print(f"error: {e}\n({type(e).__name__}; LEWORLD_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        sys.exit(1)
