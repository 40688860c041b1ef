"""Choosing the torch device a command runs on, with a clear error when it is not there.

Example:
    from leworld.device import describe_device, resolve_device, synchronize
    device = resolve_device("auto")   # CUDA if present, else MPS, else the CPU
    resolve_device("cuda")            # ValueError on a machine without a usable GPU
    describe_device("cpu")            # e.g. 'AMD EPYC 7B13 (2 cores visible, 2 torch threads)'
    synchronize(device)               # wait for the device's queued work (benchmark timing)
    frames_to_tensor(obs["pixels"], device)  # an env's (N, H, W, 3) uint8 frames as a tensor there

`--device` of `plan.py`, `surprise.py` and the analysis commands goes through `resolve_device`,
so `--device cuda` on a machine without a usable GPU stops before any work, naming what is
missing, instead of failing inside the first tensor copy.
"""
from __future__ import annotations

import os
import platform

import numpy as np
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


def synchronize(device: str | torch.device) -> None:
    """Wait until `device` has run everything queued on it, before reading a clock: CUDA (that GPU,
    not the current one) and MPS run asynchronously; the CPU needs nothing."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def frames_to_tensor(pixels: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """Host frames (any numpy array, e.g. an env's (N, H, W, 3) uint8 pixels) -> the same values as a
    tensor on `device`, sharing memory with `pixels` where torch can (a writable, C-contiguous array
    on the CPU). Read-only frames, such as Push-T's observations (views of the env's frame cache), are
    copied first: torch does not support wrapping a read-only array (it warns), and a tensor that
    did could write into the env."""
    if not isinstance(pixels, np.ndarray):
        raise TypeError(f"frames_to_tensor takes a numpy array, got {type(pixels).__name__}")
    return torch.from_numpy(np.require(pixels, requirements=("C", "W"))).to(device)


def peak_rss_gib() -> float:
    """This process's peak resident memory in GiB (`ru_maxrss` is KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def describe_device(device: str | torch.device) -> str:
    """The hardware a number was measured on, for benchmark and result records: the GPU's name,
    or the CPU's model with the cores this process may use and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({cpu_model()})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()} ({cores} cores visible, {torch.get_num_threads()} torch threads)"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else whatever `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())
