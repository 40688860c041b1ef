"""Result files shared by the commands (`plan.py`, `surprise.py`, `python -m leworld.probe`).

Example:
    >>> from leworld.results import write_json, sha256_file, package_version
    >>> write_json("runs/x/result.json", {"rate": float("nan"), "version": package_version()})  # NaN -> null

Every result is written atomically (a temporary file next to the target, then a rename), so an
interrupted command never leaves a truncated file under the result's name.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable


def package_version() -> str:
    """The installed leworld version, or "unknown" when running from an uninstalled tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("leworld")
    except PackageNotFoundError:
        return "unknown"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable(path: str | os.PathLike) -> Path:
    """Raise ValueError, naming the problem, when a file cannot be written at `path`: it is a
    directory, a parent of it is a file, or the nearest existing folder takes no new file (checked
    by writing and removing one). Commands call it before their work, so a bad `--out`
    fails at once instead of after the computation; `atomic_write` calls it too."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory: give a file name for the result (e.g. {path / 'result.json'})")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot write {path}: {parent} is a file, not a directory")
            try:  # permissions, a read-only or pseudo file system: only a write says for sure
                fd, probe = tempfile.mkstemp(dir=parent, prefix=".write-check.", suffix=".tmp")
            except OSError as e:
                raise ValueError(f"cannot write {path}: {parent} is not writable ({e.strerror or e}); choose "
                                 "another path") from None
            os.close(fd)
            os.unlink(probe)
            break
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it to `path`."""
    path = check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def finite(x):
    """JSON has no NaN or inf: replace them by None (null), recursively."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write `data` as indented JSON, atomically; NaN/inf become null."""
    text = json.dumps(finite(data), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def recorded_model(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """(weights sha256, model location) that the results JSON at `path` records, in either layout
    (`plan.py`'s `model` record, or the other commands' `model_sha256` beside `model_dir` or
    `model`); (None, None) where there is no such file or it says neither."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    model = data.get("model")
    if isinstance(model, dict):
        return model.get("sha256"), model.get("path")
    return data.get("model_sha256"), data.get("model_dir") or model


def replaced_model_note(path: str | os.PathLike, before: tuple[str | None, str | None], sha256) -> str | None:
    """The note to print when results just written to `path` replaced those of another model:
    `before` is what `recorded_model(path)` said before the write, `sha256` the new results' model.
    Default result names name a run, not its version, so a second version's results land on the
    first's."""
    old_sha, old_model = before
    if old_sha is None or old_sha == sha256:
        return None
    return (f"note: {path} held the results of another model ({old_model}); they were replaced. Give --out to "
            "keep both")
