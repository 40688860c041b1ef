"""Lightning training: loss goes down, resume is exact, export/load, clear errors, CLI and DDP."""
from __future__ import annotations

import hashlib
import itertools
import re
import shutil
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from dataclasses import asdict
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from leworld import load_model
from leworld.data.collect import collect
from leworld.data import datamodule as datamodule_mod
from leworld.data.datamodule import CollectSpec, LeWMDataModule, frames_to_device
from leworld.data.store import EpisodeStore
from leworld.model import LeWMConfig, LeWorldModel
from leworld.module import LeWMModule, effective_rank, recalibrate_batchnorm
from test_model import perturb_adaln

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(encoder="cnn", image_size=32, cnn_channels=(8, 16, 16), enc_width=32, embed_dim=32, proj_hidden=64,
            history=3, pred_depth=1, pred_heads=2, pred_head_dim=16, pred_mlp=64, action_hidden=32)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tworoom32.h5"
    collect("tworoom", episodes=10, steps=40, resolution=32, seed=0, out=path, progress=False)
    return path


def make(data_path, root, batch_size=16, lr=3e-3, frames_on_device=False, num_workers=0, shuffle_seed=0,
         **module_kwargs):
    module = LeWMModule(LeWMConfig(**TINY), lr=lr, num_directions=64, **module_kwargs)
    dm = LeWMDataModule(str(data_path), num_frames=4, frameskip=5, batch_size=batch_size, num_workers=num_workers,
                        val_fraction=0.2, frames_on_device=frames_on_device, shuffle_seed=shuffle_seed)
    return module, dm


def trainer(root, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, default_root_dir=str(root), logger=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_a_few_steps_reduce_the_loss_and_export_the_model(data_path, tmp_path):
    L.seed_everything(0)
    module, dm = make(data_path, tmp_path)
    rec = LossRecorder()
    trainer(tmp_path, max_steps=40, callbacks=[rec], enable_checkpointing=False).fit(module, dm)
    assert np.mean(rec.losses[-5:]) < 0.7 * np.mean(rec.losses[:5])
    # action statistics of the training split travel with the model
    np.testing.assert_allclose(module.model.action_mean.numpy(), dm.action_mean, rtol=1e-6)
    exported = load_model(tmp_path / "model")
    pixels = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)
    module.model.eval()
    torch.testing.assert_close(exported.encode(pixels), module.model.encode(pixels), rtol=0, atol=0)
    torch.testing.assert_close(exported.action_std, module.model.action_std)


def test_action_statistics_come_from_the_data_on_a_fresh_fit_and_from_the_checkpoint_on_resume(data_path, tmp_path):
    """A Trainer that has scored a checkpoint and then fits a new model gives it the data's
    statistics; a resumed fit keeps the checkpoint's, even where they differ from the data's."""
    module, dm = make(data_path, tmp_path)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)
    trainer(tmp_path / "a", max_steps=2, callbacks=[saver]).fit(module, dm)
    ckpt = tmp_path / "ckpts" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    state["state_dict"]["model.action_mean"] = torch.tensor([0.25, -0.5])  # not the data's
    state["state_dict"]["model.action_std"] = torch.tensor([2.0, 3.0])
    torch.save(state, ckpt)

    t = trainer(tmp_path / "b", max_steps=2, enable_checkpointing=False)
    t.validate(*make(data_path, tmp_path), ckpt_path=str(ckpt), verbose=False)
    fresh, fresh_dm = make(data_path, tmp_path)
    t.fit(fresh, fresh_dm)
    np.testing.assert_allclose(fresh.model.action_mean.numpy(), fresh_dm.action_mean, rtol=1e-6)
    np.testing.assert_allclose(fresh.model.action_std.numpy(), fresh_dm.action_std, rtol=1e-6)
    assert not np.allclose(fresh_dm.action_mean, [0.25, -0.5])

    resumed, resumed_dm = make(data_path, tmp_path)
    trainer(tmp_path / "c", max_steps=4, enable_checkpointing=False).fit(resumed, resumed_dm, ckpt_path=str(ckpt))
    assert resumed.model.action_mean.tolist() == [0.25, -0.5] and resumed.model.action_std.tolist() == [2.0, 3.0]


class StopAtStep(L.Callback):
    """Interrupts a run after optimiser step `step` (its schedule still planned for max_steps)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = trainer.should_stop or trainer.global_step >= self.step


class RecordStreams(L.Callback):
    """Writes, before every training batch, a digest of this rank's CPU random stream (which
    dropout draws from) to `<out>/rank<R>.txt`, without drawing from it."""

    def __init__(self, out: str):
        self.out = out

    def on_train_batch_start(self, trainer, *args):
        digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
        with open(Path(self.out) / f"rank{trainer.global_rank}.txt", "a") as f:
            f.write(f"{trainer.global_step} {digest}\n")


class StopAfterFirstEpoch(L.Callback):
    """Interrupts a 3-epoch run after its first epoch (same schedule, unlike max_epochs=1)."""

    def on_train_epoch_end(self, trainer, module):
        trainer.should_stop = True


def test_resuming_from_a_checkpoint_continues_identically(data_path, tmp_path):
    def run(root, ckpt=None, callbacks=()):
        L.seed_everything(0)
        module, dm = make(data_path, root, batch_size=64)
        t = trainer(root, max_epochs=3, limit_val_batches=0, callbacks=list(callbacks))
        t.fit(module, dm, ckpt_path=ckpt)
        return module, t

    straight, _ = run(tmp_path / "a")
    _, first = run(tmp_path / "b", callbacks=[StopAfterFirstEpoch()])
    ckpt = first.checkpoint_callback.best_model_path
    assert Path(ckpt).is_file() and first.current_epoch == 1
    resumed, t = run(tmp_path / "c", ckpt=ckpt)
    assert t.global_step == straight.global_step > first.global_step > 0
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"{name} differs after resuming")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resuming_mid_epoch_continues_identically(data_path, tmp_path, num_workers):
    """A checkpoint written inside an epoch (as every_n_train_steps writes them) resumes with the
    clips the uninterrupted run would have drawn next, the same dropout draws, and loader workers
    or none: the weights come out identical."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    probe = LeWMDataModule(str(data_path), num_frames=4, frameskip=5, batch_size=16, val_fraction=0.2)
    probe.setup("fit")
    per_epoch = len(probe.train_set) // 16  # drop_last
    stop, total = per_epoch + 3, per_epoch + 8  # the checkpoint falls 3 batches into the second epoch

    class StopAt(L.Callback):  # an interruption: the schedule still runs to `total` steps
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.should_stop or trainer.global_step >= stop

    def run(root, ckpt=None, workers=num_workers, callbacks=()):
        L.seed_everything(0)
        module, dm = make(data_path, root, num_workers=workers)
        save = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=stop, save_top_k=-1)
        t = trainer(root, max_steps=total, val_check_interval=5, callbacks=[save, *callbacks])
        t.fit(module, dm, ckpt_path=ckpt)
        return module, t

    straight, t = run(tmp_path / "a")
    assert t.global_step == total
    if num_workers:  # loader workers or none: the same model (the loaders draw nothing from torch's stream)
        other, _ = run(tmp_path / "w0", workers=0)
        for (name, a), b in zip(straight.state_dict().items(), other.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} depends on num_workers")
    _, first = run(tmp_path / "b", callbacks=[StopAt()])
    assert first.global_step == stop
    (ckpt,) = (tmp_path / "b" / "ckpt").glob("*.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, t = run(tmp_path / "c", ckpt=str(ckpt))
    assert t.global_step == total
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs after resuming mid-epoch")
    # so Lightning's warning that the loader cannot resume inside an epoch would be wrong: it is not given
    assert not [w for w in caught if "resuming from a checkpoint that ended before the epoch" in str(w.message)]


def test_a_resume_with_other_clips_per_step_stops_before_training(data_path, tmp_path):
    """Through Lightning's restore: the checkpoint's data state records the clips per step (16),
    and a resume at 8 (which would go on at the wrong place in the clip order) stops before a step."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    module, dm = make(data_path, tmp_path / "a")
    trainer(tmp_path / "a", max_steps=3, callbacks=[ModelCheckpoint(dirpath=tmp_path / "a", save_last=True)]).fit(
        module, dm)
    ckpt = tmp_path / "a" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["LeWMDataModule"]["stream"]["clips_per_step"] == 16
    module, dm = make(data_path, tmp_path / "b", batch_size=8)
    rec = LossRecorder()
    with pytest.raises(ValueError, match="trained with 16 clips per step .*; this run would train with 8 clips"):
        trainer(tmp_path / "b", max_steps=6, callbacks=[rec]).fit(module, dm, ckpt_path=str(ckpt))
    assert rec.losses == []


class BatchRecorder(L.Callback):
    """The clips of every training batch, as digests of their pixels."""

    def __init__(self):
        self.digests = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.digests.append(hashlib.sha1(batch["pixels"].cpu().numpy().tobytes()).hexdigest())


def test_a_run_stopped_inside_an_epoch_resumes_with_the_clips_the_uninterrupted_run_draws(data_path, tmp_path):
    """A run that stops inside an epoch (max_time, a callback, or a max_steps raised later) writes a
    checkpoint that Lightning resumes as a new epoch: the clips must still go on in the order the
    uninterrupted run draws them, over several resumes (the loaders once drew the next epoch's order)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    probe = LeWMDataModule(str(data_path), num_frames=4, frameskip=5, batch_size=16, val_fraction=0.2)
    probe.setup("fit")
    per_epoch = len(probe.train_set) // 16  # drop_last
    total = 2 * per_epoch + 2

    def run(name, max_steps, stop=None, resume=None, **checkpoint):
        L.seed_everything(0)
        module, dm = make(data_path, tmp_path / name)
        rec = BatchRecorder()
        callbacks = [rec, ModelCheckpoint(dirpath=tmp_path / name / "ckpt", save_last=True, **checkpoint)]
        if stop is not None:
            callbacks.append(StopAtStep(stop))
        ckpt = str(tmp_path / resume / "ckpt" / "last.ckpt") if resume else None
        trainer(tmp_path / name, max_steps=max_steps, limit_val_batches=0, callbacks=callbacks).fit(module, dm,
                                                                                                   ckpt_path=ckpt)
        models[name] = module
        return rec.digests

    models = {}
    straight = run("a", total)
    assert len(straight) == total and len(set(straight[:per_epoch])) == per_epoch
    assert straight[:per_epoch] != straight[per_epoch:2 * per_epoch]  # each epoch has its own order
    # stopped inside the first epoch, then inside the second, then run to the end
    parts = [run("b", total, stop=3), run("c", total, stop=per_epoch + 4, resume="b"), run("d", total, resume="c")]
    assert [len(p) for p in parts] == [3, per_epoch + 1, per_epoch - 2]
    assert sum(parts, []) == straight
    for (name, a), b in zip(models["a"].state_dict().items(), models["d"].state_dict().values()):  # same schedule
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs after two resumes")
    # trained to a max_steps inside the first epoch, then resumed with more; the second time with
    # checkpoints every n steps (as the configs write them), so the last one is written when training
    # ends, after Lightning has counted the cut epoch as completed
    assert run("e", 3) + run("f", total, resume="e") == straight
    assert run("g", 3, every_n_train_steps=50) + run("h", total, resume="g") == straight
    state = torch.load(tmp_path / "g" / "ckpt" / "last.ckpt", weights_only=False)["loops"]["fit_loop"]
    assert state["epoch_progress"]["current"]["completed"] == 1  # the case this covers


class CopyCheckpointAtFirstEpochEnd(L.Callback):
    """Keeps the checkpoint as it was at the end of epoch 0 (written by validation's end there)."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == 0:
            shutil.copy(self.folder / "last.ckpt", self.folder / "epoch0.ckpt")


@pytest.mark.parametrize("case", ["max-epochs-mid-epoch-checkpoint", "max-epochs-stopped", "validation-at-epoch-end",
                                  "limit-train-batches", "epoch-end-checkpoint"])
def test_resumed_runs_draw_the_uninterrupted_clips_however_the_checkpoint_was_written(data_path, tmp_path, case):
    """Runs whose length is set by max_epochs (as the paper configs) build their loader before
    Lightning restores its counters; a checkpoint written when validation ends an epoch makes
    Lightning close that epoch again with no batch; one written by the epoch's end hook makes it
    train one more batch in that epoch; limit_train_batches shortens epochs. In each, the resumed
    run must draw the clips the uninterrupted run draws."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    probe = LeWMDataModule(str(data_path), num_frames=4, frameskip=5, batch_size=16, val_fraction=0.2)
    probe.setup("fit")
    per_epoch = len(probe.train_set) // 16  # drop_last
    settings, checkpoint, stop, kept = {
        "max-epochs-mid-epoch-checkpoint": (dict(max_epochs=3, max_steps=-1), dict(every_n_train_steps=per_epoch + 3),
                                            per_epoch + 3, f"epoch=1-step={per_epoch + 3}.ckpt"),
        "max-epochs-stopped": (dict(max_epochs=3, max_steps=-1), dict(save_last=True), 4, "last.ckpt"),
        "validation-at-epoch-end": (dict(max_steps=2 * per_epoch + 2, val_check_interval=per_epoch,
                                         limit_val_batches=1), dict(save_last=True), None, "epoch0.ckpt"),
        "limit-train-batches": (dict(max_steps=12, limit_train_batches=5), dict(save_last=True), 7, "last.ckpt"),
        "epoch-end-checkpoint": (dict(max_steps=2 * per_epoch + 2), dict(every_n_epochs=1, save_on_train_epoch_end=True),
                                 None, f"epoch=0-step={per_epoch}.ckpt"),
    }[case]

    def run(name, stop=None, resume=None):
        L.seed_everything(0)
        module, dm = make(data_path, tmp_path / name)
        rec = BatchRecorder()
        folder = tmp_path / name / "ckpt"
        callbacks = [rec, ModelCheckpoint(dirpath=folder, save_top_k=-1, **checkpoint),
                     CopyCheckpointAtFirstEpochEnd(folder) if case == "validation-at-epoch-end" and not resume
                     else L.Callback()]
        if stop is not None:
            callbacks.append(StopAtStep(stop))
        ckpt = str(tmp_path / resume / "ckpt" / kept) if resume else None
        options = {"limit_val_batches": 0, **settings}
        trainer(tmp_path / name, callbacks=callbacks, **options).fit(module, dm, ckpt_path=ckpt)
        return rec.digests

    straight = run("a")
    first = run("b", stop=stop) if stop is not None else straight[:per_epoch]
    resumed = run("c", resume="b" if stop is not None else "a")
    assert len(straight) > len(first) > 0 and len(resumed) > 0
    if case == "max-epochs-stopped":  # Lightning counts the cut epoch as one of max_epochs: the run ends sooner
        straight = straight[:len(first) + len(resumed)]
    assert first + resumed == straight


def test_effective_rank_against_direct_formula_and_extremes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum()
    assert effective_rank(x).item() == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)
    assert effective_rank(x).item() > 14  # isotropic: nearly all 16 directions
    line = torch.randn(500, 1, generator=g) * torch.randn(1, 16, generator=g)
    assert effective_rank(line).item() < 1.01  # collapsed onto a line


def _reference_monitors(emb: torch.Tensor, per_row: torch.Tensor) -> dict[str, float]:
    """The monitors of one process holding the whole batch, straight from their definitions in
    float64: the mean of a per-row quantity, unbiased stds, the SVD's effective rank."""
    flat = emb.double().flatten(0, 1)
    std = flat.std(0)
    return {"pred_loss": float(per_row.double().mean()), "emb_std_mean": float(std.mean()),
            "emb_std_min": float(std.min()), "effective_rank": float(effective_rank(flat))}


def _monitor_batch():
    g = torch.Generator().manual_seed(3)
    # (B, T, D): off-centre and anisotropic, so that the centring and the spread across directions count
    emb = 4.0 + torch.randn(24, 3, 16, generator=g) * torch.logspace(-1, 0.5, 16)
    per_row = torch.rand(24, generator=g)  # a per-row loss: each process logs the mean of its rows
    return emb, per_row


def test_batch_monitors_match_their_definitions_in_one_process():
    from leworld.module import batch_monitors

    emb, per_row = _monitor_batch()
    got = batch_monitors(emb, {"pred_loss": per_row.mean()})
    assert list(got) == ["pred_loss", "emb_std_mean", "emb_std_min", "effective_rank"]
    for name, value in _reference_monitors(emb, per_row).items():
        assert got[name].item() == pytest.approx(value, rel=1e-5), name
    line = torch.randn(40, 2, 1) * torch.randn(1, 1, 16)  # collapsed onto a line
    assert batch_monitors(line, {})["effective_rank"].item() < 1.01
    emb[5, 1, 3] = float("nan")  # a diverged embedding reads as NaN instead of stopping in the eigensolver
    spoilt = batch_monitors(emb, {"pred_loss": per_row.mean()})
    assert spoilt["effective_rank"].isnan() and spoilt["emb_std_min"].isnan()
    assert spoilt["pred_loss"].item() == pytest.approx(float(per_row.double().mean()), rel=1e-6)


def _monitor_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from leworld.module import batch_monitors

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        emb, per_row = _monitor_batch()
        rows = slice(0, 10) if rank == 0 else slice(10, 24)  # unequal shares: each mean counts by its rows
        got = batch_monitors(emb[rows], {"pred_loss": per_row[rows].mean()})
        torch.save({k: v.item() for k, v in got.items()}, f"{out_dir}/monitors{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_two_process_monitors_equal_one_process_on_the_whole_batch(tmp_path):
    """Under DDP the logged loss, embedding std and effective rank are those of the global batch,
    as SIGReg is, not one rank's share."""
    import torch.multiprocessing as mp

    mp.spawn(_monitor_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    emb, per_row = _monitor_batch()
    want = _reference_monitors(emb, per_row)
    for rank in range(2):
        got = torch.load(tmp_path / f"monitors{rank}.pt")
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-5), (rank, name)
    # one share alone is another batch: the test can tell the two apart
    share = _reference_monitors(emb[:10], per_row[:10])
    assert abs(share["effective_rank"] - want["effective_rank"]) > 1e-3
    assert abs(share["pred_loss"] - want["pred_loss"]) > 1e-3


def _collapse_warnings(data_path, root, max_steps, warmup_steps, fraction=1.0):
    """The collapse warnings of a short run; fraction 1.0 puts the threshold at D: always "collapsed"."""
    module, dm = make(data_path, root, collapse_rank_fraction=fraction, collapse_warmup_steps=warmup_steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(root, max_steps=max_steps, log_every_n_steps=1, enable_checkpointing=False).fit(module, dm)
    return [str(w.message) for w in caught if "embedding collapse" in str(w.message)]


def test_collapse_warning_fires_below_the_threshold(data_path, tmp_path):
    """The warning compares the step's effective rank r (as logged) with fraction x D: a threshold
    just above r fires and names r, one just below stays silent."""
    L.seed_everything(0)
    module, dm = make(data_path, tmp_path / "r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path / "r", max_steps=1, log_every_n_steps=1, enable_checkpointing=False).fit(module, dm)
    rank, dim = float(module.trainer.callback_metrics["train/effective_rank"]), module.config.embed_dim
    assert 1 < rank < dim - 1
    for fraction, fires in (((rank + 0.05) / dim, True), ((rank - 0.05) / dim, False)):
        L.seed_everything(0)  # the same step as above
        fired = _collapse_warnings(data_path, tmp_path / f"{fraction}", max_steps=1, warmup_steps=0, fraction=fraction)
        assert bool(fired) == fires, (rank, fraction, fired)
        if fires:
            assert f"effective rank {rank:.1f} of {dim} at step 0" in fired[0], fired


def test_collapse_warning_waits_for_its_warm_up_then_fires_once(data_path, tmp_path):
    """A fresh network's embedding may start below the threshold (Push-T's at 3.6 of 192): the
    warning is not checked before `collapse_warmup_steps`, and fires at the first logged step from
    there on, once."""
    assert _collapse_warnings(data_path, tmp_path / "a", max_steps=3, warmup_steps=3) == []
    fired = _collapse_warnings(data_path, tmp_path / "b", max_steps=5, warmup_steps=3)
    assert len(fired) == 1 and "at step 3 " in fired[0], fired
    assert LeWMModule().hparams.collapse_warmup_steps == 500
    with pytest.raises(ValueError, match="collapse_warmup_steps"):
        LeWMModule(collapse_warmup_steps=-1)


def test_each_process_saves_and_restores_the_random_stream_of_its_own_gpu(monkeypatch):
    """Dropout on a GPU draws from that GPU's stream. A process saves the stream of the GPU it
    trains on (the strategy's device, also before the module is moved there), not every device's:
    under DDP the other GPUs' streams are other processes', which this one never advances. Under
    DDP every rank's streams are gathered into the checkpoint, and rank k restores GPU k's from its
    own entry. (Faked CUDA streams: no GPU here; the gathering itself runs in the two-process
    resume tests.)"""
    streams = {0: torch.tensor([10], dtype=torch.uint8), 1: torch.tensor([0], dtype=torch.uint8)}
    calls = []

    def get_state(device="cuda"):
        return streams[torch.device(device).index].clone()

    def set_state(state, device="cuda"):
        calls.append(torch.device(device).index)
        streams[torch.device(device).index] = state.clone()

    def set_all(states):
        calls.append("all")
        for i, st in enumerate(states):
            streams[i] = st.clone()

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [get_state(i) for i in sorted(streams)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def on(device: int, world: int = 1, rank: int = 0) -> LeWMModule:
        module = LeWMModule(LeWMConfig(**TINY), num_directions=8)
        strategy = SimpleNamespace(root_device=torch.device("cuda", device))
        module._trainer = SimpleNamespace(world_size=world, global_rank=rank, strategy=strategy)
        return module

    checkpoint = {}
    on(1).on_save_checkpoint(checkpoint)  # one process training on GPU 1
    assert torch.equal(checkpoint["rng_state"]["cuda_device"], streams[1]) and "cuda" not in checkpoint["rng_state"]
    streams[1] = torch.tensor([99], dtype=torch.uint8)
    on(1).on_load_checkpoint(checkpoint)
    assert calls == [1] and streams[1].item() == 0
    # rank 1 of two takes its own entry of the gathered states, and sets it on its own GPU
    cpu = torch.get_rng_state()
    ranks = {"torch": [cpu, cpu], "cuda_device": [torch.tensor([10], dtype=torch.uint8),
                                                   torch.tensor([42], dtype=torch.uint8)]}
    module = on(1, world=2, rank=1)
    module.on_load_checkpoint({"rng_state": {"torch": cpu, "cuda_device": ranks["cuda_device"][0], "ranks": ranks}})
    assert calls == [1, 1] and streams[1].item() == 42 and module._streams_restored


class RaiseInterrupt(L.Callback):
    """Ctrl-C after optimiser step `at`."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.at:
            raise KeyboardInterrupt


class RaiseInterruptAtEnd(L.Callback):
    """Ctrl-C after the last step, as the run ends (before its export)."""

    def on_train_end(self, trainer, *args):
        raise KeyboardInterrupt


def test_ctrl_c_after_the_last_step_says_the_checkpoint_is_the_trained_model(data_path, tmp_path, capsys):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module, dm = make(data_path, tmp_path)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(SystemExit):
        trainer(tmp_path, max_steps=4, callbacks=[every, RaiseInterruptAtEnd()]).fit(module, dm)
    err = capsys.readouterr().err
    assert "interrupted after the last step (4), before the run ended" in err and "resume from" not in err
    assert f"plan.py --model {tmp_path / 'ckpts' / 'epoch=0-step=4.ckpt'}" in err


def test_ctrl_c_under_ddp_says_which_checkpoint_the_run_resumes_from(tmp_path):
    """Only rank 0 speaks, and without a collective (the other ranks are shutting down too)."""
    import os

    config = write_config(tmp_path, strategy="ddp", devices=2, accelerator="cpu", max_steps=12)
    spec = yaml.safe_load(config.read_text())
    spec["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": 2, "save_top_k": -1}},
        {"class_path": "test_train.RaiseInterrupt", "init_args": {"at": 3}}]
    config.write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "train.py", "fit", "--config", str(config)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
    run = tmp_path / "runs" / "tworoom_tiny" / "version_0"
    assert out.stderr.count("interrupted at step 3: resume from the newest checkpoint (step 2) with") == 1, \
        out.stderr[-3000:]
    assert f"--config {run / 'config.yaml'} --ckpt_path {run / 'checkpoints' / 'epoch=0-step=2.ckpt'}" in out.stderr


@pytest.mark.parametrize("at", [1, 3])
def test_ctrl_c_says_which_checkpoint_the_run_resumes_from(data_path, tmp_path, capsys, at):
    """Lightning only says that it shuts down; the run says what it can be resumed from, and how, or
    that nothing of it can (no checkpoint yet)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module, dm = make(data_path, tmp_path)
    every = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(SystemExit):
        trainer(tmp_path, max_steps=10, callbacks=[every, RaiseInterrupt(at)]).fit(module, dm)
    err = capsys.readouterr().err
    if at == 1:
        assert "interrupted at step 1: no checkpoint was written yet (checkpoints every 2 steps)" in err
    else:
        assert "interrupted at step 3: resume from the newest checkpoint (step 2) with" in err
        assert f"--ckpt_path {tmp_path / 'ckpts' / 'epoch=0-step=2.ckpt'}" in err


def test_ctrl_c_names_only_this_runs_checkpoints_where_runs_share_a_folder(data_path, tmp_path, capsys):
    """Without a logger, runs share one checkpoint folder. A fresh run interrupted before its first
    checkpoint has nothing to resume, whatever an earlier run left there; a resumed run that wrote
    none yet resumes again from where it started."""
    import os
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(at, **fit):
        module, dm = make(data_path, tmp_path)
        every = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1)
        with pytest.raises(SystemExit):
            trainer(tmp_path, max_steps=10, callbacks=[every, RaiseInterrupt(at)]).fit(module, dm, **fit)
        return capsys.readouterr().err

    assert "resume from the newest checkpoint (step 2)" in run(3)  # an earlier run
    earlier = tmp_path / "ckpts" / "epoch=0-step=2.ckpt"
    hour_ago = earlier.stat().st_mtime - 3600
    os.utime(earlier, (hour_ago, hour_ago))
    err = run(1)
    assert "interrupted at step 1: no checkpoint was written yet (checkpoints every 2 steps)" in err, err
    assert "resume from" not in err
    err = run(3, ckpt_path=str(earlier))  # resumed at step 2, stopped at 3: writes its first at 4
    assert "interrupted at step 3: resume from the newest checkpoint (step 2) with" in err, err
    assert f"--ckpt_path {earlier}" in err


def test_nan_loss_stops_with_a_clear_error(data_path, tmp_path):
    module, dm = make(data_path, tmp_path)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        trainer(tmp_path, max_steps=2, enable_checkpointing=False, callbacks=[SpoilWeights(0)]).fit(module, dm)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"lambda_sigreg": float("nan")}, "lambda_sigreg weighs SIGReg"),
    ({"lambda_sigreg": float("inf")}, "lambda_sigreg weighs SIGReg"),
    ({"lambda_sigreg": -1.0}, "lambda_sigreg weighs SIGReg"),
    ({"warmup_fraction": 5.0}, "warmup_fraction"),
    ({"lr": 0.0}, "need lr > 0"),
    ({"weight_decay": -1e-3}, "weight_decay >= 0"),
])
def test_settings_no_run_can_use_are_refused_when_the_module_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LeWMModule(LeWMConfig(**TINY), **kwargs)


def test_batches_of_one_clip_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="projector's BatchNorm needs two clips"):
        LeWMDataModule("data/none.h5", batch_size=1)


def test_a_training_step_on_one_clip_is_refused_with_the_reason():
    """A loader of the user's own can hand over one clip: the error says why and what to change,
    instead of BatchNorm's 'Expected more than 1 value per channel'."""
    module = LeWMModule(LeWMConfig(**{**TINY, "history": 1}), num_directions=16)
    batch = {"pixels": torch.randint(0, 255, (1, 2, 32, 32, 3), dtype=torch.uint8), "action": torch.randn(1, 1, 10)}
    with pytest.raises(ValueError, match=r"a training batch of 1 clip\(s\) of 2 frames: .*data.batch_size >= 2"):
        module.losses(batch)
    two = {k: torch.cat([v, v]) for k, v in batch.items()}
    assert torch.isfinite(module.losses(two)[0])
    module.eval()  # evaluation normalises with the running statistics: one clip is fine
    assert torch.isfinite(module.losses(batch)[0])


def test_a_data_module_built_in_python_with_a_collect_spec_writes_checkpoints_that_load_and_resume(data_path,
                                                                                                    tmp_path):
    """The docstring's `generate=CollectSpec(...)` and a pathlib path: the hyper-parameters saved in
    every checkpoint are plain values, so the weights-only loads (ours and Lightning's resume) read it."""
    from leworld.checkpoint import model_extra, read_checkpoint

    def run(max_steps, ckpt=None):
        L.seed_everything(0)
        module = LeWMModule(LeWMConfig(**TINY), num_directions=64)
        dm = LeWMDataModule(Path(data_path), num_frames=4, frameskip=5, batch_size=16, num_workers=0,
                            val_fraction=0.2, generate=CollectSpec(env="tworoom", episodes=10, steps=40, resolution=32))
        t = trainer(tmp_path, max_steps=max_steps, limit_val_batches=0)
        t.fit(module, dm, ckpt_path=ckpt)
        return t

    ckpt = Path(run(2).checkpoint_callback.best_model_path)
    saved = read_checkpoint(ckpt)["datamodule_hyper_parameters"]
    assert saved["generate"] == {**asdict(CollectSpec(env="tworoom", episodes=10, steps=40, resolution=32))}
    assert saved["path"] == str(data_path)
    assert load_model(ckpt).config == LeWMConfig(**TINY)
    assert model_extra(ckpt)["dataset"] == {"env": "tworoom"}
    assert run(4, ckpt=ckpt).global_step == 4
    old = tmp_path / "old.ckpt"  # written before the values were made plain: the spec itself was saved
    torch.save({**read_checkpoint(ckpt), "datamodule_hyper_parameters": {
        **saved, "generate": CollectSpec(env="tworoom", episodes=10, steps=40, resolution=32)}}, old)
    assert model_extra(old)["data"]["path"] == str(data_path)


def test_a_run_never_replaces_the_model_another_run_exported(data_path, tmp_path):
    """Without a versioning logger every run exports to <default_root_dir>/model: a second run
    there stops before its first step; resuming the run that wrote it may replace it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module, dm = make(data_path, tmp_path)
    save = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_steps=2, callbacks=[save]).fit(module, dm)
    before = (tmp_path / "model" / "model.safetensors").read_bytes()
    module, dm = make(data_path, tmp_path)
    with pytest.raises(FileExistsError, match="already holds the exported model of an earlier run"):
        trainer(tmp_path, max_steps=2, enable_checkpointing=False).fit(module, dm)
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == before
    module, dm = make(data_path, tmp_path)
    trainer(tmp_path, max_steps=4, enable_checkpointing=False).fit(module, dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert load_model(tmp_path / "model") is not None and \
        (tmp_path / "model" / "model.safetensors").read_bytes() != before


class SpoilWeights(L.Callback):
    """Fills one weight with NaN before training step `at`."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                next(module.model.predictor.parameters()).fill_(float("nan"))


class SpoilGradient(L.Callback):
    """Makes one gradient infinite after the backward of step `at` (the loss stays finite); with
    `rank`, SpoilWeights' NaN weight on that process only."""

    def __init__(self, at: int, rank: int | None = None):
        self.at, self.rank = at, rank

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.rank is not None and trainer.global_step == self.at and trainer.global_rank == self.rank:
            with torch.no_grad():
                next(module.model.predictor.parameters()).fill_(float("nan"))

    def on_after_backward(self, trainer, module):
        if self.rank is None and trainer.global_step == self.at:
            next(p for p in module.parameters() if p.grad is not None).grad[0].fill_(float("inf"))


class CheckFiniteEveryStep(L.Callback):
    """Sets the module's NaN-check cadence (every step, as on the CPU, or deferred, as on a GPU)."""

    def __init__(self, every_step: bool):
        self.every_step = every_step

    def setup(self, trainer, module, stage):
        module.check_finite_every_step = self.every_step


@pytest.mark.parametrize("every_step", [True, False], ids=["cpu-check", "deferred-check"])
def test_a_non_finite_gradient_with_a_finite_loss_stops_before_a_checkpoint(data_path, tmp_path, every_step):
    """Clipping turns an infinite gradient into NaN weights while the loss of that step was finite:
    the gradient norm is checked too, so the checkpoint after that step is never written."""
    module, dm = make(data_path, tmp_path)
    module.check_finite_every_step = every_step
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    with pytest.raises(FloatingPointError, match=r"the gradient norm is inf \(loss [0-9.]+\) at step 4 "):
        trainer(tmp_path, max_steps=20, log_every_n_steps=50, callbacks=[SpoilGradient(4), ckpt]).fit(module, dm)
    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert saved == ["epoch=0-step=3.ckpt"]  # the step-6 one would hold NaN weights
    state = torch.load(tmp_path / "ckpt" / saved[0], map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nan_loss_is_caught_on_the_device_and_no_checkpoint_keeps_it(data_path, tmp_path):
    """Off the CPU the NaN check reads the device only on logging steps and before a checkpoint.
    The deferred check names the first bad step, and the checkpoint due after it is not written."""
    module, dm = make(data_path, tmp_path)
    module.check_finite_every_step = False  # as on a GPU
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    rec = LossRecorder()
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 4 .*found at step 5"):
        trainer(tmp_path, max_steps=20, log_every_n_steps=4, callbacks=[SpoilWeights(4), rec, ckpt]).fit(module, dm)
    assert len(rec.losses) == 5 and np.isnan(rec.losses[4]) and np.isfinite(rec.losses[:4]).all()
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))  # the step-5 checkpoint would hold NaN weights

    module, dm = make(data_path, tmp_path)
    module.check_finite_every_step = False
    rec = LossRecorder()
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 4 .*found at step 7"):
        trainer(tmp_path, max_steps=20, log_every_n_steps=4, callbacks=[SpoilWeights(4), rec],
                enable_checkpointing=False).fit(module, dm)
    assert len(rec.losses) == 7  # steps 4, 5 and 6 ran on; step 7 is a logging step and stopped


class MemoryLogger(L.pytorch.loggers.Logger):
    """Keeps what the Trainer writes: {step: {name: value}}."""

    def __init__(self):
        super().__init__()
        self.rows = {}

    name, version = "memory", 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.setdefault(step, {}).update(metrics)


def test_logged_metrics_are_those_of_the_step_they_are_written_at(data_path, tmp_path):
    """Diagnostics are computed only on the steps Lightning writes; each written value must be that step's."""
    L.seed_everything(0)
    module, dm = make(data_path, tmp_path)
    rec, log = LossRecorder(), MemoryLogger()
    trainer(tmp_path, max_steps=9, log_every_n_steps=3, logger=log, callbacks=[rec],
            enable_checkpointing=False).fit(module, dm)
    written = {step: row for step, row in log.rows.items() if "train/loss" in row}
    assert sorted(written) == [2, 5, 8]
    for step, row in written.items():
        assert row["train/loss"] == pytest.approx(rec.losses[step], rel=1e-6)
        assert row["train/grad_norm"] > 0 and row["train/effective_rank"] >= 1 and row["train/lr"] > 0
    # a logger without a directory: the model is exported under the Trainer's root, not the working directory
    assert (tmp_path / "model" / "config.json").exists()


class HostReads(L.Callback):
    """Counts, per training step (from one step's start to the next), the reads of a tensor's value
    back to Python (`.item()`, `bool(tensor)`, `float(tensor)`: on a GPU each one waits for the
    device), leaving out Lightning's conversion of logged values for the logger and progress bar."""

    class Mode(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                stack = "".join(traceback.format_stack(limit=12))
                self.reads += "convert_tensors_to_scalars" not in stack
            return func(*args, **(kwargs or {}))

    def __init__(self):
        self.mode, self.counts = None, []

    def _close(self):
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.counts.append(self.mode.reads)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._close()
        self.mode = self.Mode()
        self.mode.__enter__()

    def on_train_end(self, trainer, module):
        self._close()
        self.mode = None


def test_a_training_step_reads_nothing_back_except_on_logging_steps(data_path, tmp_path):
    """The GPU setting (fused AdamW, clipping, NaN check off the CPU, progress bar): the steps
    that Lightning does not log read no tensor value back; the logging steps do."""
    module, dm = make(data_path, tmp_path, fused=True)
    module.check_finite_every_step = False
    reads = HostReads()
    trainer(tmp_path, max_steps=8, log_every_n_steps=4, gradient_clip_val=1.0, enable_progress_bar=True,
            callbacks=[reads], enable_checkpointing=False).fit(module, dm)
    assert len(reads.counts) == 8
    assert [n for i, n in enumerate(reads.counts) if i not in (3, 7)] == [0] * 6
    assert reads.counts[3] > 0 and reads.counts[7] > 0  # the diagnostics and the NaN check, read there


class StepMetrics(L.Callback):
    """Records the logged per-step loss terms and SIGReg weight."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.rows.append({k: float(m[f"train/{k}"]) for k in ("loss", "pred_loss", "sigreg", "lambda_sigreg")})


def test_lambda_schedule_switches_the_sigreg_weight_at_the_given_steps(data_path, tmp_path):
    module, dm = make(data_path, tmp_path, lambda_sigreg=0.5, lambda_schedule=[[2, 2.0], [4, 0.0]])
    rec = StepMetrics()
    trainer(tmp_path, max_steps=6, log_every_n_steps=1, callbacks=[rec], enable_checkpointing=False).fit(module, dm)
    expected = [0.5, 0.5, 2.0, 2.0, 0.0, 0.0]
    assert [r["lambda_sigreg"] for r in rec.rows] == expected
    for r, w in zip(rec.rows, expected):  # the optimised loss uses the weight in force
        assert r["loss"] == pytest.approx(r["pred_loss"] + w * r["sigreg"], rel=1e-6, abs=1e-7)
    assert rec.rows[-1]["sigreg"] > 0  # the last steps really drop a non-zero term
    assert [module.lambda_at(s) for s in (0, 1, 2, 3, 4, 10**6)] == [0.5, 0.5, 2.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize("schedule, match", [([[5, 0.1], [5, 0.2]], "must increase"),
                                             ([[-1, 0.1]], "integer >= 0"),
                                             ([[5, -0.1]], "finite number >= 0"),
                                             ([[5, float("nan")]], "finite number >= 0"),
                                             ([5, 0.1], r"\[step, weight\] pairs")])
def test_bad_lambda_schedule_is_a_clear_error(schedule, match):
    with pytest.raises(ValueError, match=match):
        LeWMModule(LeWMConfig(**TINY), lambda_schedule=schedule)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fused_adamw_under_bf16_mixed_precision_clips_gradients(data_path, tmp_path, algorithm):
    """The GPU setting (fused AdamW, bf16-mixed, clipping) runs, here on the CPU, and the gradients
    the optimiser stepped with were clipped: Lightning alone refuses to clip for a fused optimiser."""
    L.seed_everything(0)
    module, dm = make(data_path, tmp_path, fused=True)
    clip, seen = 1e-3, []

    class Watch(L.Callback):
        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            assert opt.defaults["fused"] is True
            opt.register_step_post_hook(lambda o, args, kwargs: seen.append(
                [p.grad.detach().float().clone() for g in o.param_groups for p in g["params"] if p.grad is not None]))

    trainer(tmp_path, max_steps=3, precision="bf16-mixed", gradient_clip_val=clip, gradient_clip_algorithm=algorithm,
            callbacks=[Watch()], enable_checkpointing=False).fit(module, dm)
    assert len(seen) == 3
    for grads in seen:
        if algorithm == "norm":
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            assert total == pytest.approx(clip, rel=1e-3)  # the raw gradients are far larger than 1e-3
        else:
            assert max(float(g.abs().max()) for g in grads) == pytest.approx(clip, rel=1e-6)


def test_adamw_is_fused_only_where_asked_or_on_cuda(data_path, tmp_path, monkeypatch):
    """fused=None: fused on CUDA unless a float16 scaler unscales the gradients; fused=True/False as
    asked. The decision is read from the optimizer's construction (a CUDA device is only named:
    no GPU here), and a real CPU run builds an unfused one."""
    from types import SimpleNamespace

    module, dm = make(data_path, tmp_path)
    trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, dm)
    assert module.trainer.optimizers[0].defaults["fused"] in (False, None)  # CPU, no fused asked for

    asked_for = []
    real = torch.optim.AdamW

    def recording(params, **kwargs):
        asked_for.append(kwargs["fused"])
        return real(params, **{**kwargs, "fused": None})  # built unfused: the parameters are on the CPU

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    cases = [("cpu", None, None, False), ("cuda:0", None, None, True), ("cuda:0", "fp16 scaler", None, False),
             ("cpu", None, True, True), ("cuda:0", None, False, False)]
    for device, scaler, fused, want in cases:
        module = LeWMModule(LeWMConfig(**TINY), fused=fused)
        module._device = torch.device(device)
        module._trainer = SimpleNamespace(estimated_stepping_batches=10,
                                          precision_plugin=SimpleNamespace(scaler=scaler))
        module.configure_optimizers()
        assert asked_for[-1] is want, (device, scaler, fused, asked_for[-1])


def test_config_that_does_not_match_the_data_is_refused(data_path, tmp_path):
    module = LeWMModule(LeWMConfig(**{**TINY, "image_size": 64, "frameskip": 4}))
    dm = LeWMDataModule(str(data_path), num_frames=4, frameskip=5, batch_size=8, num_workers=0)
    with pytest.raises(ValueError) as err:
        trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, dm)
    assert "32 px" in str(err.value) and "frameskip" in str(err.value)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_open_loop_prediction_term_against_a_frame_by_frame_rollout(data_path, k):
    """open_loop_frames=k: the prediction term is the mean squared error over the T-1 teacher-forced
    predictions and the last k frames predicted from the first T-k, each prediction fed back as the
    next input; checked against predicting one frame at a time with `predict` on the window."""
    torch.manual_seed(0)
    module, dm = make(data_path, None, open_loop_frames=k)
    dm.setup("fit")
    module.model.set_action_stats(dm.action_mean, dm.action_std)
    module.eval()  # no dropout: the two computations must agree exactly
    perturb_adaln(module.model)  # AdaLN-zero starts blind to the actions: make them count
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        pred_loss, _, emb = module.losses(batch)
        m = module.model
        actions = m.normalize_actions(batch["action"].float())  # (B, 3, fs*A)
        z = m.encode(batch["pixels"].permute(0, 1, 4, 2, 3)).double()
        T, W, c = z.shape[1], m.config.history, z.shape[1] - k
        teacher = m.predict(z[:, :-1].float(), m.encode_actions(actions)).double()
        # the actions matter, so a rollout fed the wrong blocks would not match below
        assert not torch.allclose(m.predict(z[:, :-1].float(), m.encode_actions(actions.flip(1))).double(),
                                  teacher, atol=1e-4)
        frames = [z[:, j] for j in range(c)]
        for j in range(c, T):  # predict frame j from the (at most W) frames before it, predictions included
            lo = max(0, j - W)
            window = torch.stack(frames[lo:j], 1).float()
            frames.append(m.predict(window, m.encode_actions(actions[:, lo:j]))[:, -1].double())
        opened = torch.stack(frames[c:], 1)
        errors = torch.cat([(teacher - z[:, 1:]) ** 2, (opened - z[:, c:]) ** 2], 1)
    torch.testing.assert_close(emb.double(), z, rtol=0, atol=1e-6)
    assert abs(float(pred_loss) - float(errors.mean())) < 1e-5 * float(errors.mean())
    assert abs(float(module._open_loop_mse) - float(((opened - z[:, c:]) ** 2).mean())) < 1e-5
    # the open-loop frames differ from teacher forcing once a prediction is fed back
    if k > 1:
        assert not torch.allclose(opened[:, -1], teacher[:, -1], atol=1e-4)


def test_open_loop_training_reduces_the_open_loop_error(data_path, tmp_path):
    def open_loop_mse(module, batch):
        module.eval()
        with torch.no_grad():
            module.losses(batch)
        return float(module._open_loop_mse)

    L.seed_everything(0)
    module, dm = make(data_path, tmp_path, open_loop_frames=3)
    dm.setup("fit")
    module.model.set_action_stats(dm.action_mean, dm.action_std)
    batch = next(iter(dm.val_dataloader()))
    before = open_loop_mse(module, batch)
    rec = LossRecorder()
    trainer(tmp_path, max_steps=40, callbacks=[rec], enable_checkpointing=False).fit(module, dm)
    assert np.isfinite(rec.losses).all()
    # the rollout is trained through: its error on held-out clips falls (0.05 -> 4e-4 here)
    assert open_loop_mse(module, batch) < 0.1 * before


def test_every_rank_gets_batches_when_its_share_is_below_one_batch(data_path):
    """drop_last is decided on each rank's share of the clips: on the whole set it left both ranks
    of a two-process run without a single batch (training would silently do nothing)."""
    from types import SimpleNamespace

    dm = LeWMDataModule(str(data_path), num_frames=4, frameskip=5, batch_size=16, num_workers=0, val_fraction=0.2)
    dm.setup("fit")
    size = len(dm.train_set)
    dm.hparams.batch_size = size - 1  # more than half the clips: the whole set still fills a batch
    lengths = []
    for rank in range(2):
        fresh = SimpleNamespace(batch_progress=SimpleNamespace(total=SimpleNamespace(processed=0)))  # no batch yet
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, limit_train_batches=1.0,
                                     fit_loop=SimpleNamespace(epoch_loop=fresh))
        lengths.append(len(dm.train_dataloader()))
    assert lengths == [1, 1]


def test_open_loop_frames_beyond_the_clip_are_a_clear_error(data_path, tmp_path):
    module, dm = make(data_path, tmp_path, open_loop_frames=4)  # clips of 4 frames: at most 3
    with pytest.raises(ValueError, match="open_loop_frames 4 needs clips of at least 5 frames"):
        trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, dm)
    with pytest.raises(ValueError, match="open_loop_frames must be >= 0"):
        LeWMModule(LeWMConfig(**TINY), open_loop_frames=-1)


@pytest.mark.parametrize("history", [2, 4])
def test_clips_must_span_exactly_the_history(data_path, tmp_path, history):
    # clips of 4 frames train positions 0..2: a history of 2 would not fit them, a history of 4
    # would leave position 3 untrained while rollouts use it
    module = LeWMModule(LeWMConfig(**{**TINY, "history": history}), num_directions=64)
    dm = LeWMDataModule(str(data_path), num_frames=4, frameskip=5, batch_size=16, val_fraction=0.2)
    with pytest.raises(ValueError, match=f"clips of 4 frames train a history of 3, the model has {history}: "
                                         "set data.num_frames = model.history \\+ 1"):
        trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, dm)


def test_missing_dataset_without_a_recipe_is_a_clear_error(tmp_path):
    dm = LeWMDataModule(str(tmp_path / "none.h5"))
    dm.prepare_data()
    with pytest.raises(Exception, match="python -m leworld.data.collect"):
        dm.setup("fit")


def test_train_cli_prints_an_input_error_in_a_line(tmp_path):
    """A missing dataset (and other errors of the input) is one line naming the problem and the
    fix, not the traceback of wherever in Lightning it surfaced; LEWORLD_TRACEBACK=1 shows it."""
    import os

    config = write_config(tmp_path)
    spec = yaml.safe_load(config.read_text())
    spec["data"]["generate"] = None  # no recipe: the file must exist
    config.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "train.py", "fit", "--config", str(config)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert (f"error: no dataset at {tmp_path / 'gen.h5'}: generate one with `python -m leworld.data.collect --env "
            "<tworoom or pusht> --resolution 32 --out") in out.stderr  # the model's frame size, from the config
    assert "(DatasetError; LEWORLD_TRACEBACK=1 shows where it was raised)" in out.stderr
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LEWORLD_TRACEBACK": "1"})
    assert out.returncode == 1 and "Traceback" in out.stderr and "DatasetError: no dataset at" in out.stderr
    # a NaN loss, a path that cannot be created, a step count Lightning refuses: each in a line too
    config = write_config(tmp_path)
    cases = [(["--model.lr", "1e12", "--trainer.gradient_clip_val", "0"], "is nan at step"),
             (["--data.path", str(tmp_path / "a_file" / "d.h5")], "choose another path for the dataset"),
             (["--trainer.max_steps", "-5"], "max_steps")]
    (tmp_path / "a_file").write_text("")
    for extra, message in cases:
        out = subprocess.run([sys.executable, "train.py", "fit", "--config", str(config), *extra], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 1 and "Traceback" not in out.stderr and message in out.stderr, out.stderr[-3000:]


def test_train_cli_refuses_settings_no_run_can_use_before_the_work_they_would_waste(tmp_path):
    """Clips that do not fit the model are refused before the dataset is generated; SIGReg or
    compile settings no run can use when the module is built; frames too big for memory
    (data.frames_on_device) in a line, not a traceback."""
    config = write_config(tmp_path)  # history 1, clips of 2 frames; its dataset is generated on first use

    def train(*extra, wrapper=None):
        start = [sys.executable, "train.py"] if wrapper is None else [sys.executable, "-c", wrapper]
        return subprocess.run([*start, "fit", "--config", str(config), *extra], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    out = train("--model.model.history", "3")
    assert out.returncode == 2 and "data.num_frames is 2, which trains a history of 1, but model.model.history is 3: " \
        "set data.num_frames = model.model.history + 1" in out.stderr, out.stderr[-3000:]
    out = train("--data.frameskip", "4", "--model.open_loop_frames", "2")
    assert out.returncode == 2 and "data.frameskip is 4 but model.model.frameskip is 5" in out.stderr
    assert "model.open_loop_frames 2 needs clips of at least 3 frames" in out.stderr
    for extra, message in ((["--model.num_directions", "0"], "num_directions is the number K of SIGReg's random "
                             "directions per step: an integer >= 1"),
                           (["--model.t_max", "-1"], "num_knots >= 2 knots on [0, t_max], t_max > 0"),
                           (["--model.compile", "nosuchmode"], "unknown compile mode 'nosuchmode': choose one of")):
        out = train(*extra)
        assert out.returncode == 1 and "Traceback" not in out.stderr and message in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "gen.h5").exists()  # nothing generated for runs that could not train
    low_memory = ("import runpy, sys\nimport leworld.data.datamodule as dm\n"
                  "dm.free_memory_bytes = lambda device: 1 << 10  # 1 KiB free: less than the frames need\n"
                  "sys.argv = ['train.py', *sys.argv[1:]]\nrunpy.run_path('train.py', run_name='__main__')")
    out = train("--data.frames_on_device", "true", wrapper=low_memory)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "error: data.frames_on_device needs" in out.stderr and "(MemoryError;" in out.stderr


def test_frames_to_device_copies_every_frame_in_file_order(data_path):
    store = EpisodeStore(data_path)
    frames = frames_to_device(store, "cpu", chunk=7, progress=False)  # 7 does not divide the frame count
    assert store.num_frames % 7 != 0
    assert frames.dtype == torch.uint8 and frames.shape == (store.num_frames, 32, 32, 3)
    assert torch.equal(frames, torch.from_numpy(store.read("pixels", slice(None))))


def test_frames_on_device_gives_the_batches_read_from_the_file(data_path):
    """Rows gathered from the frames in memory equal the pixels the loader reads from the file,
    batch by batch, in training and validation order."""
    batches = {}
    for on_device in (False, True):
        dm = LeWMDataModule(str(data_path), num_frames=4, frameskip=5, batch_size=16, num_workers=0,
                            val_fraction=0.2, frames_on_device=on_device)
        dm.setup("fit")
        loaded = []
        for loader in (dm.train_dataloader(), dm.val_dataloader()):
            for batch in loader:
                assert ("rows" in batch) == on_device and ("pixels" in batch) != on_device
                loaded.append(dm.on_after_batch_transfer(batch, 0))
        batches[on_device] = loaded
    assert len(batches[True]) == len(batches[False]) > 2
    for a, b in zip(batches[False], batches[True]):
        assert a.keys() == b.keys() == {"pixels", "action"}
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["action"], b["action"])


def test_training_with_frames_on_device_matches_reading_from_the_file(data_path, tmp_path):
    def run(root, on_device):
        L.seed_everything(0)
        module, dm = make(data_path, root, frames_on_device=on_device)
        rec = LossRecorder()
        trainer(root, max_steps=4, callbacks=[rec], enable_checkpointing=False).fit(module, dm)
        assert (dm.frames is not None) == on_device
        return module, rec.losses

    (ref, ref_losses), (dev, dev_losses) = run(tmp_path / "file", False), run(tmp_path / "dev", True)
    assert len(ref_losses) == 4 and ref_losses == dev_losses
    for (name, a), b in zip(ref.state_dict().items(), dev.state_dict().values()):
        assert torch.equal(a, b), name


def test_frames_that_do_not_fit_on_the_device_are_a_clear_error(data_path, monkeypatch):
    monkeypatch.setattr(datamodule_mod, "free_memory_bytes", lambda device: 10_000)
    with pytest.raises(MemoryError, match="data.frames_on_device false") as err:
        frames_to_device(EpisodeStore(data_path), "cpu", progress=False)
    assert "GiB" in str(err.value) and str(data_path) in str(err.value)


def test_processes_training_on_one_cpu_need_room_for_a_copy_of_the_frames_each(data_path, monkeypatch):
    """Every DDP process on the CPU holds its own copy of the frames: room for one and a half
    copies is enough for one process, not for two. Every process checks before any allocates, and
    all stop when one finds no room."""
    store = EpisodeStore(data_path)
    one = store.num_frames * store.resolution ** 2 * 3
    monkeypatch.setattr(datamodule_mod, "free_memory_bytes", lambda device: int(1.5 * one))
    assert datamodule_mod.frames_memory_error(store, "cpu") is None
    assert "(2 processes, a copy each)" in datamodule_mod.frames_memory_error(store, "cpu", copies=2)

    def trainer_of(devices, others_agree):
        strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce_boolean_decision=lambda ok, all: ok and others_agree)
        return SimpleNamespace(strategy=strategy, num_devices=devices, world_size=devices)

    LeWMDataModule._check_frames_fit(store, trainer_of(1, True))
    with pytest.raises(MemoryError, match=r"\(2 processes, a copy each\), but only"):
        LeWMDataModule._check_frames_fit(store, trainer_of(2, True))
    monkeypatch.setattr(datamodule_mod, "free_memory_bytes", lambda device: 3 * one)
    LeWMDataModule._check_frames_fit(store, trainer_of(2, True))
    with pytest.raises(MemoryError, match="do not fit in another process's memory"):
        LeWMDataModule._check_frames_fit(store, trainer_of(2, False))


class PretendFreeMemory(L.Callback):
    """Makes this process see `copies` copies' worth of the frames of the data at `path` as its
    free memory (set when the process builds its callbacks, before its data module loads frames)."""

    def __init__(self, path: str, copies: float):
        store = EpisodeStore(path)
        free = int(copies * store.num_frames * store.resolution ** 2 * 3)
        datamodule_mod.free_memory_bytes = lambda device: free


def test_two_ddp_processes_on_the_cpu_stop_when_two_copies_of_the_frames_do_not_fit(tmp_path):
    import os

    config = write_config(tmp_path, data={"frames_on_device": True}, strategy="ddp", devices=2, accelerator="cpu")
    collect("tworoom", episodes=6, steps=20, resolution=32, seed=0, out=tmp_path / "gen.h5", progress=False)
    spec = yaml.safe_load(config.read_text())
    spec["data"]["generate"] = None
    spec["trainer"]["callbacks"] = [{"class_path": "test_train.PretendFreeMemory",
                                     "init_args": {"path": str(tmp_path / "gen.h5"), "copies": 1.5}}]
    config.write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "train.py", "fit", "--config", str(config)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
    assert out.returncode != 0
    assert out.stderr.count("(2 processes, a copy each), but only") == 2, out.stderr[-3000:]
    assert out.stderr.count("(MemoryError; LEWORLD_TRACEBACK=1") == 2 and "Traceback" not in out.stderr
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_recalibrate_batchnorm_gives_the_average_of_the_batch_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Dropout(0.5))
    net.train()
    batches = [torch.randn(n, 4) * 3 + 1 for n in (5, 9, 7)]
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "tracked" not in k}
    assert recalibrate_batchnorm(net, net, batches) == 3
    hidden = [net[0](x).double().detach() for x in batches]
    want_mean = torch.stack([h.mean(0) for h in hidden]).mean(0)
    want_var = torch.stack([h.var(0, unbiased=True) for h in hidden]).mean(0)
    torch.testing.assert_close(net[1].running_mean.double(), want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net[1].running_var.double(), want_var, rtol=1e-6, atol=1e-6)
    assert net.training and net[1].momentum == 0.1  # mode and momentum restored
    for k, v in before.items():
        assert torch.equal(net.state_dict()[k], v), k
    # no batch at all, or a first batch that fails: the statistics it had are kept, not reset
    stats = {k: v.clone() for k, v in net[1].state_dict().items()}
    assert recalibrate_batchnorm(net, net, []) == 0

    def broken(batch):
        net(batch)
        raise RuntimeError("loader failed")

    with pytest.raises(RuntimeError, match="loader failed"):
        recalibrate_batchnorm(net, broken, batches)
    for k, v in stats.items():
        assert torch.equal(net[1].state_dict()[k], v), k


def test_exported_model_has_batchnorm_statistics_re_estimated_with_the_final_weights(data_path, tmp_path):
    """With bn_recalibration_batches, the exported BatchNorm statistics are the average batch
    statistics of the first training batches under the final weights, recomputed here from the
    BatchNorm inputs; the checkpoint keeps the running averages of training."""
    L.seed_everything(0)
    module, dm = make(data_path, tmp_path, bn_recalibration_batches=3)
    t = trainer(tmp_path, max_steps=4)
    t.fit(module, dm)
    exported = load_model(tmp_path / "model")
    ckpt = torch.load(t.checkpoint_callback.last_model_path or t.checkpoint_callback.best_model_path,
                      map_location="cpu", weights_only=False)["state_dict"]

    probe = LeWMModule(LeWMConfig(**TINY))
    probe.model.load_state_dict(exported.state_dict())
    norms = {name: m for name, m in probe.model.named_modules() if isinstance(m, torch.nn.BatchNorm1d)}
    assert set(norms) == {"projector.net.1", "pred_proj.net.1"}
    inputs = {name: [] for name in norms}
    for name, m in norms.items():
        m.register_forward_pre_hook(lambda mod, args, name=name: inputs[name].append(args[0].double()))
    probe.model.eval()
    for m in norms.values():
        m.train()
        m.momentum = 0.0  # normalise with batch statistics, as the re-estimation does, and keep the stats
    fresh = LeWMDataModule(str(data_path), num_frames=4, frameskip=5, batch_size=16, num_workers=0, val_fraction=0.2)
    fresh.setup("fit")
    with torch.no_grad():
        for i, batch in enumerate(fresh.train_dataloader()):
            if i == 3:
                break
            probe.losses(batch)
    for name in norms:
        want_mean = torch.stack([x.mean(0) for x in inputs[name]]).mean(0)
        want_var = torch.stack([x.var(0) for x in inputs[name]]).mean(0)
        got = dict(exported.named_buffers())
        torch.testing.assert_close(got[f"{name}.running_mean"].double(), want_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[f"{name}.running_var"].double(), want_var, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(ckpt[f"model.{name}.running_var"], got[f"{name}.running_var"])


@pytest.mark.parametrize("open_loop", [0, 2])
def test_recalibrate_command_matches_re_estimation_at_the_end_of_training(data_path, tmp_path, open_loop):
    """`python -m leworld.recalibrate` on a model exported without re-estimation gives the
    statistics that `bn_recalibration_batches` gives at the end of the same training run, also
    when the run's loss rolls out open loop (more passes through pred_proj's BatchNorm). The run's
    batch size and clip order (12 clips, shuffle seed 5) are read from what the model records."""
    from leworld.recalibrate import main as recalibrate_main

    def run(root, batches):
        L.seed_everything(0)
        module, dm = make(data_path, root, batch_size=12, shuffle_seed=5, bn_recalibration_batches=batches,
                          open_loop_frames=open_loop)
        trainer(root, max_steps=4, enable_checkpointing=False).fit(module, dm)
        return root / "model"

    at_end, plain = run(tmp_path / "a", 3), run(tmp_path / "b", 0)
    result = recalibrate_main(["--model", str(plain), "--out", str(tmp_path / "c"), "--batches", "3",
                               "--val-batches", "2", "--force"])
    assert result["batches"] == 3 and result["val_pred_loss_after"] > 0 and result["written"]
    want, got, old = (dict(load_model(p).state_dict()) for p in (at_end, tmp_path / "c", plain))
    for name, value in want.items():
        if "running" in name or "num_batches_tracked" in name:  # BatchNorm statistics
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(got[name], old[name]), name  # the weights are not touched
    assert any("running_var" in n and not torch.allclose(got[n], old[n]) for n in got)


def test_recalibrate_reads_the_recorded_split_and_clip_length_and_scores_validation_clips(data_path, tmp_path):
    """A run with split_seed 3 and 2-frame clips (history 1): the command averages over that run's
    training batches and reports the loss of its validation batches, both rebuilt here by hand;
    the export records what it did."""
    import itertools

    from leworld.checkpoint import model_extra
    from leworld.recalibrate import main as recalibrate_main

    def data_module():
        return LeWMDataModule(str(data_path), num_frames=2, frameskip=5, batch_size=16, num_workers=0,
                              val_fraction=0.2, split_seed=3)

    L.seed_everything(0)
    module = LeWMModule(LeWMConfig(**{**TINY, "history": 1}), lr=3e-3, num_directions=64, bn_recalibration_batches=0)
    trainer(tmp_path / "a", max_steps=3, enable_checkpointing=False).fit(module, data_module())
    result = recalibrate_main(["--model", str(tmp_path / "a" / "model"), "--out", str(tmp_path / "c"),
                               "--batches", "2", "--batch-size", "16", "--val-batches", "2", "--force"])
    dm = data_module()
    dm.setup("fit")
    by_hand = load_model(tmp_path / "a" / "model")
    check = LeWMModule(by_hand.config)
    check.model = by_hand
    assert recalibrate_batchnorm(by_hand, check.losses, itertools.islice(dm.train_dataloader(), 2)) == 2
    by_hand.eval()
    got = load_model(tmp_path / "c")
    for name, value in by_hand.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        val = [float(check.losses(b)[0]) for b in itertools.islice(dm.val_dataloader(), 2)]
    assert result["val_pred_loss_after"] == pytest.approx(sum(val) / 2, rel=1e-5)
    assert model_extra(tmp_path / "c")["bn_recalibration"] == {"batches": 2, "batch_size": 16}


def test_recalibrate_refuses_an_out_it_cannot_write_before_any_work(tmp_path):
    from leworld.recalibrate import main as recalibrate_main

    (tmp_path / "a_file").write_text("")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "model"):
        with pytest.raises(SystemExit, match=r"cannot write .*a_file is a file, not a directory"):
            recalibrate_main(["--model", str(tmp_path / "no_model_here"), "--out", str(out)])


def test_recalibrate_never_replaces_another_model_or_fills_a_run_directory(tmp_path, capsys):
    from leworld.checkpoint import export_model
    from leworld.recalibrate import main as recalibrate_main

    source, other = tmp_path / "source", tmp_path / "other"
    for d in (source, other):
        export_model(LeWorldModel(LeWMConfig(**TINY)), d)
    before = (other / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match=r"--out .*other already holds another model: .*--overwrite"):
        recalibrate_main(["--model", str(source), "--out", str(other)])
    (tmp_path / "run" / "version_0").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"--out .*run is a run directory"):
        recalibrate_main(["--model", str(source), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="does not record its training data"):  # --overwrite passes that check
        recalibrate_main(["--model", str(source), "--out", str(other), "--overwrite"])
    with pytest.raises(SystemExit, match=r"no_model_here"):  # a missing model is named as such
        recalibrate_main(["--model", str(tmp_path / "no_model_here")])
    assert (other / "model.safetensors").read_bytes() == before


def test_recalibrate_writes_nothing_when_the_validation_loss_gets_worse(data_path, tmp_path, monkeypatch):
    from leworld import recalibrate as recalibrate_mod

    L.seed_everything(0)
    module, dm = make(data_path, tmp_path / "a")
    trainer(tmp_path / "a", max_steps=2, enable_checkpointing=False).fit(module, dm)
    losses = iter([1.0, 2.0])  # before, after: worse
    monkeypatch.setattr(recalibrate_mod, "val_pred_loss", lambda *args: next(losses))
    with pytest.raises(SystemExit, match="got worse: nothing written"):
        recalibrate_mod.main(["--model", str(tmp_path / "a" / "model"), "--out", str(tmp_path / "c"),
                              "--batches", "2", "--batch-size", "16", "--val-batches", "1"])
    assert not (tmp_path / "c").exists()


def test_recalibrate_refuses_a_run_without_validation_episodes_unless_forced(data_path, tmp_path, capsys):
    """With no validation episodes the losses before and after were both reported as 0 and the
    model written as though checked."""
    from leworld.recalibrate import main as recalibrate_main

    L.seed_everything(0)
    module = LeWMModule(LeWMConfig(**TINY), lr=3e-3, num_directions=64)
    dm = LeWMDataModule(str(data_path), num_frames=4, frameskip=5, batch_size=16, num_workers=0, val_fraction=0.0)
    trainer(tmp_path / "a", max_steps=2, enable_checkpointing=False, limit_val_batches=0).fit(module, dm)
    args = ["--model", str(tmp_path / "a" / "model"), "--out", str(tmp_path / "c"), "--batches", "2"]
    with pytest.raises(SystemExit, match="val_fraction 0.0: .* holds out no validation episodes, so whether the "
                                         "re-estimate helps cannot be checked. Give --force"):
        recalibrate_main(args)
    assert not (tmp_path / "c").exists()
    result = recalibrate_main(args + ["--force"])
    assert result["written"] and not result["checked"] and (tmp_path / "c" / "model.safetensors").is_file()
    assert np.isnan(result["val_pred_loss_before"]) and np.isnan(result["val_pred_loss_after"])
    assert "not checked: no validation episodes" in capsys.readouterr().out


def test_a_recorded_relative_dataset_path_is_found_from_another_directory(tmp_path, monkeypatch):
    from leworld.checkpoint import recorded_data_path

    repo = tmp_path / "repo"
    model = repo / "runs" / "x" / "version_0" / "model"
    model.mkdir(parents=True)
    (repo / "data").mkdir()
    (repo / "data" / "d.h5").write_bytes(b"")
    monkeypatch.chdir(tmp_path)  # not the training directory
    assert recorded_data_path(model, "data/d.h5") == repo / "data" / "d.h5"
    assert recorded_data_path(model, "data/missing.h5") == Path("data/missing.h5")  # named as recorded
    assert recorded_data_path(model, None) is None
    monkeypatch.chdir(repo)
    assert recorded_data_path(model, "data/d.h5") == Path("data/d.h5")


def test_exported_models_are_readable_by_others(data_path, tmp_path):
    module, dm = make(data_path, tmp_path)
    trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, dm)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "model" / name).stat().st_mode & 0o777 == 0o644, name


def test_negative_bn_recalibration_batches_is_a_clear_error():
    with pytest.raises(ValueError, match="bn_recalibration_batches"):
        LeWMModule(LeWMConfig(**TINY), bn_recalibration_batches=-1)


def load_train_script(monkeypatch=None):
    """train.py as a module; with `monkeypatch`, set up for calling its main() in this process: its
    arguments are main()'s, not pytest's, and LEWORLD_KEEP_FREED_MEMORY=0 leaves this process's
    memory allocator as it is."""
    import importlib.util

    if monkeypatch is not None:
        monkeypatch.setenv("LEWORLD_KEEP_FREED_MEMORY", "0")
        monkeypatch.setattr(sys, "argv", ["train.py"])
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    return train_script


def write_config(tmp_path, data=None, model=None, **trainer):
    config = yaml.safe_load((ROOT / "configs" / "tworoom_tiny.yaml").read_text())
    config["trainer"].update({"max_steps": 3, "val_check_interval": None, "limit_val_batches": 1,
                              "log_every_n_steps": 1, "enable_progress_bar": False, **trainer})
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"save_last": True}}]
    config["model"]["model"].update(TINY | {"history": 1})
    config["model"]["num_directions"] = 64
    config["model"].update(model or {})
    config["data"].update({"path": str(tmp_path / "gen.h5"), "batch_size": 8, "num_workers": 0, **(data or {})})
    config["data"]["generate"].update({"episodes": 6, "steps": 20, "resolution": 32})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_cli_generates_data_trains_and_exports(tmp_path):
    config = write_config(tmp_path)
    out = subprocess.run([sys.executable, "train.py", "fit", "--config", str(config)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "gen.h5").is_file()
    run = tmp_path / "runs" / "tworoom_tiny" / "version_0"
    assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    model = load_model(run / "model")
    assert model.config.image_size == 32 and model.config.history == 1


def test_resuming_through_the_cli_trains_with_the_command_line_settings(tmp_path, monkeypatch, capsys):
    """Lightning >= 2.5.4 would replace the command line's --model.* values with the checkpoint's
    on --ckpt_path, so `--model.lambda_sigreg` would silently not switch the weight. train.py keeps
    them, prints what differs from the checkpoint, and refuses what cannot change on resume."""
    import json

    train_script = load_train_script(monkeypatch)
    config = write_config(tmp_path, model={"lambda_sigreg": 0.3})
    train_script.main(["fit", "--config", str(config), "--trainer.logger.init_args.name", "first"])
    ckpt = tmp_path / "runs" / "first" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    train_script.main(["fit", "--config", str(config), "--trainer.max_steps", "5", "--model.lambda_sigreg", "0.003",
                       "--ckpt_path", str(ckpt), "--trainer.logger.init_args.name", "resumed"])
    assert "lambda_sigreg: 0.003 (the checkpoint: 0.3)" in capsys.readouterr().err
    resumed = json.loads((tmp_path / "runs" / "resumed" / "version_0" / "model" / "config.json").read_text())
    assert resumed["extra"]["hparams"]["lambda_sigreg"] == 0.003 and resumed["extra"]["global_step"] == 5
    assert not any(k.startswith("_") for k in resumed["extra"]["hparams"])
    for override, message in ((["--model.model.pred_depth", "2"], "model.pred_depth: 2 (the checkpoint: 1)"),
                              (["--model.model.image_size", "64"], "model.image_size: 64 (the checkpoint: 32)"),
                              (["--model.lr", "0.5"], "lr: 0.5 (the checkpoint:"),
                              (["--model.weight_decay", "0.5"], "weight_decay: 0.5 (the checkpoint:"),
                              (["--model.fused", "true"], "fused: True (the checkpoint: None)"),
                              # the split and the clips: a new split would hold out episodes the model trained on
                              (["--data.split_seed", "7"], "data.split_seed: 7 (the checkpoint: 0)"),
                              (["--data.val_fraction", "0.3"], "data.val_fraction: 0.3 (the checkpoint: 0.1)"),
                              (["--data.frameskip", "2"], "data.frameskip: 2 (the checkpoint: 5)")):
        with pytest.raises(SystemExit) as exit_info:
            train_script.main(["fit", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.max_steps", "5",
                               *override])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "cannot resume" in err and message in err, err
        assert f"--config {ckpt.parent.parent / 'config.yaml'}" in err  # how to resume as the run was
    assert not (tmp_path / "runs" / "tworoom_tiny").exists()  # each refused before a run directory was made
    with pytest.raises(SystemExit) as exit_info:  # a typo in the path stops before any work
        train_script.main(["fit", "--config", str(config), "--ckpt_path", str(ckpt.with_name("lsat.ckpt"))])
    assert exit_info.value.code == 2 and "lsat.ckpt: no such checkpoint file" in capsys.readouterr().err
    # a finished run resumed with its own max_steps would train nothing and export nothing
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["fit", "--config", str(config), "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "has trained 3 steps and trainer.max_steps is 3" in err
    assert "--trainer.max_steps 6" in err


def test_ckpt_path_last_resumes_the_newest_run_of_the_config(tmp_path, monkeypatch, capsys):
    """Lightning looks for `last` in the new version folder a resumed run opens, finds nothing and
    trains from scratch; train.py resolves it to the newest version's last.ckpt and checks it."""
    import json

    train_script = load_train_script(monkeypatch)
    config = write_config(tmp_path)
    run = tmp_path / "runs" / "tworoom_tiny"
    with pytest.raises(SystemExit) as exit_info:  # nothing to resume yet
        train_script.main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert exit_info.value.code == 2 and f"--ckpt_path last: no last.ckpt in {run}" in capsys.readouterr().err
    for version in range(11):  # version_10 is the newest: numeric, not lexical order
        (run / f"version_{version}" / "checkpoints").mkdir(parents=True)
    train_script.main(["fit", "--config", str(config), "--trainer.max_steps", "4"])  # opens version_11
    newest = run / "version_11" / "checkpoints" / "last.ckpt"
    shutil.copy(newest, run / "version_10" / "checkpoints" / "last.ckpt")
    shutil.copy(newest, run / "version_2" / "checkpoints" / "last.ckpt")
    (run / "version_10" / "checkpoints" / "last.ckpt").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # the newest run's checkpoint, checked like a given file
        train_script.main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "4"])
    err = capsys.readouterr().err
    assert f"--ckpt_path last is {newest}" in err and "has trained 4 steps and trainer.max_steps is 4" in err
    train_script.main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "6"])
    resumed = json.loads((run / "version_12" / "model" / "config.json").read_text())
    assert resumed["extra"]["global_step"] == 6


def test_a_resume_reads_the_dataset_it_trained_on_wherever_the_file_is(tmp_path, monkeypatch, capsys):
    """Another dataset would be normalised with the checkpoint's action statistics and split anew:
    the data module refuses a file that holds another dataset, before a step, and a moved copy of
    the dataset resumes. (New split settings are refused by the CLI: the test above.)"""
    import shutil

    train_script = load_train_script(monkeypatch)
    config = write_config(tmp_path)
    train_script.main(["fit", "--config", str(config), "--trainer.logger.init_args.name", "first"])
    ckpt = tmp_path / "runs" / "first" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()

    # another dataset under a new path: refused when the checkpoint is restored, before a step
    from leworld.data.collect import collect
    other_data = collect("tworoom", out=tmp_path / "other.h5", episodes=6, steps=20, resolution=32, seed=1,
                         progress=False)
    with pytest.raises(ValueError, match=r"other.h5 does not hold the dataset .*last.ckpt was trained on:") as info:
        train_script.main(["fit", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.max_steps", "5",
                           "--data.path", str(other_data), "--trainer.logger.init_args.name", "other"])
    assert "\n  seed: 1 (the checkpoint's: 0)" in str(info.value)
    assert not list((tmp_path / "runs" / "other").rglob("*.ckpt"))
    # scoring the checkpoint on other data, with another split, is no resume: allowed, also at max_steps
    capsys.readouterr()
    train_script.main(["validate", "--config", str(config), "--ckpt_path", str(ckpt), "--data.path", str(other_data),
                       "--data.split_seed", "7", "--trainer.logger.init_args.name", "scored"])
    err = capsys.readouterr().err
    assert "running " in err and "data.split_seed: 7 (the checkpoint: 0)" in err and "cannot resume" not in err

    # the same dataset, moved: the new path is printed and the run resumes
    moved = tmp_path / "moved.h5"
    shutil.move(tmp_path / "gen.h5", moved)
    train_script.main(["fit", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.max_steps", "5",
                       "--data.path", str(moved), "--trainer.logger.init_args.name", "moved"])
    assert f"data.path: {str(moved)!r}" in capsys.readouterr().err
    assert torch.load(tmp_path / "runs" / "moved" / "version_0" / "checkpoints" / "last.ckpt",
                      weights_only=True)["global_step"] == 5


@pytest.mark.parametrize("name", ["tworoom_tiny.yaml", "pusht.yaml"])
def test_a_shipped_config_trains_without_a_logger(tmp_path, monkeypatch, name):
    """`--trainer.logger false` (README: runs are then not versioned) must work with the callbacks
    a shipped config lists: Lightning's LearningRateMonitor, once listed there, refused to run
    without a logger (the module logs `train/lr` itself)."""

    train_script = load_train_script(monkeypatch)
    config = write_config(tmp_path, max_steps=2)
    shipped = yaml.safe_load((ROOT / "configs" / name).read_text())["trainer"]["callbacks"]
    spec = yaml.safe_load(config.read_text())
    spec["trainer"]["callbacks"] = shipped
    spec["trainer"]["default_root_dir"] = str(tmp_path / "plain")
    config.write_text(yaml.safe_dump(spec))
    train_script.main(["fit", "--config", str(config), "--trainer.logger", "false"])
    assert load_model(tmp_path / "plain" / "model").config.image_size == 32


def test_resume_differences_compare_plain_values():
    saved = {"lambda_sigreg": 0.3, "lambda_schedule": [(100, 0.1)], "_instantiator": "x",
             "model": {"pred_depth": 1, "cnn_channels": (8, 16)}, "only_in_old_checkpoints": 1}
    current = {"lambda_sigreg": 0.3, "lambda_schedule": [[100, 0.1]], "model": {"pred_depth": 1, "cnn_channels": [8, 16]}}

    train_script = load_train_script()
    assert train_script.resume_differences(saved, current) == {}
    current["model"]["cnn_channels"] = [8, 32]
    current["lambda_schedule"] = None
    assert train_script.resume_differences(saved, current) == {
        "lambda_schedule": ([[100, 0.1]], None), "model.cnn_channels": ([8, 16], [8, 32])}


@pytest.mark.parametrize("stop, name", [(5, "epoch=0-step=5.ckpt"), (7, "epoch=1-step=7.ckpt"), (7, "last.ckpt")],
                         ids=["at-the-epochs-last-batch", "inside-the-second-epoch", "written-as-the-stopped-run-ends"])
def test_two_process_ddp_resumes_identically(tmp_path, stop, name):
    """Under DDP the resumed epoch's clips are rotated over both ranks' shards together: the
    model after a resume is the uninterrupted one, from a checkpoint written inside an epoch, at
    its last batch, or when a run stopped inside an epoch ends (Lightning then counts that epoch as
    done). The data gives 80 training clips: 5 batches of 8 per rank and epoch."""
    import os

    def fit(run, interrupt=False, ckpt=None):
        config = write_config(tmp_path, strategy="ddp", devices=2, accelerator="cpu", max_steps=12)
        spec = yaml.safe_load(config.read_text())
        spec["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                         "init_args": {"every_n_train_steps": stop, "save_top_k": -1}}]
        if name == "last.ckpt":  # only the checkpoint written at the end of the stopped run
            spec["trainer"]["callbacks"][0]["init_args"] = {"every_n_train_steps": 100, "save_last": True}
        if interrupt:  # stops after step `stop`; the schedule still runs to 12 steps
            spec["trainer"]["callbacks"].append({"class_path": "test_train.StopAtStep", "init_args": {"step": stop}})
        config.write_text(yaml.safe_dump(spec))
        cmd = [sys.executable, "train.py", "fit", "--config", str(config), "--trainer.logger.init_args.name", run]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
        out = subprocess.run([*cmd, *(["--ckpt_path", str(ckpt)] if ckpt else [])], cwd=ROOT, capture_output=True,
                             text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return tmp_path / "runs" / run / "version_0"

    from safetensors.torch import load_file

    straight = fit("straight")
    first = fit("first", interrupt=True)
    ckpt = first / "checkpoints" / name  # where in its epoch the checkpoint falls
    assert ckpt.is_file(), sorted(p.name for p in ckpt.parent.iterdir())
    resumed = fit("resumed", ckpt=ckpt)
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs after a DDP resume")


def test_ddp_ranks_draw_their_own_dropout_and_the_seed_reproduces_them(tmp_path):
    """Every process is seeded alike; without forking the streams, both ranks would drop the same
    units of their clips at every step, unlike one process with the whole batch. The forked
    streams differ between the ranks at every step, and a second run of the same seed repeats them."""
    import os

    runs = []
    for run in ("a", "b"):
        out = tmp_path / run
        out.mkdir()
        config = write_config(tmp_path, strategy="ddp", devices=2, accelerator="cpu", max_steps=3)
        spec = yaml.safe_load(config.read_text())
        spec["trainer"]["callbacks"] = [{"class_path": "test_train.RecordStreams", "init_args": {"out": str(out)}}]
        config.write_text(yaml.safe_dump(spec))
        proc = subprocess.run([sys.executable, "train.py", "fit", "--config", str(config),
                               "--trainer.logger.init_args.name", run], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append([(out / f"rank{r}.txt").read_text().splitlines() for r in range(2)])
    (zero, one), again = runs
    assert len(zero) == len(one) == 3 and all(a.split()[1] != b.split()[1] for a, b in zip(zero, one))
    assert again == [zero, one]


@pytest.mark.parametrize("every_step", [True, False], ids=["cpu-check", "deferred-check"])
def test_a_nan_on_one_process_stops_every_process_before_a_checkpoint(tmp_path, every_step):
    """A NaN on one rank spoils every rank's weights through the gradient all-reduce, so the check
    is reduced over the ranks: both stop with the error (not a hung collective) and rank 0 writes
    no checkpoint after the bad step."""
    import os

    config = write_config(tmp_path, strategy="ddp", devices=2, accelerator="cpu", max_steps=12, log_every_n_steps=50)
    spec = yaml.safe_load(config.read_text())
    spec["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": 1, "save_top_k": -1}},
        {"class_path": "test_train.SpoilGradient", "init_args": {"at": 3, "rank": 1}},
        {"class_path": "test_train.CheckFiniteEveryStep", "init_args": {"every_step": every_step}}]
    config.write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "train.py", "fit", "--config", str(config)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
    assert out.returncode != 0
    # each process prints its error in a line (FloatingPointError), not a traceback
    assert "error: loss is nan at step 3" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    # rank 0 learns it from rank 1 (checked every step), or from its own gradient (NaN after the all-reduce)
    assert re.search(r"error: (another process had a non-finite loss or gradient|the gradient norm is "
                     r"nan \(loss [0-9.]+\)) at step 3", out.stderr), out.stderr[-3000:]
    assert out.stderr.count("(FloatingPointError; LEWORLD_TRACEBACK=1 shows where it was raised)") == 2
    saved = sorted((tmp_path / "runs" / "tworoom_tiny" / "version_0" / "checkpoints").glob("*.ckpt"))
    steps = sorted(torch.load(p, map_location="cpu", weights_only=False)["global_step"] for p in saved)
    assert steps == [1, 2, 3]  # written after steps 1-3; the weights of step 3's update are never saved
    for p in saved:
        state = torch.load(p, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), p.name


@pytest.mark.parametrize("options", [False, True], ids=["file", "frames-on-device-and-bn-re-estimation"])
def test_two_process_ddp_training_runs(tmp_path, options):
    config = write_config(tmp_path, data={"frames_on_device": options},
                          model={"bn_recalibration_batches": 2 if options else 0}, strategy="ddp", devices=2,
                          accelerator="cpu")
    out = subprocess.run([sys.executable, "train.py", "fit", "--config", str(config)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert load_model(tmp_path / "runs" / "tworoom_tiny" / "version_0" / "model").config.embed_dim == 32
    assert ("re-estimated the BatchNorm statistics over 2 training batches" in out.stdout) == options


def test_compiled_training_matches_eager_and_exports_the_same_keys(data_path, tmp_path):
    """`compile=True` compiles the network in place: the same losses as eager (to float32
    rounding) and an exported model with the same parameter names that loads without the compiler."""
    def run(root, compile):
        L.seed_everything(0)
        module, dm = make(data_path, root, compile=compile, lambda_sigreg=0.09, bn_recalibration_batches=2)
        rec = LossRecorder()
        trainer(root, max_steps=3, callbacks=[rec], enable_checkpointing=False).fit(module, dm)
        return module, rec.losses

    eager, eager_losses = run(tmp_path / "eager", False)
    compiled, compiled_losses = run(tmp_path / "compiled", True)
    parts = lambda m: [m.model.encoder, m.model.projector, m.model.action_encoder, m.model.predictor, m.model.pred_proj]
    assert all(p._compiled_call_impl is not None for p in parts(compiled))
    assert all(p._compiled_call_impl is None for p in parts(eager))
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-4, atol=1e-5)
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()
    exported = load_model(tmp_path / "compiled" / "model")
    pixels = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)
    compiled.model.eval()
    torch.testing.assert_close(exported.encode(pixels), compiled.model.encode(pixels), rtol=1e-5, atol=1e-5)
    # the compiled run re-estimated its BatchNorm statistics as an eager copy of its weights does
    copy = LeWMModule(LeWMConfig(**TINY))
    copy.model.load_state_dict(exported.state_dict())
    _, dm = make(data_path, tmp_path)
    dm.setup("fit")
    recalibrate_batchnorm(copy.model, copy.losses, itertools.islice(dm.train_dataloader(), 2))
    for name, value in copy.model.state_dict().items():
        if "running" in name:
            torch.testing.assert_close(exported.state_dict()[name], value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_builds_through_the_cli(name, build_cli):
    """Each config in configs/ parses and instantiates (model, data module, trainer) without running."""
    cli = build_cli(["--config", str(ROOT / "configs" / name)])
    module, dm = cli.model, cli.datamodule
    assert dm.hparams.num_frames == module.config.history + 1  # clips feed the whole history
    assert dm.hparams.frameskip == module.config.frameskip
    if name == "pusht_tiny_long.yaml":  # the Push-T CPU recipe: 0.09, then 0.003 from step 6,000
        assert cli.trainer.max_steps == 12000
        assert [module.lambda_at(s) for s in (0, 5999, 6000, 11999)] == [0.09, 0.09, 0.003, 0.003]


@pytest.mark.parametrize("resolution", [48, 16])  # larger and smaller than the model's 32 px
def test_a_generate_resolution_the_model_cannot_take_stops_before_generating(tmp_path, monkeypatch, capsys,
                                                                            resolution):

    train_script = load_train_script(monkeypatch)
    config = write_config(tmp_path)  # 32 px model, 32 px data
    with pytest.raises(SystemExit):
        train_script.main(["fit", "--config", str(config), "--data.generate.resolution", str(resolution)])
    assert f"data.generate.resolution is {resolution} px but model.model.image_size is 32 px" in capsys.readouterr().err
    assert not (tmp_path / "gen.h5").exists()


@pytest.mark.parametrize("accelerator, cuda, precision", [
    ("cpu", True, "32-true"),  # a GPU machine told to train on its CPU: float32, not CPU bf16
    ("auto", False, "32-true"),
    ("auto", True, "bf16-mixed"),  # a GPU machine: bf16 mixed precision
])
def test_default_precision_follows_the_chosen_accelerator(build_cli, monkeypatch, accelerator, cuda, precision):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cli = build_cli(["--config", str(ROOT / "configs" / "tworoom_tiny.yaml"), "--trainer.accelerator", accelerator],
                    trainer_defaults={"precision": None})
    assert cli.config.trainer.precision == precision


def test_a_resumed_run_trains_its_first_step_at_its_own_schedules_rate(data_path, tmp_path):
    """Resumed with a longer run (max_steps 4 -> 10), every step, the first included, trains at the
    rate of the new schedule; the restored optimiser held the old schedule's rate for that step."""
    import math

    L.seed_everything(0)
    module, dm = make(data_path, tmp_path / "a")
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer(tmp_path / "a", max_steps=4, callbacks=[ckpt]).fit(module, dm)
    module, dm = make(data_path, tmp_path / "b")
    rec = RecordRate()
    trainer(tmp_path / "b", max_steps=10, callbacks=[rec], enable_checkpointing=False).fit(
        module, dm, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    lr, total = 3e-3, 10
    warmup = max(1, round(0.01 * total))
    want = {s: lr * ((s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
            for s in range(2, 10)}
    assert rec.rates.keys() == want.keys()
    for s in want:
        assert rec.rates[s] == pytest.approx(want[s], rel=1e-12), s


class RecordRate(L.Callback):
    """The learning rate each optimiser step trains at."""

    def __init__(self):
        self.rates = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.rates[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_zero(data_path, tmp_path):
    """warmup_fraction 0.25 of 12 steps: 3 warm-up steps at lr/3, 2lr/3, lr, then step s >= 3 at
    lr (1 + cos(pi (s - 3) / 9)) / 2, written out here step by step."""
    import math

    module, dm = make(data_path, tmp_path, warmup_fraction=0.25)
    rec = RecordRate()
    trainer(tmp_path, max_steps=12, callbacks=[rec], enable_checkpointing=False).fit(module, dm)
    lr = 3e-3
    want = [lr / 3, 2 * lr / 3, lr] + [lr * (1 + math.cos(math.pi * (s - 3) / 9)) / 2 for s in range(3, 12)]
    assert sorted(rec.rates) == list(range(12))
    for s in range(12):
        assert rec.rates[s] == pytest.approx(want[s], rel=1e-12), s


def test_sigreg_term_regularises_the_embeddings_of_every_frame(data_path):
    """The loss's SIGReg term is the statistic of all B x T embeddings of the clip, not of a part."""
    from leworld.sigreg import sigreg

    module, dm = make(data_path, "unused")
    dm.setup("fit")
    module.model.set_action_stats(torch.as_tensor(dm.action_mean), torch.as_tensor(dm.action_std))
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        pred_loss, reg, emb = module.losses(batch)
        assert emb.shape[:2] == (16, 4)
        want = sigreg(emb, step=0, num_directions=64, num_knots=module.hparams.num_knots,
                      t_max=module.hparams.t_max, seed=module.hparams.sigreg_seed)
        first = sigreg(emb[:, :1], step=0, num_directions=64, num_knots=module.hparams.num_knots,
                       t_max=module.hparams.t_max, seed=module.hparams.sigreg_seed)
    assert float(reg) == pytest.approx(float(want), rel=1e-6) and abs(float(first) - float(want)) > 1e-3


def test_sigreg_term_follows_the_step_and_the_modules_sigreg_settings(data_path, monkeypatch):
    """The loss draws SIGReg's directions for the optimiser step it is at (new ones every step), with
    the module's seed, knots, t_max and direction device; checked at step 7 with non-default settings."""
    import leworld.module as module_mod
    from leworld.sigreg import sigreg

    torch.manual_seed(0)
    module, dm = make(data_path, "unused", sigreg_seed=5, num_knots=9, t_max=2.0)
    dm.setup("fit")
    module.model.set_action_stats(torch.as_tensor(dm.action_mean), torch.as_tensor(dm.action_std))
    module._directions_device = "cpu"
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return sigreg(*args, **kwargs)

    monkeypatch.setattr(module_mod, "sigreg", recording)
    monkeypatch.setattr(LeWMModule, "global_step", property(lambda self: 7))
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        _, reg, emb = module.losses(batch)
        want = sigreg(emb, step=7, num_directions=64, num_knots=9, t_max=2.0, seed=5)
        others = [sigreg(emb, **{**dict(step=7, num_directions=64, num_knots=9, t_max=2.0, seed=5), **change})
                  for change in ({"step": 0}, {"seed": 0}, {"num_knots": 17}, {"t_max": 3.0})]
    assert float(reg) == pytest.approx(float(want), rel=1e-6)
    for other in others:  # each setting changes the value (by far more than the match above allows)
        assert abs(float(other) - float(want)) > 1e-5 * float(want)
    assert calls[-1]["directions_device"] == "cpu"


def test_the_encoder_learns_from_both_sides_of_the_prediction(data_path):
    """No stop-gradient anywhere in the prediction term: the encoder's gradient is that of
    mse(predict(enc(x_t), a_t), enc(x_t+1)) through the predictor's input and through the target,
    as computed here by hand; detaching either side gives another gradient."""
    torch.manual_seed(0)
    module, dm = make(data_path, None)
    dm.setup("fit")
    module.model.set_action_stats(dm.action_mean, dm.action_std)
    module.eval()  # no dropout, BatchNorm on running statistics: the same function twice
    perturb_adaln(module.model)
    batch = next(iter(dm.train_dataloader()))
    m = module.model
    params = [p for n, p in m.named_parameters() if n.startswith("encoder.")]

    def grads(loss):
        return torch.autograd.grad(loss, params)

    got = grads(module.losses(batch)[0])
    pixels = batch["pixels"].permute(0, 1, 4, 2, 3)
    act = m.encode_actions(m.normalize_actions(batch["action"].float()))

    def by_hand(detach_input=False, detach_target=False):
        z = m.encode(pixels)
        inp, target = z[:, :-1], z[:, 1:]
        inp = inp.detach() if detach_input else inp
        target = target.detach() if detach_target else target
        return grads(((m.predict(inp, act) - target) ** 2).mean())

    for a, b in zip(got, by_hand()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    for wrong in (by_hand(detach_input=True), by_hand(detach_target=True)):
        assert max(float((a - b).abs().max()) for a, b in zip(got, wrong)) > 1e-3 * max(
            float(a.abs().max()) for a in got)


@pytest.mark.parametrize("fraction, total", [(0.3, 12), (0.25, 12), (0.0, 5)])
def test_the_schedule_rounds_its_warm_up_and_stays_at_zero_after_the_last_step(fraction, total):
    """warm-up = round(fraction x steps) (at least 1): 0.3 x 12 = 3.6 gives 4 steps; the cosine
    reaches 0 at the last step and stays there (a run that goes on, say resumed with more steps,
    does not climb back up)."""
    import math
    from types import SimpleNamespace

    module = LeWMModule(LeWMConfig(**TINY), lr=1e-3, warmup_fraction=fraction)
    module._trainer = SimpleNamespace(estimated_stepping_batches=total, precision_plugin=None)
    rate = module.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    warm = max(1, math.floor(fraction * total + 0.5))
    assert [rate(s) for s in range(warm)] == pytest.approx([(s + 1) / warm for s in range(warm)], rel=1e-12)
    for s in range(warm, total):
        assert rate(s) == pytest.approx((1 + math.cos(math.pi * (s - warm) / (total - warm))) / 2, rel=1e-12, abs=1e-15)
    assert [rate(s) for s in range(total, total + 8)] == [0.0] * 8


def test_the_open_loop_monitor_holds_no_graph(data_path):
    """The logged open-loop error is a detached number: it must not keep the step's graph alive."""
    module, dm = make(data_path, None, open_loop_frames=2)
    dm.setup("fit")
    module.model.set_action_stats(dm.action_mean, dm.action_std)
    module.train()
    pred_loss, _, _ = module.losses(next(iter(dm.train_dataloader())))
    assert pred_loss.requires_grad and not module._open_loop_mse.requires_grad


def test_validation_loss_uses_the_sigreg_weight_in_force(data_path, tmp_path):
    """With a schedule, val/loss is val/pred_loss + lambda(step) * val/sigreg at the step it ran."""
    module, dm = make(data_path, tmp_path, lambda_sigreg=0.5, lambda_schedule=[[2, 3.0]])
    t = trainer(tmp_path, max_steps=4, val_check_interval=4, enable_checkpointing=False)
    t.fit(module, dm)
    m = t.callback_metrics
    assert float(m["val/sigreg"]) > 0
    assert float(m["val/loss"]) == pytest.approx(float(m["val/pred_loss"]) + 3.0 * float(m["val/sigreg"]), rel=1e-6)


def test_a_run_limited_by_time_alone_is_told_what_the_schedule_needs(data_path, tmp_path):
    module, dm = make(data_path, tmp_path)
    with pytest.raises(ValueError, match="needs the run's length: set trainer.max_steps or trainer.max_epochs"):
        trainer(tmp_path, max_steps=-1, max_epochs=-1, max_time="00:00:00:05").fit(module, dm)


def test_train_cli_defaults_follow_the_paper_where_a_config_says_nothing(tmp_path):
    """A config without trainer settings trains with clipping 1.0, seed 0, logs every 10 steps and
    writes under runs/: the CLI's own defaults, not Lightning's (no clipping, no seed, 50, cwd)."""
    config = yaml.safe_load((ROOT / "configs" / "tworoom_tiny.yaml").read_text())
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"model": config["model"], "data": config["data"]}))
    out = subprocess.run([sys.executable, "train.py", "fit", "--config", str(bare), "--print_config"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    resolved = yaml.safe_load(out.stdout)
    assert resolved["seed_everything"] == 0
    trainer = resolved["trainer"]
    assert trainer["gradient_clip_val"] == 1.0 and trainer["log_every_n_steps"] == 10
    assert trainer["default_root_dir"] == "runs" and trainer["precision"] is None  # chosen per device at start
