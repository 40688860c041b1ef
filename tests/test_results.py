"""Result files: atomic JSON with NaN written as null, file hashes, failed writes leave nothing."""
from __future__ import annotations

import hashlib
import json

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


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000  # 1.28 MB: two 1 MiB chunks
    (tmp_path / "w.bin").write_bytes(data)
    assert sha256_file(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()
