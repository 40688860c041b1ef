"""Self-describing, pickle-free model files: model.safetensors + config.json.

Example:
    >>> import tempfile
    >>> from leworld.model import LeWMConfig, LeWorldModel
    >>> from leworld.checkpoint import export_model, load_model
    >>> model = LeWorldModel(LeWMConfig(encoder="cnn", image_size=32, pred_depth=1))
    >>> directory = export_model(model, tempfile.mkdtemp(), extra={"env": "tworoom"})
    >>> load_model(directory).config == model.config
    True

`model.safetensors` holds every parameter and persistent buffer (action statistics included);
`config.json` holds the format version, the package version, `LeWMConfig.to_dict()` and any
`extra` information (training run, dataset), and the sha256 of the weights file written with
it. Both are written atomically (temporary file in the same directory, then `os.replace`), the
weights first: an export stopped between the two leaves new weights beside the old config.json,
which loading then refuses (its recorded sha256 is not the weights'). Loading never unpickles: safetensors and JSON only;
a Lightning `.ckpt` is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from leworld.model import LeWMConfig, LeWorldModel
from leworld.results import package_version, sha256_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "leworld.model"
FORMAT_VERSION = 1
_HOW_TO_MAKE = (
    "expected a directory with model.safetensors and config.json written by "
    "leworld.checkpoint.export_model (training exports one: `python train.py fit ...`), "
    "or a Lightning .ckpt file"
)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via `write(tmp_path)` to a temporary file next to `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp (or the writer) made it private; an exported model is meant to be shared
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_model(model: LeWorldModel, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `directory`/model.safetensors and `directory`/config.json; returns the directory."""
    if not isinstance(model, LeWorldModel):
        hint = (" (a ModelEnsemble: export its members one by one, `for i, m in enumerate(ensemble.members)`)"
                if hasattr(model, "members") else "")
        raise TypeError(f"export_model writes one LeWorldModel, got {type(model).__name__}{hint}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "leworld_version": package_version(),
        "config": model.config.to_dict(),
        "extra": extra or {},
    }
    try:
        json.dumps(info)
    except TypeError as e:
        raise TypeError(f"export_model: `extra` must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from e
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # the config also travels inside the weights file, so that a config.json edited after the export
    # (or one written beside other weights) is caught at load time, even where the shapes still fit
    meta = {"format": "pt", "leworld_format_version": str(FORMAT_VERSION),
            "leworld_config": json.dumps(model.config.to_dict(), sort_keys=True)}
    blob = _safetensors_bytes(tensors, meta)
    info["weights_sha256"] = hashlib.sha256(blob).hexdigest()  # pairs this config.json with these weights
    text = json.dumps(info, indent=2, sort_keys=True)
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: Path(tmp).write_bytes(blob))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))
    return directory


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of `tensors`, byte for byte the same for the same tensors and metadata.

    safetensors writes its JSON header's metadata in a random order, so the same weights exported
    twice would have different sha256s (which results files identify models by). The header is
    written again with sorted keys, padded with spaces to 8 bytes as the format asks; the tensor
    data and its offsets are unchanged."""
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + n:]


def _check_matches(model: LeWorldModel, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = []
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                problems.append(f"{len(items)} {name}: {items[:5]}{more}")
        raise ValueError(
            f"the weights in {source} do not match their config: " + "; ".join(problems)
            + ". The config.json was probably edited or comes from another model; export both again together."
        )


def _build(config: LeWMConfig, state: dict[str, torch.Tensor], source: Path, map_location) -> LeWorldModel:
    model = LeWorldModel(config)
    _check_matches(model, state, source)
    model.load_state_dict(state)
    return model.to(map_location).eval()


def _read_json(path: Path):
    """The JSON value in `path`; ValueError naming the file where it is not UTF-8 JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); export the model again.") from e


def _read_info(path: Path) -> dict:
    """config.json as written by `export_model`, its format checked."""
    info = _read_json(path)
    if not isinstance(info, dict) or "config" not in info:
        raise ValueError(f"{path} has no 'config' entry; it was not written by leworld.checkpoint.export_model.")
    version = info.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{path} has format_version {version!r}, not an integer: it was not written by "
                         "leworld.checkpoint.export_model (or was edited); export the model again.")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version}, newer than this leworld reads "
            f"({FORMAT_VERSION}); upgrade leworld."
        )
    return info


def _read_config(path: Path) -> LeWMConfig:
    info = _read_info(path)
    try:
        return LeWMConfig.from_dict(info["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad model config in {path}: {e}") from e


def _check_pair(info: dict, config_path: Path, weights: Path) -> None:
    """config.json must have been written with these weights (exports that record their sha256)."""
    recorded = info.get("weights_sha256")
    if recorded is None:  # exports from before the record was added
        return
    actual = sha256_file(weights)
    if actual != recorded:
        raise ValueError(
            f"{config_path} was written with other weights than {weights} (sha256 {str(recorded)[:12]} recorded, "
            f"{actual[:12]} found): an export stopped between its two files, or they come from different "
            "exports. Export the model again (leworld.checkpoint.export_model, from a checkpoint of its run) "
            "or put back the config.json that belongs to these weights."
        )


def _config_from_hparams(hparams) -> LeWMConfig | None:
    candidates = [hparams]
    if isinstance(hparams, dict):
        candidates += [hparams.get(k) for k in ("config", "model_config", "model")]
    for c in candidates:
        if isinstance(c, LeWMConfig):
            return c
        if isinstance(c, dict) and c and set(c) <= {f for f in LeWMConfig.__dataclass_fields__}:
            return LeWMConfig.from_dict(c)
    return None


def _load_lightning(path: Path, map_location) -> LeWorldModel:
    ckpt = read_checkpoint(path)
    config = _config_from_hparams(ckpt.get("hyper_parameters", {}))
    if config is None or "state_dict" not in ckpt:
        raise ValueError(
            f"{path} holds no LeWMConfig in its hyper_parameters (or no state_dict); "
            "load the exported model directory instead, or re-export it with export_model."
        )
    state = ckpt["state_dict"]
    stripped = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return _build(config, stripped or state, path, map_location)


# The data module settings a model records: where its data is, how it was split, the clip length,
# and the batches it trained on (their size and the seed of their order).
DATA_SETTINGS = ("path", "val_fraction", "split_seed", "num_frames", "frameskip", "batch_size", "shuffle_seed")


def _first_line(e: BaseException) -> str:
    """An exception's first line of text, or its type when it has none (an empty file's EOFError)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def read_checkpoint(path: Path) -> dict:
    """A Lightning .ckpt as a dict, loaded weights-only (never unpickling code). ValueError, naming
    the file, for one that is truncated, corrupt or not a checkpoint."""
    from leworld.data.datamodule import CollectSpec  # older checkpoints of the Python API hold one

    try:
        with torch.serialization.safe_globals([LeWMConfig, CollectSpec]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # an empty file, a text file, a truncated zip, a refused object
        refused = re.search(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if refused is None:
            raise ValueError(f"{path} is not a readable checkpoint ({_first_line(e)}): it may be truncated or "
                             "corrupt; use another checkpoint of the run (checkpoints/*.ckpt) or train again") from None
        raise ValueError(f"{path} holds an object of type {refused[1]}, which a weights-only load does not rebuild "
                         "(rebuilding it would run its code). Checkpoints keep plain values only: give that setting "
                         "as plain values (str, dict, list, numbers) where the run was made, and train again; if "
                         "you trust the file, load it yourself with torch.load(..., weights_only=False) and save "
                         "its state_dict without that object.") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a Lightning checkpoint: {_HOW_TO_MAKE}.")
    return ckpt


def model_extra(path: str | os.PathLike) -> dict:
    """The `extra` record of a model: where it was trained, on what, and for how long.

    For an exported directory (or its model.safetensors) this is config.json's `extra`. A
    Lightning .ckpt written during training has no config.json, so the same record is rebuilt
    from what Lightning saved in it: the data module's settings (dataset path, split, clip
    length), the env of the data it generates, the step and the module's hyper-parameters.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".ckpt":
        ckpt = read_checkpoint(path)
        dm = ckpt.get("datamodule_hyper_parameters") or {}
        module = ckpt.get("hyper_parameters") or {}
        generate = dm.get("generate") if isinstance(dm.get("generate"), dict) else {}
        return {
            "global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"),
            "hparams": {k: v for k, v in module.items()
                        if k != "model" and not k.startswith("_") and not isinstance(v, LeWMConfig)},
            "dataset": {"env": generate["env"]} if generate.get("env") else None,
            "data": {k: (str(dm[k]) if k == "path" else dm[k]) for k in DATA_SETTINGS if k in dm} or None,
        }
    config = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if not config.is_file():
        return {}
    info = _read_json(config)
    if not isinstance(info, dict):
        return {}
    weights = config.with_name(WEIGHTS_NAME)
    if weights.is_file():  # the record must describe these weights, not an earlier export's
        _check_pair(info, config, weights)
    return info.get("extra", {})


def weights_file(path: str | os.PathLike) -> Path:
    """The file that holds a model's weights: the .ckpt itself, or the exported model.safetensors.

    Its sha256 identifies the model in results files."""
    path = Path(path)
    if path.is_dir():
        return path / WEIGHTS_NAME
    return path


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LeWorldModel:
    """Load a LeWorldModel in eval mode from an exported directory, its .safetensors file, a .ckpt,
    or a run directory (`runs/<name>`: its newest exported model, as `find_model` resolves it)."""
    path = find_model(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}: {_HOW_TO_MAKE}.")
    if path.is_dir() and not (path / WEIGHTS_NAME).exists() and _no_export_hint(path):
        raise FileNotFoundError(_no_export_hint(path).strip())
    if path.is_file() and path.suffix == ".ckpt":
        return _load_lightning(path, map_location)
    if path.is_dir():
        weights, config_path = path / WEIGHTS_NAME, path / CONFIG_NAME
    elif path.suffix == ".safetensors":
        weights, config_path = path, path.with_name(CONFIG_NAME)
    else:
        raise ValueError(f"cannot load {path}: {_HOW_TO_MAKE}, or the model.safetensors inside it.")
    for needed in (weights, config_path):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} is missing: {_HOW_TO_MAKE}.")
    info = _read_info(config_path)
    try:
        config = LeWMConfig.from_dict(info["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad model config in {config_path}: {e}") from e
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:  # tensors and metadata in one read
            state = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file ({e}): it may be truncated or corrupt; "
                         "export it again from a checkpoint of its run (leworld.checkpoint.export_model) or train "
                         "again") from None
    _check_pair(info, config_path, weights)  # after the read: a truncated file is named as such
    _check_config_travelled(config, meta.get("leworld_config"), config_path, weights)
    return _build(config, state, weights, map_location)


def _check_config_travelled(config: LeWMConfig, exported: str | None, config_path: Path, weights: Path) -> None:
    """config.json must be the config the weights were exported with (recorded in their metadata
    since the record was added; older exports carry none and are not checked)."""
    if exported is None:
        return
    try:
        was = LeWMConfig.from_dict(json.loads(exported)).to_dict()
    except (TypeError, ValueError):
        raise ValueError(f"{weights} records an unreadable model config in its metadata: export it again") from None
    now = config.to_dict()
    changed = [f"{k}: {was[k]!r} in the weights, {now[k]!r} in config.json" for k in sorted(was) if was[k] != now[k]]
    if changed:
        raise ValueError(f"{config_path} is not the config {weights.name} was exported with ({'; '.join(changed)}): "
                         "it was edited after the export, or comes from another model; restore it or export both "
                         "again together")


def model_name(path: str | os.PathLike) -> str:
    """A short name for a model location, used to name result files that default to one.

    `runs/pusht_tiny`, `runs/pusht_tiny/version_0/model` and the `model.safetensors` in it are all
    "pusht_tiny"; a training checkpoint adds its file's stem ("pusht_tiny-last"); an exported
    directory outside a run is named after itself. So evaluating two models with the same command
    writes two files, not one over the other. Characters other than letters, digits and `._+-`
    become `_`.
    """
    path = Path(os.path.abspath(path))
    suffix = ""
    if path.suffix == ".ckpt":
        suffix, path = "-" + path.stem, path.parent
    elif path.name == WEIGHTS_NAME:
        path = path.parent
    generic = ("model", "checkpoints")
    parts = [p for p in path.parts[1:] if p not in generic and not re.fullmatch(r"version_\d+", p)]
    name = parts[-1] if parts else "model"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name + suffix)


def result_path(kind: str, model: str | os.PathLike, seed: int = 0) -> Path:
    """The default result file of an analysis command: `runs/<kind>/<model name>.json`.

    A seed other than 0 adds `-seed<N>` (`runs/probe/pusht_tiny-seed1.json`), as `plan.py` names
    its files, so a second draw lands beside the first instead of replacing it.
    """
    name = model_name(model) + ("" if seed == 0 else f"-seed{seed}")
    return Path("runs") / kind / f"{name}.json"


def version_number(directory: Path) -> int:
    """N of a run's `version_N` folder (-1 for another name), to order versions numerically."""
    tail = Path(directory).name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def find_model(path: str | os.PathLike) -> Path:
    """Resolve a model location: an exported directory, a weights or .ckpt file, a run's version
    directory (`runs/<name>/version_N`: its `model/`), or a run directory.

    For a run directory (e.g. `runs/tworoom_tiny`, holding `version_N/model`) the newest version's
    exported model is returned, so `plan.py --model runs/tworoom_tiny` follows the last training run.
    """
    path = Path(path)
    if path.is_dir() and not (path / WEIGHTS_NAME).exists():
        if (path / "model" / WEIGHTS_NAME).is_file():  # a version directory
            return path / "model"
        versions = [p for p in path.glob("version_*/model") if (p / WEIGHTS_NAME).is_file()]
        versions.sort(key=lambda p: version_number(p.parent))
        if versions:
            return versions[-1]
    return path


def _no_export_hint(path: Path) -> str:
    """For a run or version directory without an exported model: the checkpoints it holds."""
    if not path.is_dir():
        return ""
    ckpts = sorted(path.glob("checkpoints/*.ckpt")) + sorted(path.glob("version_*/checkpoints/*.ckpt"))
    if not ckpts:
        return ""
    shown = ", ".join(str(c) for c in ckpts[-3:])
    return (f" {path} holds no exported model (a run exports one when it ends), but it has training checkpoints, "
            f"which load too: {shown}")


def recorded_data_path(model_path: str | os.PathLike, recorded: str | os.PathLike | None) -> Path | None:
    """The training dataset a model records (config.json `extra.data.path`), found from anywhere.

    Training records the path as it was given, usually relative to where it ran (`data/x.h5`).
    When that does not exist from the working directory, the same relative path is looked for
    next to each folder above the model (`runs/NAME/version_N/model` -> the repository that
    holds `runs/`), so the analysis commands work outside the training directory. Returns the
    recorded path unchanged when nothing is found, for the error message to name it."""
    if recorded is None:
        return None
    path = Path(recorded)
    if path.is_absolute() or path.exists():
        return path
    for folder in Path(os.path.abspath(model_path)).parents:
        if (folder / path).exists():
            return folder / path
    return path
