"""HDF5 episode store: one file holds every frame, action and state of a collection.

Example:
    >>> from leworld.data.store import EpisodeStore
    >>> store = EpisodeStore("data/tworoom.h5")  # written by `python -m leworld.data.collect`
    >>> print(store.summary())

Layout (frames of all episodes concatenated; an episode of L steps holds L + 1 rows; row t
holds observation t and the action taken from it, so an episode's last action is NaN):

    pixels   (F, R, R, 3) uint8, one frame per chunk (fast random access to single frames),
             optionally lzf/gzip-compressed (Two-Room frames shrink ~20x)
    action   (F, A) float32
    proprio  (F, P) float32
    state    (F, S) float64
    episode_offset, episode_length  (E,) int64
    attrs["metadata"]  JSON (env id and params, policy, noise, seed, resolution, version, time)
    attrs["complete"]  True once the writer closed cleanly

Writes are atomic: the writer fills a hidden temporary file next to the target and renames it
only when every episode is in, so an interrupt or a crash never leaves a truncated file under
the target name.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np

FORMAT_VERSION = 1
_FIELDS = ("pixels", "action", "proprio", "state")


# Placeholders of the collect command in the "no dataset" message, which callers that know the env
# or the model fill in (`fill_collect_hint`)
ENV_HINT, RESOLUTION_HINT = "<tworoom or pusht>", "<the model's image_size>"


def fill_collect_hint(message: str, env: str | None = None, resolution: int | None = None,
                      supersample: int | None = None) -> str:
    """The "no dataset" message with the collect command's env and frame size filled in where the
    caller knows them (from a model or a config), with `--supersample` where the model's data was
    drawn supersampled."""
    if env:
        message = message.replace(ENV_HINT, str(env))
    if resolution:
        size = str(resolution) + (f" --supersample {supersample}" if supersample and int(supersample) > 1 else "")
        message = message.replace(RESOLUTION_HINT, size)
    return message


class DatasetError(RuntimeError):
    """A dataset file is missing, incomplete or of the wrong format."""


class EpisodeWriter:
    """Appends episodes to a temporary HDF5 file and renames it to `path` on `close()`.

    Use as a context manager: an exception inside the block removes the temporary file and
    leaves any existing file at `path` untouched.
    """

    def __init__(self, path: str | os.PathLike, *, resolution: int, action_dim: int,
                 proprio_dim: int, state_dim: int, metadata: dict, overwrite: bool = False,
                 compression: str | None = None):
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"{self.path} is a directory: give a file path such as data/tworoom.h5")
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} already exists: pass overwrite=True (--overwrite) to replace it")
        self.overwrite = bool(overwrite)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PermissionError(f"cannot create the directory {self.path.parent}: {e.strerror}; choose another path for the dataset (--out, or data.path in a config)") from e
        try:  # a name no other writer holds, even one of this process writing the same target
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            os.close(fd)
            self.tmp_path = Path(tmp)
            os.chmod(tmp, 0o644)  # mkstemp's file is private; a dataset is meant to be read by others too
            self._file = h5py.File(self.tmp_path, "w")
        except OSError as e:
            if hasattr(self, "tmp_path"):
                self.tmp_path.unlink(missing_ok=True)
            raise PermissionError(f"cannot write to {self.path.parent} ({e}); choose a writable path for the dataset (--out, or data.path in a config)") from e
        try:
            self._start(metadata, resolution, action_dim, proprio_dim, state_dim, compression)
        except BaseException:  # a bad setting (an unknown compression, say) leaves no partial file
            self.abort()
            raise

    def _start(self, metadata: dict, resolution: int, action_dim: int, proprio_dim: int, state_dim: int,
               compression: str | None) -> None:
        f = self._file
        f.attrs["format_version"] = FORMAT_VERSION
        self.metadata = dict(metadata)
        f.attrs["metadata"] = json.dumps(self.metadata)
        f.attrs["complete"] = False
        r = resolution
        f.create_dataset("pixels", (0, r, r, 3), np.uint8, maxshape=(None, r, r, 3), chunks=(1, r, r, 3),
                         compression=compression)
        rows = max(1, (1 << 16) // 8)
        for name, dim, dtype in (("action", action_dim, np.float32), ("proprio", proprio_dim, np.float32),
                                 ("state", state_dim, np.float64)):
            f.create_dataset(name, (0, dim), dtype, maxshape=(None, dim), chunks=(rows, dim))
        self._offsets: list[int] = []
        self._lengths: list[int] = []
        self._num_frames = 0

    def append(self, episodes: dict[str, np.ndarray]) -> None:
        """Append a block of episodes: each field shaped (E, L + 1, ...), same L for all."""
        num_eps, length = episodes["pixels"].shape[:2]
        start, stop = self._num_frames, self._num_frames + num_eps * length
        for name in _FIELDS:  # every field is checked before any is written: a rejected block leaves no rows
            data = episodes[name]
            if data.shape[:2] != (num_eps, length):
                raise ValueError(f"{name} has shape {data.shape}, expected leading dims {(num_eps, length)}")
        for name in _FIELDS:
            data = episodes[name]
            ds = self._file[name]
            ds.resize(stop, axis=0)
            ds[start:stop] = data.reshape(num_eps * length, *data.shape[2:])  # (E*(L+1), ...)
        self._offsets += [start + e * length for e in range(num_eps)]
        self._lengths += [length] * num_eps
        self._num_frames = stop

    def update_metadata(self, **extra) -> None:
        """Add keys to the metadata (e.g. timings known only at the end)."""
        self.metadata.update(extra)
        self._file.attrs["metadata"] = json.dumps(self.metadata)

    def close(self) -> Path:
        """Finish the file and move it to its final name."""
        f = self._file
        try:
            f.create_dataset("episode_offset", data=np.asarray(self._offsets, np.int64))
            f.create_dataset("episode_length", data=np.asarray(self._lengths, np.int64))
            f.attrs["complete"] = True
            f.close()
            if not self.overwrite and self.path.exists():
                raise FileExistsError(f"{self.path} appeared while this dataset was being written (another "
                                      "collection to the same path?); it was kept and this one dropped: pass "
                                      "overwrite=True (--overwrite) to replace it, or write to another path")
            os.replace(self.tmp_path, self.path)
        except BaseException:  # a full disk, say: the partial file goes, whatever was at `path` stays
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; nothing at `path` changes."""
        try:
            self._file.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "EpisodeWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class EpisodeStore:
    """Read access to a dataset file. The HDF5 handle opens lazily, once per process, so a
    store can be handed to DataLoader workers (each opens its own handle)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise DatasetError(f"{self.path} is a directory: a dataset is one .h5 file, e.g. data/tworoom_64.h5")
        if not self.path.is_file():
            raise DatasetError(
                f"no dataset at {self.path}: generate one with `python -m leworld.data.collect --env {ENV_HINT} "
                f"--resolution {RESOLUTION_HINT} --out {self.path}`, or let training generate it (data.generate "
                "in its config)"
            )
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise DatasetError(f"{self.path} is not a readable HDF5 file ({e}): it may be incomplete or corrupt; "
                               "delete it and collect again") from e
        with f:
            if "format_version" not in f.attrs or "metadata" not in f.attrs:
                raise DatasetError(f"{self.path} is an HDF5 file but not a leworld dataset (it has no format_version "
                                   "and metadata): give a file written by `python -m leworld.data.collect`")
            if not f.attrs.get("complete", False):
                raise DatasetError(f"{self.path} is incomplete (its writer did not finish): delete it and collect again")
            missing = [k for k in (*_FIELDS, "episode_offset", "episode_length") if k not in f]
            if missing:
                raise DatasetError(f"{self.path} is not a leworld dataset (missing {', '.join(missing)})")
            self.metadata: dict = json.loads(f.attrs["metadata"])
            self.episode_offset = f["episode_offset"][:]
            self.episode_length = f["episode_length"][:]
            self.resolution = int(f["pixels"].shape[1])
            self.action_dim = int(f["action"].shape[1])
            self.num_frames = int(f["pixels"].shape[0])
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._cache: dict[str, np.ndarray] = {}

    @property
    def num_episodes(self) -> int:
        return len(self.episode_offset)

    @property
    def file(self) -> h5py.File:
        """This process's open HDF5 handle."""
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
            self._cache = {}
        return self._file

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"], state["_pid"], state["_cache"] = None, None, {}
        return state

    def read(self, name: str, rows: np.ndarray | slice) -> np.ndarray:
        """Rows of one field; `rows` is a slice or an integer array (any order)."""
        if name != "pixels":  # small fields live in memory: any row order, no per-read overhead
            return self._small(name)[rows]
        ds = self.file[name]
        if isinstance(rows, slice):
            return ds[rows]
        out = np.empty((len(rows), *ds.shape[1:]), ds.dtype)
        self.read_into(rows, out)
        return out

    def _small(self, name: str) -> np.ndarray:
        f = self.file  # (re)opens in this process, which empties the cache after a fork
        if name not in self._cache:
            self._cache[name] = f[name][:]
        return self._cache[name]

    def read_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Frames `rows` (any order) into `out` (len(rows), R, R, 3) uint8, one chunk per frame."""
        ds = self.file["pixels"]
        if ds.compression is None:  # an uncompressed chunk is the frame's bytes: skip h5py's selection
            shape = out.shape[1:]
            for i, row in enumerate(rows):
                out[i] = np.frombuffer(ds.id.read_direct_chunk((int(row), 0, 0, 0))[1], np.uint8).reshape(shape)
        else:
            for i, row in enumerate(rows):
                out[i] = ds[int(row)]

    def episode(self, index: int) -> dict[str, np.ndarray]:
        """All rows of episode `index` as a dict of arrays."""
        start = int(self.episode_offset[index])
        rows = slice(start, start + int(self.episode_length[index]))
        return {name: self.read(name, rows) for name in _FIELDS}

    def _noise(self) -> str:
        """The data policy's action noise as the summary gives it: the one asked for, or the
        policy's default that was applied (recorded as `policy_noise`)."""
        m = self.metadata
        if m.get("noise") is not None:
            return f"noise {m['noise']}"
        default = m.get("policy_noise")
        if default is None:  # uniform random actions
            return "no action noise"
        if isinstance(default, (int, float)):
            return f"noise {default}, the policy's default"
        return f"noise: the policy's default, {json.dumps(default)}"

    def summary(self) -> str:
        m = self.metadata
        lengths = self.episode_length
        size_mb = self.path.stat().st_size / 2**20
        lines = [
            f"dataset   {self.path} ({size_mb:.1f} MiB)",
            f"env       {m.get('env_id')} {json.dumps(m.get('env_params', {}))}",
            f"policy    {m.get('policy')} ({self._noise()}), seed {m.get('seed')}",
            f"episodes  {self.num_episodes}, {self.num_frames} frames, {int((lengths - 1).sum())} steps "
            f"(length {int(lengths.min())}-{int(lengths.max())})",
            f"frames    {self.resolution}x{self.resolution} RGB uint8",
        ]
        if "steps_per_second" in m:
            lines.append(f"collected in {m['seconds']:.1f} s ({m['steps_per_second']:,.0f} env steps/s)")
        return "\n".join(lines)
