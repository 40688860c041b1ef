"""Result files: atomic JSON with NaN written as null, file hashes, failed writes leave nothing."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from leworld.results import atomic_write, sha256_file, write_json


def test_write_json_turns_nan_into_null_and_leaves_no_temp_file(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"rate": float("nan"), "ci": (0.1, float("inf")), "n": 3})
    assert json.loads(path.read_text()) == {"rate": None, "ci": [0.1, None], "n": 3}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = write_json(tmp_path / "r.json", {"old": 1})

    def broken(tmp):
        open(tmp, "w").write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path):
    """Ctrl-C while writing (KeyboardInterrupt is not an Exception) keeps the old file and no temp file."""
    path = write_json(tmp_path / "r.json", {"old": 1})

    def interrupted(tmp):
        open(tmp, "w").write("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_results_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000  # 1.28 MB: two 1 MiB chunks
    (tmp_path / "w.bin").write_bytes(data)
    assert sha256_file(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()


def test_a_result_path_that_cannot_be_a_file_is_a_clear_error_before_any_write(tmp_path):
    from leworld.results import check_writable

    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("keep")
    assert check_writable(tmp_path / "new" / "deeper" / "r.json") == tmp_path / "new" / "deeper" / "r.json"
    with pytest.raises(ValueError, match="is a directory"):
        check_writable(tmp_path / "adir")
    with pytest.raises(ValueError, match="afile is a file, not a directory"):
        check_writable(tmp_path / "afile" / "sub" / "r.json")
    with pytest.raises(ValueError, match="is a directory"):
        write_json(tmp_path / "adir", {"x": 1})
    assert list((tmp_path / "adir").iterdir()) == [] and (tmp_path / "afile").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # no temp file, no new folder


def test_resolve_device_names_what_is_missing():
    import torch

    from leworld.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    for bad, message in (("bogus", "unknown device"), ("meta", "runs on cpu, cuda or mps")):
        with pytest.raises(ValueError, match=message):
            resolve_device(bad)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match="no CUDA GPU is usable"):
            resolve_device("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="MPS is not available"):
            resolve_device("mps")
    if not torch.cuda.is_available():  # a torch.device object is checked like its name
        with pytest.raises(ValueError, match="no CUDA GPU is usable"):
            resolve_device(torch.device("cuda"))


def test_describe_device_counts_the_cores_this_process_may_use(monkeypatch):
    import os

    from leworld import device

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert "(1 cores visible" in device.describe_device("cpu")
    monkeypatch.setattr(device.torch.cuda, "get_device_name", lambda d: f"GPU {d}")
    assert device.describe_device("cuda:1") == f"GPU {device.torch.device('cuda:1')}"  # the device asked about


def test_describe_device_names_the_cpu_model_and_threads(monkeypatch):
    import platform

    import torch

    from leworld import device

    text = device.describe_device("cpu")
    assert text.startswith(device.cpu_model()) and f"{torch.get_num_threads()} torch threads" in text
    models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")] \
        if Path("/proc/cpuinfo").exists() else []
    if models:  # Linux: the first processor's model name, read here independently
        assert device.cpu_model() == models[0]
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    assert device.cpu_model() == (platform.processor() or platform.machine() or "unknown CPU")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a folder no file can be written to (Linux /proc)")
def test_check_writable_tries_a_write_where_the_file_would_go(tmp_path):
    """A folder that takes no new file (even for root, as /proc) fails before the work, not at the
    final write; a writable one is left as it was."""
    from leworld.results import check_writable

    with pytest.raises(ValueError, match=r"cannot write /proc/result.json: /proc is not writable"):
        check_writable("/proc/result.json")
    assert check_writable(tmp_path / "new" / "r.json") == tmp_path / "new" / "r.json"
    assert list(tmp_path.iterdir()) == []  # the trial file is gone, and no folder was made


def test_synchronize_waits_for_the_device_it_is_given(monkeypatch):
    """Benchmarks time CUDA and MPS work only after waiting for it: on the device they ran on
    (`cuda:1`, not the current GPU), and on MPS too."""
    import torch

    from leworld.device import synchronize

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append(("mps", None)))
    for name in ("cuda:1", "mps", "cpu", torch.device("cuda", 0)):
        synchronize(name)
    assert waited == [("cuda", torch.device("cuda:1")), ("mps", None), ("cuda", torch.device("cuda:0"))]


def test_frames_to_tensor_copies_read_only_frames_and_shares_writable_ones():
    import numpy as np
    import torch

    from leworld.device import frames_to_tensor

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    shared = frames_to_tensor(frames, "cpu")
    assert shared.dtype == torch.uint8 and np.array_equal(shared.numpy(), frames)
    assert shared.data_ptr() == frames.ctypes.data  # a writable C-contiguous array is wrapped, not copied
    cache = frames.copy()
    cache.flags.writeable = False  # as an env's frame cache
    copied = frames_to_tensor(cache, "cpu")
    assert np.array_equal(copied.numpy(), frames) and copied.data_ptr() != cache.ctypes.data
    copied.zero_()  # writing the tensor cannot reach the env's frames
    assert np.array_equal(cache, frames) and not cache.flags.writeable
    strided = frames[:, ::2]  # not contiguous: copied into a contiguous tensor
    assert np.array_equal(frames_to_tensor(strided, "cpu").numpy(), strided)
    with pytest.raises(TypeError, match="numpy array"):
        frames_to_tensor(torch.zeros(2, 8, 8, 3), "cpu")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak from /proc (Linux)")
def test_peak_rss_is_the_kernels_high_water_mark_in_gib():
    from leworld.device import peak_rss_gib

    peak = peak_rss_gib()
    status = Path("/proc/self/status").read_text()
    hwm_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    assert abs(peak - hwm_kib / 2**20) < 0.05  # both in GiB; the peak can grow between the two reads
