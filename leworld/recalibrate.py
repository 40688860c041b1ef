"""Re-estimate an exported model's BatchNorm statistics with its final weights.

Example:
    python -m leworld.recalibrate --model runs/pusht_tiny --batches 100

Training keeps each BatchNorm's running mean and variance as an exponential average over the
last few steps, taken while the weights moved. Evaluation (planning, probing, the `val/`
losses) uses those running statistics. Where a projector's hidden unit varies little within a
batch, the lag is large against its spread, and evaluation-mode embeddings can then be far from
training-mode ones: the validation prediction loss in evaluation mode sits far above the
training one. This command passes the first `--batches` training batches of the model's own
data (same file, split, clip length and batch size, in its first epoch's order) through the model with its
weights fixed, takes the average of their batch statistics (`recalibrate_batchnorm`), prints
the validation prediction loss in evaluation mode before and after, and writes the model back
(atomically) or to `--out`. Training does the same at its end with
`--model.bn_recalibration_batches N`. Nothing is written when that loss gets worse, or when the
run held out no validation episodes to check it on, unless `--force`.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from leworld.allocator import keep_freed_memory
from leworld.checkpoint import WEIGHTS_NAME, export_model, find_model, load_model, model_extra, recorded_data_path
from leworld.data.datamodule import LeWMDataModule
from leworld.module import LeWMModule, recalibrate_batchnorm
from leworld.results import check_writable


def _data_module(extra: dict, source: Path, batch_size: int | None) -> LeWMDataModule:
    data = extra.get("data")
    if not data or "path" not in data:
        raise ValueError(f"{source} does not record its training data (config.json extra.data): "
                         "re-estimate with the model trained by `python train.py fit`, which records it")
    keys = ("num_frames", "frameskip", "val_fraction", "split_seed", "shuffle_seed")
    path = recorded_data_path(source, data["path"])
    if not Path(path).is_file():
        raise ValueError(f"{source} was trained on {data['path']}, which is not here (looked from the working "
                         "directory and the folders above the model): run from the training directory")
    if batch_size is None:  # the run's own batches (models recorded before the batch size: 128)
        batch_size = int(data.get("batch_size", 128))
    dm = LeWMDataModule(str(path), batch_size=batch_size, num_workers=0, **{k: data[k] for k in keys if k in data})
    dm.setup("fit")
    return dm


def val_pred_loss(module: LeWMModule, dm: LeWMDataModule, batches: int) -> float:
    """Mean prediction loss of the first `batches` validation batches, in evaluation mode (NaN
    when there is no validation batch)."""
    module.model.eval()
    with torch.no_grad():
        losses = [float(module.losses(b)[0]) for b in itertools.islice(dm.val_dataloader(), batches)]
    return sum(losses) / len(losses) if losses else float("nan")


def recalibrate(model_path: str | Path, out: str | Path | None = None, batches: int = 100,
                batch_size: int | None = None, val_batches: int = 5, force: bool = False,
                overwrite: bool = False) -> dict:
    """Re-estimate the BatchNorm statistics of the model at `model_path` and export it to `out`
    (default: the exported directory itself), over batches of `batch_size` clips (default: the
    run's). Returns the counts and the losses before and after.

    When the validation prediction loss gets worse (too few batches to average over, say),
    nothing is written unless `force`; the result then has `written: False`. A run trained
    without validation episodes cannot be checked: it is refused unless `force` (then
    `checked: False` and NaN losses). An `out` that holds
    another model is refused unless `overwrite`."""
    if batches < 1 or val_batches < 1:
        raise ValueError(f"--batches and --val-batches must be at least 1, got {batches} and {val_batches}")
    if out is not None:  # a bad --out fails now, not after the batches have run
        check_writable(Path(out) / "config.json")
    source = find_model(model_path)
    model = load_model(source)  # a missing or unreadable model stops here, named as such
    if out is not None:
        out = Path(out)
        if any(out.glob("version_*")):
            raise ValueError(f"--out {out} is a run directory (it holds version_N folders): give a model directory, "
                             "e.g. a new folder")
        if (out / WEIGHTS_NAME).is_file() and out.resolve() != source.resolve() and not overwrite:
            raise FileExistsError(f"--out {out} already holds another model: give a new directory, or --overwrite "
                                  "to replace it")
    if out is None:
        if not source.is_dir():
            raise ValueError(f"{source} is a checkpoint file: give --out, the directory to export the model to")
        out = source
    extra = model_extra(source)
    dm = _data_module(extra, source, batch_size)
    checked = dm.val_set is not None
    if not checked and not force:
        raise ValueError(f"{source} was trained with val_fraction {dm.hparams.val_fraction}: {dm.path} holds out no "
                         "validation episodes, so whether the re-estimate helps cannot be checked. Give --force to "
                         "write it unchecked")
    # the run's own loss passes (with `open_loop_frames` the rollout also goes through pred_proj's
    # BatchNorm), as the end of training recalibrates
    open_loop = int((extra.get("hparams") or {}).get("open_loop_frames", 0))
    module = LeWMModule(model.config, open_loop_frames=open_loop)
    module.model = model
    before = val_pred_loss(module, dm, val_batches) if checked else float("nan")
    used = recalibrate_batchnorm(model, module.losses, itertools.islice(dm.train_dataloader(), batches))
    if used == 0:
        raise ValueError(f"{dm.path} gave no training batch to average over: check data.batch_size against "
                         "the training split's clips")
    after = val_pred_loss(module, dm, val_batches) if checked else float("nan")
    model.eval()
    result = {"out": str(out), "batches": used, "val_pred_loss_before": before, "val_pred_loss_after": after,
              "checked": checked, "written": force or after <= before}
    if result["written"]:
        extra = {**extra, "bn_recalibration": {"batches": used, "batch_size": dm.hparams.batch_size}}
        export_model(model, out, extra=extra)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model directory, run directory or .ckpt")
    parser.add_argument("--out", default=None, help="directory to export to (default: the model's own directory)")
    parser.add_argument("--batches", type=int, default=100, help="training batches to average over")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="clips per batch (default: the run's, as recorded with the model; 128 if not)")
    parser.add_argument("--val-batches", type=int, default=5, help="validation batches for the before/after loss")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already at --out")
    parser.add_argument("--force", action="store_true",
                        help="write the re-estimated model even when its validation loss is worse, or "
                        "unchecked when the run held out no validation episodes")
    args = parser.parse_args(argv)
    keep_freed_memory()  # faster CPU forward passes on Linux (leworld/allocator.py)
    try:
        result = recalibrate(args.model, args.out, args.batches, args.batch_size, args.val_batches, args.force,
                             args.overwrite)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    loss = (f"validation pred_loss in evaluation mode {result['val_pred_loss_before']:.4g} -> "
            f"{result['val_pred_loss_after']:.4g}" if result["checked"]
            else "not checked: no validation episodes (--force)")
    if not result["written"]:
        raise SystemExit(f"re-estimated the BatchNorm statistics over {result['batches']} training batches, but the "
                         f"{loss} got worse: nothing written (more --batches, or --force to write it anyway)")
    print(f"re-estimated the BatchNorm statistics over {result['batches']} training batches; {loss}; "
          f"wrote {result['out']}")
    return result


if __name__ == "__main__":
    main()
