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

import hashlib
import json
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from leworld.data.clips import ClipDataset, action_stats, collate_batch, split_episodes
from leworld.data.store import DatasetError, EpisodeStore, fill_collect_hint


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


def _stream_pass(order_of: Callable[[int], list[int]], length: int, start: int, per_epoch: int,
                 span: int) -> list[int]:
    """`length` positions for a pass that begins at batch `start` of a run: batch k of a run holds
    positions (k mod per_epoch) * span ... + span of epoch (k div per_epoch)'s order, and the pass
    holds batches start ... start + per_epoch - 1 of that stream, across an epoch's end if it comes,
    then the first positions of its epoch's order as a tail that no batch draws (it only keeps the
    pass's length: the loader drops an incomplete last batch, or `limit_train_batches` stops first)."""
    orders: dict[int, list[int]] = {}
    out: list[int] = []
    for k in range(start, start + per_epoch):
        epoch, b = divmod(k, per_epoch)
        if epoch not in orders:
            orders[epoch] = order_of(epoch)
        out += orders[epoch][b * span:(b + 1) * span]
    tail = orders[start // per_epoch]
    return out + tail[:max(length - len(out), 0)]


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch), so resuming replays it.

    Alone, each pass is the order of the epoch last given to `set_epoch`. Training follows the
    run instead (`follow`): each pass begins at the batch the run has reached, counted from the
    batches trained on, so a resumed run draws the clips the uninterrupted run would have drawn
    next, from the middle of an epoch too, whatever epoch number Lightning announces (it counts an
    epoch cut short by a stop, such as `max_time`, as finished) and whenever it builds the loader
    (before it restores its counters, when `max_epochs` sets the schedule's length)."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0
        self._run: tuple[Callable[[], int], int, int] | None = None
        self._told = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def follow(self, batches_done: Callable[[], int], per_epoch: int, span: int) -> None:
        """Begin each pass at batch `batches_done()` of the run, with `per_epoch` batches of `span`
        clips (on this process) in an epoch."""
        self._run = (batches_done, max(int(per_epoch), 1), max(int(span), 1))

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def _positions(self, order_of: Callable[[int], list[int]], length: int) -> list[int]:
        if self._run is None:
            return order_of(self.epoch)
        batches_done, per_epoch, span = self._run
        start = int(batches_done())
        if start % per_epoch and not self._told:  # a run resumed inside an epoch
            self._told = True
            epoch, b = divmod(start, per_epoch)
            rank_zero_info(f"resuming inside an epoch: the training clips go on at batch {b} of epoch {epoch} of "
                           "their order, as the uninterrupted run draws them")
        return _stream_pass(order_of, length, start, per_epoch, span)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter(self._positions(self.order, self.size))


class DistributedEpochSampler(DistributedSampler):
    """`EpochSampler`'s order, sharded over `num_replicas` processes: rank r takes positions
    r, r + R, r + 2R, ... of the epoch's order, cut to a multiple of R with `cut` (the loaders
    train on full batches only: a padded clip would be trained on twice in an epoch), else padded
    from its start to a multiple of R (a share of one batch holds every clip).

    Lightning leaves a DistributedSampler in place. Its own wrapper for other samplers would
    shuffle the positions again with a generator of its own, so a resumed epoch could not go on
    where the checkpoint left it. Following a run (`follow`), each rank draws its own batches of
    the stream: the batches every rank has trained on are the same in number."""

    def __init__(self, size: int, seed: int, num_replicas: int, rank: int, cut: bool = False):
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False)
        self._order = EpochSampler(size, seed)
        if cut and size >= num_replicas:  # equal shares without a repeated clip
            self.num_samples = size // num_replicas
            self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._order.set_epoch(epoch)

    def follow(self, batches_done: Callable[[], int], per_epoch: int, span: int) -> None:
        self._order.follow(batches_done, per_epoch, span)

    def shard(self, epoch: int) -> list[int]:
        """This rank's positions of `epoch`'s order."""
        order = self._order.order(epoch)[:self.total_size]
        pad = self.total_size - len(order)  # to a multiple of the ranks, repeating the order as often as needed
        order += (order * -(-pad // max(len(order), 1)))[:pad]
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        return iter(self._order._positions(self.shard, self.num_samples))


class FixedShuffleSampler(EpochSampler):
    """The same seeded permutation on every pass. Validation uses it so that a pass cut short by
    `limit_val_batches` still draws its clips from across all validation episodes (consecutive clips
    of a few episodes would make the SIGReg and effective-rank monitors meaningless), and every
    validation sees the same clips."""

    def set_epoch(self, epoch: int) -> None:
        pass


class DistributedFixedShuffleSampler(DistributedSampler):
    """Validation under DDP: each process takes its share of `FixedShuffleSampler`'s order, cut to
    a multiple of the processes. Lightning's own wrapper would pad the shares to equal length with
    repeated clips, which then count twice in the validation metrics; cutting drops at most
    `num_replicas - 1` clips, and the shares stay equal, as the all-reduce in SIGReg needs."""

    def __init__(self, size: int, seed: int, num_replicas: int, rank: int):
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)
        self._order = FixedShuffleSampler(size, seed)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        order = self._order.order(0)[: self.total_size]  # (num_replicas * num_samples,)
        return iter(order[self.rank:self.total_size:self.num_replicas])


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


def frames_memory_error(store: EpisodeStore, device: torch.device | str, copies: int = 1) -> str | None:
    """Why `copies` copies of the frames of `store` do not fit in the free memory of `device` (the
    processes of one machine training on its CPU each hold one), or None where they fit or the free
    memory is not known."""
    device = torch.device(device)
    r, num = store.resolution, store.num_frames
    need, free = num * r * r * 3 * copies, free_memory_bytes(device)
    if free is None or need <= free:
        return None
    each = f" ({copies} processes, a copy each)" if copies > 1 else ""
    return (f"data.frames_on_device needs {need / 2**30:.1f} GiB of {device} memory for the {num:,} frames of "
            f"{store.path}{each}, but only {free / 2**30:.1f} GiB is free: set data.frames_on_device false to read "
            "frames from the file, or use fewer episodes or a lower resolution")


def frames_to_device(store: EpisodeStore, device: torch.device | str, chunk: int = 512,
                     progress: bool = True, check: bool = True) -> torch.Tensor:
    """All frames of `store` as one uint8 tensor (F, R, R, 3) on `device`, in file row order.

    Copied `chunk` frames at a time through one host buffer, so the host never holds more than a
    chunk. Raises a `MemoryError` that names the fix when the device has less free memory than the
    frames need (unless `check` is False: the caller has checked).
    """
    device = torch.device(device)
    r, num = store.resolution, store.num_frames
    problem = frames_memory_error(store, device) if check else None
    if problem:
        raise MemoryError(problem)
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


def _digest(episodes: np.ndarray) -> str:
    """sha256 of a list of episode indices."""
    return hashlib.sha256(np.asarray(episodes, dtype=np.int64).tobytes()).hexdigest()


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
        # Plain values only: the hyper-parameters go into every checkpoint, which loads weights-only.
        path = str(path)
        if generate is not None and not isinstance(generate, dict):
            generate = asdict(generate)
        self.save_hyperparameters()
        self.path = Path(path)
        self.generate = generate
        self.action_mean: np.ndarray | None = None
        self.action_std: np.ndarray | None = None
        self.frames: torch.Tensor | None = None  # (F, R, R, 3) uint8 on the device, with frames_on_device
        # DDP training shares padded to equal length, as runs whose checkpoints record no stream drew them
        self._padded_shares = False

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
        try:
            store = EpisodeStore(self.path)  # clear error if the file is missing
        except DatasetError as e:  # naming the env and frame size where the config says them
            spec = self._generate_spec() if self.generate is not None else {}
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            size = getattr(getattr(module, "config", None), "image_size", None) or spec.get("resolution")
            raise DatasetError(fill_collect_hint(str(e), spec.get("env"), size, spec.get("supersample"))) from None
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
        rank_zero_info(f"data: {self.path}: {store.num_episodes} episodes ({len(self.train_episodes)} for training, "
                       f"{len(self.val_episodes)} held out), {store.resolution} px, policy "
                       f"{store.metadata.get('policy')}, seed {store.metadata.get('seed')}")
        if hp.frames_on_device and self.trainer is not None:  # else on the first batch, where it lands
            self._check_frames_fit(store, self.trainer)
            self._load_frames(self.trainer.strategy.root_device, check=False)

    # what a dataset's metadata says about when, how fast and by which version it was written, not
    # what it holds (chunk_size stays: the collector seeds each chunk of episodes on its own)
    _NOT_IDENTITY = ("created", "seconds", "steps_per_second", "leworld_version")

    def dataset_identity(self) -> dict:
        """What identifies the dataset this module reads: how it was generated (its metadata, less
        the time, speed and package version of the writing) and its episode and frame counts. A
        file moved or generated again with the same settings has the same identity."""
        store = EpisodeStore(self.path)
        meta = {k: v for k, v in store.metadata.items() if k not in self._NOT_IDENTITY}
        return json.loads(json.dumps({**meta, "num_episodes": store.num_episodes, "num_frames": store.num_frames},
                                     default=str))

    def state_dict(self) -> dict:
        """Saved in every checkpoint: the dataset's identity and the split, which a resumed run must
        share (`load_state_dict` checks them)."""
        if self.action_mean is None:
            return {}
        state = {"dataset": self.dataset_identity(), "val_episodes": _digest(self.val_episodes),
                 "train_episodes": _digest(self.train_episodes)}
        if self.trainer is not None and self.trainer.state.fn == "fit":
            stream = self._stream()
            state["stream"] = {"clips_per_step": stream["span"] * stream["world"], "steps_per_epoch": stream["per_epoch"],
                               "batch_size": self.hparams.batch_size, "processes": stream["world"],
                               "shares": "padded" if self._padded_shares else "cut"}
        return state

    def load_state_dict(self, state: dict) -> None:
        """On resume: refuse a dataset or split other than the checkpoint's. A different dataset
        would be normalised with the checkpoint's action statistics, and a different split would
        hold out episodes the model trained on. Checkpoints written before this check pass, and so
        does scoring a checkpoint (`validate`, `test`) on any data."""
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"
        if not state or self.action_mean is None or not fitting:
            return
        ckpt = getattr(self.trainer, "ckpt_path", None) or "the checkpoint"
        saved, now = state.get("dataset") or {}, self.dataset_identity()
        differ = [f"{k}: {now.get(k)!r} (the checkpoint's: {saved.get(k)!r})"
                  for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if differ:
            raise ValueError(f"{self.path} does not hold the dataset {ckpt} was trained on:\n  " + "\n  ".join(differ) +
                             "\npoint data.path at the run's dataset (or one generated with its settings), or start "
                             "a new run without --ckpt_path")
        if (state.get("val_episodes"), state.get("train_episodes")) != (_digest(self.val_episodes),
                                                                          _digest(self.train_episodes)):
            raise ValueError(f"data.val_fraction / data.split_seed split {self.path} into other validation episodes "
                             f"than {ckpt} was trained with, so episodes it trained on would be held out: use the "
                             "checkpoint's values, or start a new run without --ckpt_path")
        self._check_stream(state.get("stream"), ckpt)

    def _check_stream(self, saved: dict | None, ckpt) -> None:
        """A resumed run goes on in the clip order at the batch it reached, counted in batches: with
        other clips per step or steps per epoch, that count would point elsewhere in the order, and
        the rest of the run would repeat some clips within an epoch and never draw others."""
        if not saved or saved.get("shares") == "padded":
            # DDP shares were padded to equal length before the stream was recorded (cut shares can
            # have a step less per epoch): a run resumed from such a checkpoint, or from one of its
            # own, pads them too, and records so
            self._padded_shares = True
        if not saved:
            return
        stream = self._stream()
        now = {"clips_per_step": stream["span"] * stream["world"], "steps_per_epoch": stream["per_epoch"]}
        if all(saved.get(k) == v for k, v in now.items()):
            return

        def deal(record: dict) -> str:
            processes = record.get("processes")
            return (f"{record.get('clips_per_step')} clips per step (data.batch_size {record.get('batch_size')} on "
                    f"{processes} process{'es' if processes != 1 else ''}), {record.get('steps_per_epoch')} steps "
                    "per epoch")

        now.update(batch_size=self.hparams.batch_size, processes=stream["world"])
        raise ValueError(
            f"{ckpt} was trained with {deal(saved)}; this run would train with {deal(now)}. Resumed so, it would "
            "repeat some training clips and skip others: resume with the checkpoint's data.batch_size times "
            "processes (trainer.devices x trainer.num_nodes) and trainer.limit_train_batches, or start a new run "
            "without --ckpt_path")

    @staticmethod
    def _check_frames_fit(store: EpisodeStore, trainer) -> None:
        """Every process checks, before any allocates, that the copies of the frames the processes
        of its machine hold fit there (one per process when they train on the CPU, which they
        share), and every process stops if one finds they do not."""
        device = trainer.strategy.root_device
        copies = trainer.num_devices if device.type == "cpu" else 1
        problem = frames_memory_error(store, device, copies)
        if trainer.world_size > 1 and not trainer.strategy.reduce_boolean_decision(problem is None, all=True):
            problem = problem or ("data.frames_on_device: the frames do not fit in another process's memory (its "
                                  "error says how much they need): set data.frames_on_device false to read frames "
                                  "from the file")
        if problem:
            raise MemoryError(problem)

    def _load_frames(self, device: torch.device, check: bool = True) -> torch.Tensor:
        def index(d: torch.device) -> int:
            return 0 if d.index is None else d.index

        device = torch.device(device)
        if self.frames is None or (self.frames.device.type, index(self.frames.device)) != (device.type, index(device)):
            trainer = self.trainer
            zero = trainer is None or trainer.is_global_zero
            bar = zero and (trainer is None or trainer.progress_bar_callback is not None)
            start = time.perf_counter()
            self.frames = frames_to_device(EpisodeStore(self.path), device, progress=bar, check=check)
            if zero:
                f = self.frames
                copies = trainer.num_devices if trainer is not None and device.type == "cpu" else 1
                each = f" per process, {copies} processes" if copies > 1 else ""
                print(f"frames on {device}: {f.shape[0]:,} frames of {f.shape[1]}x{f.shape[2]} px, "
                      f"{f.numel() / 2**30:.2f} GiB{each}, copied in {time.perf_counter() - start:.1f} s")
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
        # the model can train on a file of other size or policy, but it is likely a leftover (a smaller
        # trial run's file, say) rather than what the config asks for: train on it, and say so
        from leworld.data.collect import DEFAULT_POLICY

        found = {k: meta.get(k) for k in ("episodes", "steps", "policy", "noise", "seed")}
        found["episodes"] = store.num_episodes
        if found["noise"] is None and isinstance(meta.get("policy_noise"), (int, float)):
            found["noise"] = meta["policy_noise"]  # the policy's default, which the file records as such
        wanted = {k: spec.get(k) for k in found}
        wanted["policy"] = wanted["policy"] or DEFAULT_POLICY.get(spec.get("env"), "random")
        other = [f"{k} {found[k]!r} (data.generate.{k} is {wanted[k]!r})" for k in found
                 if wanted[k] is not None and found[k] is not None and found[k] != wanted[k]]
        if other:
            rank_zero_warn(f"{self.path} exists, so it is used as it is, but it was not generated as data.generate "
                           f"says: it has {', '.join(other)}. To train on what data.generate describes, point "
                           "data.path at a new file (it is generated) or move this one away.")

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
        """The training clips in the uninterrupted run's order: each pass from the batch the attached
        trainer's run has reached (a resumed run goes on where it left off), or with `from_start` (or
        no trainer) the order of the sampler's epoch from its start (the BatchNorm re-estimation at the
        end of training reads the first epoch's batches that way)."""
        train_set = self.train_set
        if len(train_set) < 2:
            raise ValueError(f"{self.path} gives {len(train_set)} training clip(s): the projector's BatchNorm needs "
                             "at least 2; collect more or longer episodes, or lower data.num_frames / frameskip")
        # a last batch of one clip would break the projector's BatchNorm: drop it when there are others
        trainer = self.trainer
        stream = self._stream()
        if trainer is not None and trainer.world_size > 1:  # each process draws its shard of the one order
            sampler = DistributedEpochSampler(len(train_set), self.hparams.shuffle_seed, trainer.world_size,
                                              trainer.global_rank, cut=stream["cut"])
        else:
            sampler = EpochSampler(len(train_set), self.hparams.shuffle_seed)
        if trainer is not None and not from_start:
            # every pass goes on from the batches the run has trained on (read when the pass begins,
            # after Lightning has restored its counters), so a resumed run draws what the
            # uninterrupted run would have drawn next
            # a checkpoint written in on_train_batch_end counts its batch as processed, not yet
            # completed: it was trained on (Lightning completes it on restart)
            sampler.follow(lambda: trainer.fit_loop.epoch_loop.batch_progress.total.processed, stream["per_epoch"],
                           stream["span"])
            # Lightning warns that a loader without `state_dict` cannot resume inside an epoch; this one does
            warnings.filterwarnings("ignore", message=re.escape(_LIGHTNING_NOT_RESUMABLE), category=PossibleUserWarning)
        return self._loader(train_set, sampler, drop_last=stream["drop_last"])

    def _stream(self) -> dict:
        """How the training clips are dealt out: `span` clips per batch on each of `world`
        processes, `per_epoch` batches per epoch of their order (fewer with limit_train_batches),
        the last incomplete batch dropped where there are full ones (a batch of one clip would
        break the projector's BatchNorm), and under DDP each order cut to equal shares (`cut`)
        where every share holds a full batch."""
        trainer, size, batch = self.trainer, len(self.train_set), self.hparams.batch_size
        world = trainer.world_size if trainer is not None else 1
        cut = world > 1 and size // world >= batch and not self._padded_shares
        per_rank = size // world if cut else -(-size // world)  # each process's share of an epoch
        drop_last = per_rank > batch
        per_epoch = per_rank // batch if drop_last else 1
        limit = trainer.limit_train_batches if trainer is not None else 1.0
        per_epoch = min(per_epoch, limit) if isinstance(limit, int) else int(per_epoch * limit)
        return {"world": world, "cut": cut, "drop_last": drop_last, "per_epoch": per_epoch,
                "span": batch if drop_last else per_rank}

    def val_dataloader(self):
        if self.val_set is None:
            return []
        trainer, seed = self.trainer, self.hparams.split_seed + 1
        if trainer is not None and trainer.world_size > 1:  # shares without repeated clips
            return self._loader(self.val_set, DistributedFixedShuffleSampler(len(self.val_set), seed,
                                                                             trainer.world_size, trainer.global_rank))
        return self._loader(self.val_set, FixedShuffleSampler(len(self.val_set), seed))
