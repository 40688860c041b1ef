"""Choosing the torch device a command runs on, with a clear error when it is not there.

Example:
    >>> from leworld.device import resolve_device
    >>> resolve_device("auto")  # CUDA if present, else MPS, else the CPU
    >>> resolve_device("cuda")  # ValueError on a machine without a usable GPU

`--device` of `plan.py`, `surprise.py` and the analysis commands goes through `resolve_device`,
so `--device cuda` on a machine without a usable GPU stops before any work, naming what is
missing, instead of failing inside the first tensor copy.
"""
from __future__ import annotations

import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` (CUDA, else MPS, else CPU), or a torch device string checked to be usable here.

    Raises ValueError for a name torch does not know, a CUDA device on a machine without one
    (or an index past the last GPU) and MPS where it is not available."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA GPU is usable here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not _mps_available():
        raise ValueError(f"device {name!r}: MPS is not available here; use --device cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}: leworld runs on cpu, cuda or mps")
    return device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())
