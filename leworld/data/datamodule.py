"""LightningDataModule over an HDF5 episode store, generating the dataset first if asked to.

Example:
    >>> from leworld.data.datamodule import CollectSpec, LeWMDataModule
    >>> dm = LeWMDataModule("data/tworoom_64.h5", batch_size=64,
    ...                     generate=CollectSpec(env="tworoom", episodes=500, resolution=64))
    >>> dm.prepare_data(); dm.setup("fit")   # collects the data if the file is missing
    >>> dm.action_mean, dm.action_std        # training-split statistics, saved with the model

Batches hold `pixels` (B, T, Hp, Wp, C) uint8 (permuted and normalised on the device) and
`action` (B, T-1, frameskip*A) raw actions (z-scored by the model with these statistics).

With `frames_on_device=True` every frame of the file is copied once, as uint8, into the memory of
the device that trains (GPU memory on a GPU; 2,000 Push-T episodes of 101 frames take 2.3 GiB at
64 px and 28.3 GiB at 224 px). The loaders then hand over only frame rows and actions, and each
batch's pixels are gathered on the device (`on_after_batch_transfer`): no file reads and no
host-to-device copy of pixels per step. The batches are the same as when reading from the file.
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from leworld.data.clips import ClipDataset, action_stats, collate_batch, split_episodes
from leworld.data.store import EpisodeStore


@dataclass
class CollectSpec:
    """How to generate the dataset when its file does not exist (see `leworld.data.collect`)."""

    env: str = "tworoom"  # environment name: tworoom or pusht
    episodes: int = 1000  # number of episodes
    steps: int = 100  # env steps per episode
    resolution: int = 224  # frame size in pixels
    policy: str | None = None  # data policy (None: the env's default)
    noise: float | None = None  # policy action noise std (None: the policy's default)
    seed: int = 0  # collection seed
    workers: int | None = None  # worker processes (None: the env's default)
    compression: str | None = None  # pixel compression: None, "lzf" or "gzip"
    supersample: int = 1  # Push-T: draw at this many times the resolution, then box-filter down


# The start of the warning Lightning gives when a run resumes inside an epoch with a loader that
# has no `state_dict`: the samplers below resume exactly without one.
_LIGHTNING_NOT_RESUMABLE = "You're resuming from a checkpoint that ended before the epoch ended"


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch), so resuming replays it.

    `resume_at(n, epoch)` makes the next pass start at position n of `epoch`'s order, for a run
    resumed from a checkpoint written after n clips of that epoch (all ranks together). Lightning
    counts a resumed epoch's batches on from where the checkpoint was, so the pass is rotated
    rather than cut: the clips at positions n, n + 1, ... come first, exactly those the
    uninterrupted run would have drawn next, and the pass keeps its length (a distributed
    sampler wrapping this one sizes its shards from it).

    The epoch Lightning announces (`set_epoch`) is not always the data's: a run stopped inside an
    epoch (`max_time`, `max_steps` raised later, a callback) counts that epoch as a new one when it
    resumes. So the first epoch announced after `resume_at(n, epoch)` stands for `epoch`, and every
    later one keeps that offset."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0
        self._start = 0
        self._offset = 0  # the data's epoch minus the one Lightning announces
        self._resumed_epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        if self._resumed_epoch is not None:  # the first epoch announced after a resume is the resumed one
            self._offset, self._resumed_epoch = self._resumed_epoch - epoch, None
        self.epoch = epoch + self._offset

    def resume_at(self, position: int, epoch: int | None = None) -> None:
        self._start = int(position) % max(self.size, 1)
        if epoch is not None:
            self.epoch = self._resumed_epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        start, self._start = self._start, 0  # one resumed pass, then whole epochs
        return iter(order[start:] + order[:start])


class DistributedEpochSampler(DistributedSampler):
    """`EpochSampler`'s order, sharded over `num_replicas` processes: rank r takes positions
    r, r + R, r + 2R, ... of the epoch's order (padded from its start to a multiple of R).

    Lightning leaves a DistributedSampler in place. Its own wrapper for other samplers would
    shuffle the positions again with a generator of its own, so a resumed epoch could not start
    where the checkpoint left it. Here `resume_at(n)` rotates the whole order by n before the
    split: with n a multiple of R every rank continues its own shard exactly."""

    def __init__(self, size: int, seed: int, num_replicas: int, rank: int):
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False)
        self._order = EpochSampler(size, seed)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._order.set_epoch(epoch)

    def resume_at(self, position: int, epoch: int | None = None) -> None:
        self._order.resume_at(position, epoch)

    def __iter__(self):
        order = list(self._order)
        pad = self.total_size - len(order)  # to a multiple of the ranks, repeating the order as often as needed
        order += (order * -(-pad // max(len(order), 1)))[:pad]
        return iter(order[self.rank:self.total_size:self.num_replicas])


class FixedShuffleSampler(EpochSampler):
    """The same seeded permutation on every pass. Validation uses it so that a pass cut short by
    `limit_val_batches` still draws its clips from across all validation episodes (consecutive clips
    of a few episodes would make the SIGReg and effective-rank monitors meaningless), and every
    validation sees the same clips."""

    def set_epoch(self, epoch: int) -> None:
        pass


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (None where that is not known)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return None


def frames_to_device(store: EpisodeStore, device: torch.device | str, chunk: int = 512,
                     progress: bool = True) -> torch.Tensor:
    """All frames of `store` as one uint8 tensor (F, R, R, 3) on `device`, in file row order.

    Copied `chunk` frames at a time through one host buffer, so the host never holds more than a
    chunk. Raises a `MemoryError` that names the fix when the device has less free memory than the
    frames need.
    """
    device = torch.device(device)
    r, num = store.resolution, store.num_frames
    need = num * r * r * 3
    free = free_memory_bytes(device)
    if free is not None and need > free:
        raise MemoryError(
            f"data.frames_on_device needs {need / 2**30:.1f} GiB of {device} memory for the {num:,} frames of "
            f"{store.path}, but only {free / 2**30:.1f} GiB is free: set data.frames_on_device false to read "
            "frames from the file, or use fewer episodes or a lower resolution")
    frames = torch.empty((num, r, r, 3), dtype=torch.uint8, device=device)
    host = torch.empty((min(chunk, num), r, r, 3), dtype=torch.uint8, pin_memory=device.type == "cuda")
    bar = tqdm(total=num, desc=f"frames to {device}", unit="frame", unit_scale=True, disable=not progress)
    for start in range(0, num, chunk):
        stop = min(start + chunk, num)
        buf = host[: stop - start]
        store.read_into(np.arange(start, stop), buf.numpy())
        frames[start:stop].copy_(buf)  # synchronous: the host buffer is reused for the next chunk
        bar.update(stop - start)
    bar.close()
    return frames


class LeWMDataModule(L.LightningDataModule):
    def __init__(self, path: str = "data/tworoom.h5", num_frames: int = 4, frameskip: int = 5,
                 batch_size: int = 128, num_workers: int = 2, val_fraction: float = 0.1, split_seed: int = 0,
                 shuffle_seed: int = 0, generate: CollectSpec | None = None, frames_on_device: bool = False):
        """
        Args:
            path: HDF5 dataset written by `python -m leworld.data.collect`.
            num_frames: frames per training clip (history + 1).
            frameskip: env steps between kept frames; one action block = frameskip actions.
            batch_size: clips per batch (per process under DDP).
            num_workers: DataLoader worker processes (each opens the file itself).
            val_fraction: fraction of episodes held out for validation (split by episode).
            split_seed: seed of the episode split.
            shuffle_seed: seed of the training-clip order (combined with the epoch).
            generate: how to make the dataset if `path` does not exist; None means it must exist.
            frames_on_device: hold every frame in the training device's memory and gather each
                batch's pixels there, instead of reading them from the file in loader workers
                (which then only hand over frame rows and actions). Worth it on a GPU whose memory
                holds the frames beside the model; the batches are the same either way.
        """
        super().__init__()
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {batch_size}: the projector's BatchNorm needs "
                             "two clips to normalise a training batch")
        self.save_hyperparameters()
        self.path = Path(path)
        self.generate = generate
        self.action_mean: np.ndarray | None = None
        self.action_std: np.ndarray | None = None
        self.frames: torch.Tensor | None = None  # (F, R, R, 3) uint8 on the device, with frames_on_device

    def prepare_data(self) -> None:
        if self.path.exists() or self.generate is None:
            return
        from leworld.data.collect import collect

        spec = self._generate_spec()
        env = spec.pop("env")
        print(f"{self.path} does not exist: generating it ({spec['episodes']} {env} episodes)")
        try:
            collect(env, out=self.path, **spec)
        except ValueError as e:  # collect names its command-line flags: say where the value came from
            raise ValueError(f"data.generate: {e} (set it under data.generate in the config)") from None
        print(EpisodeStore(self.path).summary())

    def setup(self, stage: str | None = None) -> None:
        if self.action_mean is not None:
            return
        hp = self.hparams
        store = EpisodeStore(self.path)  # clear error if the file is missing
        self._check_generate_spec(store)
        self.metadata = store.metadata
        self.action_dim = store.action_dim
        self.resolution = store.resolution
        self.train_episodes, self.val_episodes = split_episodes(store.num_episodes, hp.val_fraction, hp.split_seed)
        read = not hp.frames_on_device
        self.train_set = ClipDataset(store, self.train_episodes, hp.num_frames, hp.frameskip, read_pixels=read)
        self.val_set = (ClipDataset(store, self.val_episodes, hp.num_frames, hp.frameskip, read_pixels=read)
                        if len(self.val_episodes) else None)
        self.action_mean, self.action_std = action_stats(store, self.train_episodes)
        if hp.frames_on_device and self.trainer is not None:  # else on the first batch, where it lands
            self._load_frames(self.trainer.strategy.root_device)

    def _load_frames(self, device: torch.device) -> torch.Tensor:
        def index(d: torch.device) -> int:
            return 0 if d.index is None else d.index

        device = torch.device(device)
        if self.frames is None or (self.frames.device.type, index(self.frames.device)) != (device.type, index(device)):
            trainer = self.trainer
            zero = trainer is None or trainer.is_global_zero
            bar = zero and (trainer is None or trainer.progress_bar_callback is not None)
            start = time.perf_counter()
            self.frames = frames_to_device(EpisodeStore(self.path), device, progress=bar)
            if zero:
                f = self.frames
                print(f"frames on {device}: {f.shape[0]:,} frames of {f.shape[1]}x{f.shape[2]} px, "
                      f"{f.numel() / 2**30:.2f} GiB, copied in {time.perf_counter() - start:.1f} s")
        return self.frames

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """With frames_on_device, a batch arrives as frame rows (B, T) and leaves with its
        `pixels` (B, T, Hp, Wp, C) uint8, gathered on the device."""
        if isinstance(batch, dict) and "rows" in batch:
            rows = batch.pop("rows")
            batch["pixels"] = self._load_frames(rows.device)[rows]
        return batch

    def _generate_spec(self) -> dict:
        """`generate` as a plain dict (a CollectSpec, or the dict a config gives)."""
        return dict(self.generate) if isinstance(self.generate, dict) else asdict(self.generate)

    def _check_generate_spec(self, store: EpisodeStore) -> None:
        """An existing file must draw its frames as `generate` says: same env, resolution and supersampling."""
        if self.generate is None:
            return
        spec, meta = self._generate_spec(), store.metadata
        found = {"env": meta.get("env"), "resolution": store.resolution,
                 "supersample": (meta.get("env_params") or {}).get("supersample", 1)}
        wanted = {"env": spec.get("env"), "resolution": spec.get("resolution"),
                  "supersample": spec.get("supersample", 1)}
        wrong = [f"{k} {found[k]!r} (generate.{k} is {wanted[k]!r})" for k in found
                 if wanted[k] is not None and found[k] != wanted[k]]
        if wrong:
            raise ValueError(f"{self.path} exists but was not generated as data.generate says: it has "
                             f"{', '.join(wrong)}. Point data.path at a new file to generate it, or set "
                             "data.generate to match the file.")

    def _loader(self, dataset, sampler=None, drop_last=False) -> DataLoader:
        workers = self.hparams.num_workers
        # Its own generator: starting an iterator then draws the workers' base seed from it, not from
        # torch's global stream, which dropout uses. Otherwise persistent workers (one draw per run)
        # or none (one per epoch) would give different models, and a resumed run one draw more.
        generator = torch.Generator().manual_seed(self.hparams.shuffle_seed)
        return DataLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                          collate_fn=collate_batch, generator=generator)

    def train_dataloader(self, *, from_start: bool = False) -> DataLoader:
        """The training clips in the uninterrupted run's order: from where a resumed run left it, or
        with `from_start` from the start of the first epoch whatever the trainer has done (the
        BatchNorm re-estimation at the end of training reads its batches that way)."""
        train_set = self.train_set
        if len(train_set) < 2:
            raise ValueError(f"{self.path} gives {len(train_set)} training clip(s): the projector's BatchNorm needs "
                             "at least 2; collect more or longer episodes, or lower data.num_frames / frameskip")
        # a last batch of one clip would break the projector's BatchNorm: drop it when there are others
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:  # each process draws its shard of the one order
            sampler = DistributedEpochSampler(len(train_set), self.hparams.shuffle_seed, trainer.world_size,
                                              trainer.global_rank)
        else:
            sampler = EpochSampler(len(train_set), self.hparams.shuffle_seed)
        if trainer is not None and not from_start and trainer.fit_loop.epoch_loop.batch_progress.total.processed > 0:
            # where the uninterrupted run's order is; set here too, as loader workers draw their first
            # indices before Lightning announces the epoch
            epoch, done = self._resume_point()
            sampler.resume_at(done, epoch)
            if done:
                rank_zero_info(f"resuming inside epoch {epoch} of the clips' order: they go on from clip {done}, as "
                               "the uninterrupted run draws them")
                # Lightning warns that a loader without `state_dict` cannot resume inside an epoch; this one does
                warnings.filterwarnings("ignore", message=re.escape(_LIGHTNING_NOT_RESUMABLE),
                                        category=PossibleUserWarning)
        world = trainer.world_size if trainer is not None else 1
        per_rank = -(-len(train_set) // world)  # each process's share of the epoch
        return self._loader(train_set, sampler, drop_last=per_rank > self.hparams.batch_size)

    def _resume_point(self) -> tuple[int, int]:
        """(epoch, clips) where a resumed run's clips go on: the epoch of the uninterrupted run's
        order, and the clips of it already trained on (all ranks together; 0 when the checkpoint
        was written after an epoch's last batch, and the next epoch starts whole). Counted from the
        batches trained on, not from Lightning's epoch number, which a stop inside an epoch advances."""
        trainer = self.trainer
        # batches trained on, per rank, in this epoch and in the whole run: a checkpoint written in
        # on_train_batch_end counts its batch as processed, not yet completed (Lightning completes it on restart)
        progress = trainer.fit_loop.epoch_loop.batch_progress
        batches, total = progress.current.processed, progress.total.processed
        world, size, bs = trainer.world_size, len(self.train_set), self.hparams.batch_size
        per_rank = -(-size // world)  # a distributed sampler pads the epoch to a multiple of the ranks
        per_epoch = per_rank // bs if per_rank > bs else 1  # drop_last as in train_dataloader
        limit = trainer.limit_train_batches
        per_epoch = min(per_epoch, limit) if isinstance(limit, int) else int(per_epoch * limit)
        if batches >= per_epoch:  # written at the epoch's end: the next epoch starts whole
            return total // per_epoch, 0
        return (total - batches) // per_epoch, batches * bs * world

    def val_dataloader(self):
        if self.val_set is None:
            return []
        return self._loader(self.val_set, FixedShuffleSampler(len(self.val_set), self.hparams.split_seed + 1))
