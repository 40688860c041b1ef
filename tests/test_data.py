"""Dataset generation, storage and clip reading."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import json
import re

import h5py
import numpy as np
import pytest
import torch

import envs
from leworld.data import collect as collect_mod
from leworld.data.clips import ClipDataset, action_stats, split_episodes
from leworld.data.collect import collect, main
from leworld.data.datamodule import CollectSpec, LeWMDataModule
from leworld.data.store import DatasetError, EpisodeStore

RES = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tworoom.h5"
    collect("tworoom", episodes=6, steps=30, resolution=RES, noise=1.0, seed=3, out=path, chunk_size=4,
            progress=False)
    return path


def test_round_trip_matches_the_env(dataset):
    store = EpisodeStore(dataset)
    assert store.num_episodes == 6 and store.num_frames == 6 * 31
    block = collect_mod.collect_block("tworoom", 4, 30, RES, "expert", 1.0, 3, 0)
    for e in range(4):
        ep = store.episode(e)
        for name in ("pixels", "action", "proprio", "state"):
            np.testing.assert_array_equal(ep[name], block[name][e])
    meta = store.metadata
    assert meta["env_id"] == "leworld/TwoRoom-v0" and meta["policy"] == "expert" and meta["seed"] == 3
    assert meta["noise"] == 1.0 and meta["resolution"] == RES and "created" in meta and "leworld_version" in meta


def test_action_t_is_taken_from_observation_t(dataset):
    """Replaying stored action t from stored state t reproduces stored observation t + 1."""
    store = EpisodeStore(dataset)
    ep = store.episode(1)
    assert np.isnan(ep["action"][-1]).all() and not np.isnan(ep["action"][:-1]).any()
    env = envs.make_batch("tworoom", num_envs=1, resolution=RES)
    env.reset(seed=0)
    for t in range(30):
        env.set_state(ep["state"][t][None])
        obs = env.step(ep["action"][t][None])
        np.testing.assert_allclose(env.get_state()[0], ep["state"][t + 1], atol=1e-9)
        np.testing.assert_array_equal(obs["pixels"][0], ep["pixels"][t + 1])


def test_same_seed_same_data_for_any_worker_count(tmp_path, dataset):
    other = tmp_path / "again.h5"
    collect("tworoom", episodes=6, steps=30, resolution=RES, noise=1.0, seed=3, out=other, chunk_size=4,
            workers=2, progress=False)
    a, b = EpisodeStore(dataset), EpisodeStore(other)
    for e in range(6):
        np.testing.assert_array_equal(a.episode(e)["pixels"], b.episode(e)["pixels"])
        np.testing.assert_array_equal(a.episode(e)["action"], b.episode(e)["action"])
    third = tmp_path / "seed4.h5"
    collect("tworoom", episodes=6, steps=30, resolution=RES, noise=1.0, seed=4, out=third, chunk_size=4,
            progress=False)
    assert not np.array_equal(EpisodeStore(third).episode(0)["state"], a.episode(0)["state"])


def test_clip_frames_and_action_blocks_align_with_raw_steps(dataset):
    store = EpisodeStore(dataset)
    clips = ClipDataset(store, num_frames=4, frameskip=5, with_state=True)
    assert len(clips) == 6 * (30 - 15 + 1)
    pixels, actions, states = (store.read(k, slice(None)) for k in ("pixels", "action", "state"))
    env = envs.make_batch("tworoom", num_envs=1, resolution=RES)
    env.reset(seed=0)
    for index in (0, 7, 16, 40, len(clips) - 1):
        clip, start = clips[index], int(clips.starts[index])
        assert clip["pixels"].shape == (4, RES, RES, 3) and clip["action"].shape == (3, 10)
        for k in range(4):
            np.testing.assert_array_equal(clip["pixels"][k].numpy(), pixels[start + 5 * k])
        for k in range(3):  # block k = the 5 actions after kept frame k; replaying them reaches frame k + 1
            np.testing.assert_array_equal(clip["action"][k].numpy(), actions[start + 5 * k:start + 5 * k + 5].ravel())
            env.set_state(clip["state"][k].numpy()[None])
            for step_action in clip["action"][k].numpy().reshape(5, 2):
                env.step(step_action[None])
            np.testing.assert_allclose(env.get_state()[0], states[start + 5 * (k + 1)], atol=1e-9)


def test_validation_episodes_never_appear_in_training_clips(dataset):
    store = EpisodeStore(dataset)
    train, val = split_episodes(store.num_episodes, val_fraction=0.34, seed=1)
    assert len(val) == 2 and len(set(train) | set(val)) == 6 and not set(train) & set(val)
    np.testing.assert_array_equal(split_episodes(6, 0.34, seed=1)[1], val)
    clips = ClipDataset(store, episodes=train, num_frames=4, frameskip=5)
    owner = np.searchsorted(store.episode_offset, clips.starts, side="right") - 1
    assert set(owner.tolist()) == set(train.tolist())
    # the last kept frame of every clip lies in the same episode as its first
    end = clips.starts + 15
    assert (end < store.episode_offset[owner] + store.episode_length[owner]).all()


def test_action_stats_use_training_episodes_only(dataset):
    store = EpisodeStore(dataset)
    train = np.array([0, 2, 5])
    mean, std = action_stats(store, train)
    rows = np.concatenate([store.episode(e)["action"][:-1] for e in train]).astype(np.float64)
    np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, rows.std(0), rtol=1e-5)


@pytest.mark.parametrize("value, columns, step", [
    (np.nan, slice(None), 3),  # a whole NaN row inside the episode
    (np.inf, 0, 0),  # inf in one column, in the episode's first row
    (-np.inf, 1, 3),
    (np.nan, 1, 0),  # a NaN in one column only
])
def test_non_finite_actions_inside_episodes_are_a_clear_error(dataset, tmp_path, value, columns, step):
    import shutil

    spoiled = tmp_path / "spoiled.h5"
    shutil.copy(dataset, spoiled)
    store = EpisodeStore(spoiled)
    row = int(store.episode_offset[5]) + step
    del store
    with h5py.File(spoiled, "r+") as f:
        action = f["action"][row]
        action[columns] = value
        f["action"][row] = action
    with pytest.raises(ValueError, match="1 non-finite action row.*the first in episode 5"):
        action_stats(EpisodeStore(spoiled), np.array([0, 2, 5]))
    mean, _ = action_stats(EpisodeStore(spoiled), np.array([0, 2]))  # the other episodes are fine
    assert np.isfinite(mean).all()


def test_failed_collection_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "d.h5"
    calls = {"n": 0}
    real = collect_mod.collect_block

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*args)

    monkeypatch.setattr(collect_mod, "collect_block", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        collect("tworoom", episodes=8, steps=5, resolution=RES, out=path, chunk_size=2, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(collect_mod, "collect_block", real)
    collect("tworoom", episodes=2, steps=5, resolution=RES, out=path, progress=False)
    before = path.read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(collect_mod, "collect_block", failing)
    with pytest.raises(RuntimeError):
        collect("tworoom", episodes=8, steps=5, resolution=RES, out=path, chunk_size=2, overwrite=True,
                progress=False)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]


def test_killed_collection_leaves_no_valid_looking_file(tmp_path):
    path = tmp_path / "killed.h5"
    cmd = [sys.executable, "-m", "leworld.data.collect", "--env", "tworoom", "--episodes", "4000", "--steps", "100",
           "--resolution", "64", "--out", str(path), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not path.exists()
    leftovers = list(tmp_path.iterdir())
    assert leftovers and all(p.name.startswith(".") and p.name.endswith(".tmp") for p in leftovers)
    try:  # opened by hand it is either unreadable or marked incomplete
        with h5py.File(leftovers[0], "r") as f:
            assert not f.attrs["complete"]
    except OSError:
        pass
    with pytest.raises(DatasetError, match="incomplete"):
        EpisodeStore(leftovers[0])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_that_python_would_drop_still_aborts_and_keeps_the_old_file(tmp_path, monkeypatch, sig):
    """Python drops an exception raised inside a garbage-collection callback (h5py runs some),
    so a Ctrl-C that lands there once let the run finish and replace the file. The signal is
    raised here inside such a swallowing frame; the collector must abort all the same."""
    path = tmp_path / "d.h5"
    collect("tworoom", episodes=2, steps=5, resolution=RES, out=path, progress=False)
    before = path.read_bytes()
    real = collect_mod.EpisodeWriter.append
    calls = {"n": 0}

    def append_then_signal(self, block):
        real(self, block)
        calls["n"] += 1
        if calls["n"] == 1:
            try:
                signal.raise_signal(sig)
            except KeyboardInterrupt:  # what a GC callback does with it
                pass

    monkeypatch.setattr(collect_mod.EpisodeWriter, "append", append_then_signal)
    with pytest.raises(KeyboardInterrupt):
        collect("tworoom", episodes=8, steps=5, resolution=RES, out=path, chunk_size=2, overwrite=True,
                progress=False)
    assert calls["n"] == 1 and path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_an_interrupt_after_the_last_block_still_keeps_the_old_file(tmp_path, monkeypatch):
    """A signal swallowed while the summary is written, after the last block, must still stop the
    rename that would replace the existing file."""
    path = tmp_path / "d.h5"
    collect("tworoom", episodes=2, steps=5, resolution=RES, out=path, progress=False)
    before = path.read_bytes()
    real = collect_mod.EpisodeWriter.update_metadata

    def summary_then_signal(self, **fields):
        real(self, **fields)
        try:
            signal.raise_signal(signal.SIGTERM)
        except KeyboardInterrupt:  # dropped, as inside a garbage-collection callback
            pass

    monkeypatch.setattr(collect_mod.EpisodeWriter, "update_metadata", summary_then_signal)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        collect("tworoom", episodes=4, steps=5, resolution=RES, out=path, chunk_size=2, overwrite=True,
                progress=False)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]


def _read_in_child(store, queue):
    rows = store.read("pixels", np.array([5, 2]))
    queue.put((store._pid == os.getpid(), rows))


def test_a_forked_process_opens_the_file_again_instead_of_sharing_the_parents_handle(dataset):
    """HDF5 handles must not cross a fork (a loader worker reading through its parent's handle
    shares its file position and cache); a child reopens the file on its first read."""
    import multiprocessing as mp

    store = EpisodeStore(dataset)
    want = store.read("pixels", np.array([5, 2]))  # the parent has the file open now
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(store, queue))
    child.start()
    own_handle, rows = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and own_handle
    np.testing.assert_array_equal(rows, want)
    assert store._pid == os.getpid()  # the parent's handle is untouched


def test_a_second_ctrl_c_during_the_cleanup_still_removes_the_partial_file(tmp_path, monkeypatch):
    """Ctrl-C pressed again while the first one's cleanup runs must not cut it short and leave the
    partial file behind (which can be gigabytes)."""
    path = tmp_path / "d.h5"
    collect("tworoom", episodes=2, steps=5, resolution=RES, out=path, progress=False)
    before = path.read_bytes()
    real_append, real_abort = collect_mod.EpisodeWriter.append, collect_mod.EpisodeWriter.abort
    pressed = []

    def append_then_ctrl_c(self, block):
        real_append(self, block)
        pressed.append("first")
        signal.raise_signal(signal.SIGINT)

    def abort_after_a_second_ctrl_c(self):
        pressed.append("second")
        signal.raise_signal(signal.SIGINT)
        real_abort(self)

    monkeypatch.setattr(collect_mod.EpisodeWriter, "append", append_then_ctrl_c)
    monkeypatch.setattr(collect_mod.EpisodeWriter, "abort", abort_after_a_second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        collect("tworoom", episodes=8, steps=5, resolution=RES, out=path, chunk_size=2, overwrite=True,
                progress=False)
    assert pressed == ["first", "second"] and path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_hdf5_file_of_another_program_is_not_called_incomplete(tmp_path):
    """Advice to delete a file is for our own unfinished writes, never for someone else's data."""
    other = tmp_path / "theirs.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DatasetError, match="is an HDF5 file but not a leworld dataset") as info:
        EpisodeStore(other)
    assert "delete" not in str(info.value)


def test_a_writer_that_cannot_start_leaves_no_partial_file(tmp_path):
    from leworld.data.store import EpisodeWriter

    with pytest.raises(ValueError, match="bogus"):
        EpisodeWriter(tmp_path / "x.h5", resolution=8, action_dim=2, proprio_dim=2, state_dim=4,
                      metadata={"env": "tworoom"}, compression="bogus")
    assert list(tmp_path.iterdir()) == []


def test_a_rejected_block_leaves_every_field_as_long_as_the_episodes(tmp_path):
    """A block with one misshapen field is refused before anything is written: the file closed
    afterwards holds exactly the accepted episodes' rows in every field."""
    from leworld.data.store import EpisodeWriter

    def block(num_eps, length, bad=None):
        fields = {"pixels": np.zeros((num_eps, length, 16, 16, 3), np.uint8),
                  "action": np.zeros((num_eps, length, 2), np.float32),
                  "proprio": np.zeros((num_eps, length, 2), np.float32), "state": np.zeros((num_eps, length, 4))}
        if bad:
            fields[bad] = np.zeros((num_eps, length + 1, *fields[bad].shape[2:]), fields[bad].dtype)
        return fields

    writer = EpisodeWriter(tmp_path / "x.h5", resolution=16, action_dim=2, proprio_dim=2, state_dim=4, metadata={})
    writer.append(block(2, 5))
    for bad in ("action", "proprio", "state"):  # fields checked after pixels in the writing order
        with pytest.raises(ValueError, match=f"{bad} has shape"):
            writer.append(block(3, 5, bad))
    writer.close()
    store = EpisodeStore(tmp_path / "x.h5")
    with h5py.File(tmp_path / "x.h5") as f:
        assert {name: f[name].shape[0] for name in ("pixels", "action", "proprio", "state")} == dict.fromkeys(
            ("pixels", "action", "proprio", "state"), 10)
    assert store.num_episodes == 2 and int(store.episode_length.sum()) == store.num_frames == 10


def test_two_writers_of_one_path_neither_collide_nor_replace_each_other(tmp_path):
    """Two writers of the same target in one process get their own temporary files; the second to
    finish, not told to overwrite, keeps the first one's file and drops its own."""
    from leworld.data.store import EpisodeWriter

    block = {"pixels": np.zeros((1, 3, 16, 16, 3), np.uint8), "action": np.zeros((1, 3, 2), np.float32),
             "proprio": np.zeros((1, 3, 2), np.float32), "state": np.zeros((1, 3, 4))}
    kw = dict(resolution=16, action_dim=2, proprio_dim=2, state_dim=4)
    first = EpisodeWriter(tmp_path / "x.h5", metadata={"writer": 1}, **kw)
    second = EpisodeWriter(tmp_path / "x.h5", metadata={"writer": 2}, **kw)
    assert first.tmp_path != second.tmp_path
    first.append(block), second.append(block), second.append(block)
    first.close()
    with pytest.raises(FileExistsError, match="appeared while this dataset was being written"):
        second.close()
    assert EpisodeStore(tmp_path / "x.h5").metadata["writer"] == 1 and EpisodeStore(tmp_path / "x.h5").num_episodes == 1
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5"]
    assert (tmp_path / "x.h5").stat().st_mode & 0o777 == 0o644
    third = EpisodeWriter(tmp_path / "x.h5", metadata={"writer": 3}, overwrite=True, **kw)
    third.append(block)
    third.close()
    assert EpisodeStore(tmp_path / "x.h5").metadata["writer"] == 3


def test_numpy_numbers_are_taken_as_arguments_and_stored_as_plain_ones(tmp_path):
    """A sweep over np.arange passes numpy scalars; the metadata must still be JSON, and equal
    to the one from plain numbers, and a fractional count is a clear error."""
    common = dict(env="tworoom", resolution=16, workers=1, progress=False)
    a = collect(episodes=np.int64(2), steps=np.int32(4), seed=np.int64(3), noise=np.float32(0.5),
                out=tmp_path / "a.h5", **common)
    b = collect(episodes=2, steps=4, seed=3, noise=0.5, out=tmp_path / "b.h5", **common)
    meta_a, meta_b = EpisodeStore(a).metadata, EpisodeStore(b).metadata
    for meta in (meta_a, meta_b):
        meta.pop("created"), meta.pop("seconds", None), meta.pop("steps_per_second", None)
    assert meta_a == meta_b and type(meta_a["seed"]) is int
    np.testing.assert_array_equal(EpisodeStore(a).read("pixels", slice(None)), EpisodeStore(b).read("pixels", slice(None)))
    with pytest.raises(ValueError, match="--episodes must be an integer, got 2.5"):
        collect(episodes=2.5, steps=4, out=tmp_path / "c.h5", **common)
    assert not (tmp_path / "c.h5").exists()


def test_ctrl_c_to_the_process_group_stops_parallel_collection_at_once(tmp_path):
    """Ctrl-C reaches the workers too; they leave it to the parent, which must stop the pool
    and delete the partial file instead of hanging on workers killed mid-block."""
    path = tmp_path / "p.h5"
    cmd = [sys.executable, "-m", "leworld.data.collect", "--env", "pusht", "--episodes", "3000", "--steps", "30",
           "--resolution", "64", "--workers", "2", "--out", str(path), "--quiet"]  # 6 MB blocks: long sends
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(1.0)  # blocks are being written while the workers run the next ones
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("collection hung after Ctrl-C")
    assert proc.returncode == 130 and "interrupted: nothing was written" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--env", "mars"], "unknown env 'mars'"),
    (["--env", "tworoom", "--noise", "nan"], "finite number >= 0"),
    (["--env", "tworoom", "--workers", "0"], "--workers must be a positive integer"),
    (["--env", "tworoom", "--resolution", "100000"], "--resolution must be between 16 and 1024"),
    (["--env", "tworoom", "--resolution", "15"], "--resolution must be between 16 and 1024"),
    (["--env", "tworoom", "--resolution", "1025"], "--resolution must be between 16 and 1024"),
    (["--env", "tworoom", "--episodes", "0"], "--episodes must be a positive integer"),
    (["--env", "tworoom", "--steps", "-3"], "--steps must be a positive integer"),
    (["--env", "tworoom", "--policy", "teleporter"], "unknown policy 'teleporter'"),
    (["--env", "tworoom", "--noise", "-1"], "--noise"),
    (["--env", "tworoom", "--supersample", "4"], "--supersample is a Push-T rendering option"),
    (["--env", "tworoom", "--seed", "-1"], "--seed must be an integer >= 0"),
])
def test_bad_arguments_give_clear_errors(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "x.h5"), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


def test_existing_and_unwritable_outputs_are_refused(tmp_path, capsys):
    path = tmp_path / "d.h5"
    args = ["--env", "tworoom", "--episodes", "2", "--steps", "5", "--resolution", "32", "--quiet"]
    assert main([*args, "--out", str(path)]) == 0
    assert "episodes  2" in capsys.readouterr().out
    assert main([*args, "--out", str(path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path)]) == 2  # a directory is refused as such, not as "exists"
    assert "is a directory" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main([*args, "--out", str(blocker / "sub" / "d.h5")]) == 2
    assert "cannot create the directory" in capsys.readouterr().err
    if os.geteuid() != 0:  # root can write anywhere; the directory case above covers it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main([*args, "--out", str(locked / "d.h5")]) == 2


def test_missing_dataset_error_says_how_to_make_it(tmp_path):
    with pytest.raises(DatasetError, match="python -m leworld.data.collect"):
        EpisodeStore(tmp_path / "nothing.h5")
    with pytest.raises(DatasetError, match="is a directory: a dataset is one .h5 file"):
        EpisodeStore(tmp_path)


@pytest.mark.parametrize("policy", ["mix", "contact"])
def test_pusht_collection_round_trips_with_parallel_workers(tmp_path, policy):
    path = tmp_path / "pusht.h5"
    collect("pusht", episodes=4, steps=12, resolution=RES, policy=policy, seed=1, out=path, chunk_size=2, workers=2,
            progress=False)
    store = EpisodeStore(path)
    assert store.metadata["env_id"] == "leworld/PushT-v0" and store.metadata["policy"] == policy
    assert store.num_episodes == 4 and store.action_dim == 2
    for block in range(2):
        expected = collect_mod.collect_block("pusht", 2, 12, RES, policy, None, 1, block)
        for e in range(2):
            ep = store.episode(2 * block + e)
            for name in ("pixels", "action", "proprio", "state"):
                np.testing.assert_array_equal(ep[name], expected[name][e])
    clips = ClipDataset(store, num_frames=2, frameskip=5)
    assert clips[0]["pixels"].shape == (2, RES, RES, 3) and clips[0]["action"].shape == (1, 10)


def test_validation_batches_span_episodes_and_repeat_exactly(tmp_path):
    """A validation pass cut short by limit_val_batches must still see many episodes (its SIGReg
    and effective rank are batch statistics), and every pass must see the same clips."""
    from leworld.data.datamodule import LeWMDataModule

    path = tmp_path / "tr.h5"
    collect("tworoom", episodes=40, steps=30, resolution=16, noise=1.0, seed=0, out=path, progress=False)
    dm = LeWMDataModule(str(path), num_frames=2, frameskip=5, batch_size=16, num_workers=0, val_fraction=0.5)
    dm.setup("fit")
    val = dm.val_set
    loader = dm.val_dataloader()
    first = [list(loader.sampler)[:16] for _ in range(2)]
    assert first[0] == first[1]  # the same clips on every pass
    assert sorted(loader.sampler) == list(range(len(val)))  # every clip exactly once per full pass
    owner = np.searchsorted(val.store.episode_offset, val.starts[first[0]], side="right") - 1
    # 20 episodes of 26 clips each: sequential order would put all 16 in the first episode
    assert len(set(owner.tolist())) >= 8
    batch = next(iter(loader))
    np.testing.assert_array_equal(batch["pixels"].numpy(), val.__getitems__(first[0])["pixels"].numpy())


def test_supersampled_pusht_data_has_the_same_episodes_and_records_the_setting(tmp_path):
    plain, fine = tmp_path / "plain.h5", tmp_path / "fine.h5"
    collect("pusht", episodes=2, steps=10, resolution=RES, policy="mix", seed=2, out=plain, workers=1, progress=False)
    assert main(["--env", "pusht", "--episodes", "2", "--steps", "10", "--resolution", str(RES), "--policy", "mix",
                 "--seed", "2", "--workers", "1", "--supersample", "4", "--out", str(fine), "--quiet"]) == 0
    a, b = EpisodeStore(plain), EpisodeStore(fine)
    assert a.metadata["env_params"]["supersample"] == 1 and b.metadata["env_params"]["supersample"] == 4
    for e in range(2):
        ea, eb = a.episode(e), b.episode(e)
        for name in ("action", "proprio", "state"):
            np.testing.assert_array_equal(ea[name], eb[name])
        assert not np.array_equal(ea["pixels"], eb["pixels"])
        env = envs.make_batch("pusht", 1, resolution=RES, supersample=4)  # the frames are that env's drawing
        env.set_state(eb["state"][3][None])
        np.testing.assert_array_equal(env.render()[0], eb["pixels"][3])


def test_an_existing_file_drawn_otherwise_than_generate_says_is_refused(tmp_path):
    path = tmp_path / "pusht_ss2.h5"
    collect("pusht", episodes=2, steps=12, resolution=RES, policy="mix", out=path, workers=1, progress=False,
            supersample=2)

    def setup(**spec):
        dm = LeWMDataModule(str(path), num_frames=2, frameskip=5, batch_size=2, num_workers=0, val_fraction=0.5,
                            generate=CollectSpec(**{"env": "pusht", "episodes": 2, "resolution": RES, **spec}))
        dm.prepare_data()
        dm.setup("fit")
        return dm

    assert setup(supersample=2).resolution == RES
    with pytest.raises(ValueError, match=r"supersample 2 \(generate.supersample is 1\).*new file"):
        setup()
    with pytest.raises(ValueError, match=r"env 'pusht' \(generate.env is 'tworoom'\)"):
        setup(env="tworoom", supersample=2)
    with pytest.raises(ValueError, match=r"resolution 32 \(generate.resolution is 64\)"):
        setup(resolution=64, supersample=2)
    dm = LeWMDataModule(str(path), num_frames=2, frameskip=5, batch_size=2, num_workers=0, val_fraction=0.5)
    dm.setup("fit")  # without a generate spec any existing file is used as it is


def test_an_existing_file_of_other_size_or_policy_than_generate_says_is_used_with_a_warning(dataset, caplog):
    """A leftover file (say a 6-episode trial's) under the configured path is trained on, not
    regenerated: the run says what the file holds and how it differs from data.generate."""
    import logging
    import warnings

    def setup(**spec):
        dm = LeWMDataModule(str(dataset), num_frames=2, frameskip=5, batch_size=2, num_workers=0,
                            generate=CollectSpec(**{"env": "tworoom", "resolution": RES, **spec}))
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
            warnings.simplefilter("always")
            dm.setup("fit")
        return [str(w.message) for w in caught if "not generated as data.generate says" in str(w.message)]

    # the dataset: 6 episodes of 30 steps, expert policy, noise 1.0, seed 3
    assert setup(episodes=6, steps=30, noise=1.0, seed=3) == []
    assert f"data: {dataset}: 6 episodes (5 for training, 1 held out), {RES} px, policy expert, seed 3" in caplog.text
    (message,) = setup(episodes=3000, steps=30, noise=2.0, seed=3, policy="random")
    assert "it has episodes 6 (data.generate.episodes is 3000), policy 'expert' (data.generate.policy is " \
           "'random'), noise 1.0 (data.generate.noise is 2.0)" in message and "point data.path at a new file" in message
    assert setup(episodes=6, steps=30, noise=None, seed=3, policy=None) == []  # the default policy; noise unset


def test_a_datasets_identity_is_what_it_holds_not_when_or_by_which_version_it_was_written(tmp_path):
    """The collector seeds each chunk of episodes on its own, so the chunk size changes the data and
    belongs to the identity a checkpoint records; the time and the package version do not."""
    ids = []
    for chunk in (2, 4):
        path = tmp_path / f"c{chunk}.h5"
        collect("tworoom", episodes=4, steps=10, resolution=RES, seed=0, out=path, chunk_size=chunk, progress=False)
        dm = LeWMDataModule(str(path), num_frames=2, frameskip=2, batch_size=2, num_workers=0, val_fraction=0.25)
        dm.setup("fit")
        ids.append(dm.dataset_identity())
    assert not np.array_equal(EpisodeStore(tmp_path / "c2.h5").read("state", np.arange(20)),
                              EpisodeStore(tmp_path / "c4.h5").read("state", np.arange(20)))
    assert ids[0] != ids[1] and {k for k in ids[0] if ids[0][k] != ids[1][k]} == {"chunk_size"}
    assert not {"created", "seconds", "steps_per_second", "leworld_version"} & set(ids[0])
    assert ids[0]["num_episodes"] == 4 and ids[0]["seed"] == 0


def test_epoch_sampler_orders_resume_and_shards_like_the_uninterrupted_epoch():
    from leworld.data.datamodule import DistributedEpochSampler, EpochSampler

    size, bs, world = 23, 3, 2
    whole = EpochSampler(size, seed=4)
    whole.set_epoch(2)
    order = list(whole)
    assert sorted(order) == list(range(size)) and order == list(whole)  # a permutation, fixed by (seed, epoch)
    whole.set_epoch(3)
    assert list(whole) != order

    def orders(epochs):
        s = EpochSampler(size, seed=4)
        out = []
        for e in range(epochs):
            s.set_epoch(e)
            out.append(list(s))
        return out

    def stream(shards, per_epoch, span):
        """The uninterrupted run's batches, written out: epoch after epoch, each cut into batches."""
        return [shard[b * span:(b + 1) * span] for shard in shards for b in range(per_epoch)]

    # following a run: a pass begins at the batch the run has reached, across an epoch's end too,
    # whatever epoch was announced; 7 batches of 3 an epoch (2 clips dropped), or 4 under a limit
    for per_epoch in (7, 4):
        batches = stream(orders(6), per_epoch, bs)
        for start in (0, 2, 6, 7, 9, 20):
            s = EpochSampler(size, seed=4)
            s.follow(lambda: start, per_epoch, bs)
            s.set_epoch(99)
            drawn = list(s)
            assert len(drawn) == size
            assert [drawn[i * bs:(i + 1) * bs] for i in range(per_epoch)] == batches[start:start + per_epoch]
    # sharded: rank r takes positions r, r + world, ... of the padded order, and follows its own stream
    shards = [DistributedEpochSampler(size, 4, world, r) for r in range(world)]
    for s in shards:
        s.set_epoch(2)
    padded = order + order[:1]  # 23 -> 24 positions
    assert [list(s) for s in shards] == [padded[r::world] for r in range(world)]
    assert all(len(s) == 12 for s in shards)
    for r, s in enumerate(shards):  # 4 batches of 3 on every rank an epoch
        rank_batches = stream([(o + o[:1])[r::world] for o in orders(6)], 4, bs)
        for start in (0, 3, 4, 9):
            s.follow(lambda: start, 4, bs)
            drawn = list(s)
            assert len(drawn) == 12 and [drawn[i * bs:(i + 1) * bs] for i in range(4)] == rank_batches[start:start + 4]


@pytest.mark.parametrize("size, world", [(1, 3), (3, 8), (5, 4)])
def test_shards_are_equal_even_with_fewer_items_than_ranks(size, world):
    """Ranks must agree on the number of steps (DDP would hang otherwise): with fewer clips than
    padding needs, the order repeats as often as needed, as torch's DistributedSampler pads."""
    from torch.utils.data import DistributedSampler

    from leworld.data.datamodule import DistributedEpochSampler

    shards = [list(DistributedEpochSampler(size, 0, world, r)) for r in range(world)]
    theirs = [list(DistributedSampler(range(size), world, r, shuffle=False)) for r in range(world)]
    assert [len(s) for s in shards] == [len(t) for t in theirs] == [-(-size // world)] * world
    assert set(sum(shards, [])) == set(range(size))


@pytest.mark.parametrize("size, world", [(81, 2), (80, 2), (10, 3), (2, 3)])
def test_validation_shares_under_ddp_repeat_no_clip(size, world):
    """Under DDP each process validates its share of the fixed order, cut to a multiple of the
    processes: equal shares (SIGReg's all-reduce needs them), no clip twice (Lightning's padding
    would count repeated clips twice in the metrics), at most world - 1 clips left out."""
    from leworld.data.datamodule import DistributedFixedShuffleSampler, FixedShuffleSampler

    shares = [list(DistributedFixedShuffleSampler(size, 7, world, r)) for r in range(world)]
    whole = list(FixedShuffleSampler(size, 7))
    kept = size // world * world
    assert [len(x) for x in shares] == [size // world] * world
    assert sorted(sum(shares, [])) == sorted(whole[:kept])  # the first `kept` of the one-process order
    assert shares == [list(DistributedFixedShuffleSampler(size, 7, world, r)) for r in range(world)]  # every pass


def test_the_validation_loader_under_ddp_keeps_its_shares(dataset):
    """The data module hands each rank its share (a DistributedSampler, which Lightning leaves in
    place instead of wrapping it with padding), and one process the whole order."""
    from types import SimpleNamespace

    from leworld.data.datamodule import DistributedFixedShuffleSampler

    dm = LeWMDataModule(str(dataset), num_frames=2, frameskip=5, batch_size=4, num_workers=0, val_fraction=0.34)
    dm.setup("fit")
    size = len(dm.val_set)
    seen = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.val_dataloader()
        assert isinstance(loader.sampler, DistributedFixedShuffleSampler)
        seen.append([int(i) for i in loader.sampler])
    assert len(seen[0]) == len(seen[1]) == size // 2 and not set(seen[0]) & set(seen[1])
    dm.trainer = None
    assert len(list(dm.val_dataloader().sampler)) == size


def test_a_bad_generate_setting_is_named_as_the_config_key(tmp_path):
    dm = LeWMDataModule(str(tmp_path / "new.h5"), generate=CollectSpec(env="tworoom", episodes=0))
    with pytest.raises(ValueError, match="data.generate: --episodes must be a positive integer"):
        dm.prepare_data()
    assert list(tmp_path.iterdir()) == []


def fitting_trainer(world=1, rank=0, processed=0, limit=1.0):
    """What the data module reads of a Trainer that fits: its processes, this one's rank, the
    batches the run has trained on, and limit_train_batches."""
    from types import SimpleNamespace

    progress = SimpleNamespace(batch_progress=SimpleNamespace(total=SimpleNamespace(processed=processed)))
    return SimpleNamespace(state=SimpleNamespace(fn="fit"), ckpt_path="last.ckpt", world_size=world,
                           global_rank=rank, limit_train_batches=limit,
                           fit_loop=SimpleNamespace(epoch_loop=progress))


def test_ddp_ranks_deal_one_process_batches_without_repeating_a_clip(dataset):
    """Under DDP a step's batches over the ranks hold the clips of one process's batch of their
    total size, so a run can resume on another number of processes at the same clips per step; and
    no clip is trained on twice in an epoch (shares padded to equal length repeated one: 104 clips
    on 3 ranks were 35 each, 5 batches of 7, with a clip on two ranks)."""
    dm = LeWMDataModule(str(dataset), num_frames=2, frameskip=5, batch_size=21, num_workers=0, val_fraction=0.34)
    dm.setup("fit")
    assert len(dm.train_set) == 104  # 4 steps of 21 clips an epoch, on 1 process or on 3 with 7 each

    def batches(batch_size, world, rank, start):
        dm.hparams.batch_size = batch_size
        dm.trainer = fitting_trainer(world, rank, processed=start)
        return [list(b) for b in dm.train_dataloader().batch_sampler]

    for start in (0, 2, 5, 9):  # a pass of the run from this step: across epochs' ends too
        one = batches(21, 1, 0, start)
        ranks = [batches(7, 3, r, start) for r in range(3)]
        assert len(one) == 4 and [len(b) for b in ranks] == [4, 4, 4]
        assert [sorted(sum(step, [])) for step in zip(*ranks)] == [sorted(b) for b in one]
    epoch = [i for step in zip(*[batches(7, 3, r, 0) for r in range(3)]) for b in step for i in b]
    assert len(epoch) == len(set(epoch)) == 84


def test_a_resume_refuses_other_clips_per_step_or_steps_per_epoch(dataset):
    """The run's position in the clip order is counted in steps: resumed with other clips per step
    or steps per epoch, it would point elsewhere in the order and repeat some clips and skip others
    (an epoch of 208 clips drew 52 twice). The same clips per step on another number of processes
    is the same order, and checkpoints without the record resume as before."""
    def module(batch_size=4, world=1, limit=1.0):
        dm = LeWMDataModule(str(dataset), num_frames=2, frameskip=5, batch_size=batch_size, num_workers=0,
                            val_fraction=0.34)
        dm.setup("fit")
        dm.trainer = fitting_trainer(world, limit=limit)
        return dm

    state = module().state_dict()
    assert state["stream"] == {"clips_per_step": 4, "steps_per_epoch": 26, "batch_size": 4, "processes": 1,
                               "shares": "cut"}
    module().load_state_dict(state)
    module(batch_size=2, world=2).load_state_dict(state)  # 2 clips on each of 2 processes
    module(limit=26).load_state_dict(state)  # a limit that leaves the epoch as it was
    with pytest.raises(ValueError, match=re.escape(
            "last.ckpt was trained with 4 clips per step (data.batch_size 4 on 1 process), 26 steps per epoch; this "
            "run would train with 8 clips per step (data.batch_size 8 on 1 process), 13 steps per epoch")):
        module(batch_size=8).load_state_dict(state)
    with pytest.raises(ValueError, match="4 clips per step \\(data.batch_size 2 on 2 processes\\), 13 steps per epoch"):
        module(batch_size=2, world=2, limit=0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="repeat some training clips and skip others"):
        module(batch_size=4, world=2).load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "stream"}
    module(batch_size=8).load_state_dict(older)
    scored = module(batch_size=8)
    scored.trainer.state.fn = "validate"
    scored.load_state_dict(state)  # scoring a checkpoint uses no training clips


def test_ddp_runs_resumed_from_checkpoints_without_the_stream_record_keep_their_padded_shares(dataset):
    """Before the stream was recorded, DDP shares were padded to equal length: 104 clips on 3
    ranks in batches of 7 made 5 steps an epoch, where cut shares make 4. Resumed from such a
    checkpoint (or from a later one of that run), the run goes on with the padded shares."""
    from leworld.data.datamodule import DistributedEpochSampler

    def module(rank=0, processed=0):
        dm = LeWMDataModule(str(dataset), num_frames=2, frameskip=5, batch_size=7, num_workers=0, val_fraction=0.34)
        dm.setup("fit")
        dm.trainer = fitting_trainer(3, rank, processed=processed)
        return dm

    state = module().state_dict()
    assert state["stream"]["steps_per_epoch"] == 4 and state["stream"]["shares"] == "cut"
    older = {k: v for k, v in state.items() if k != "stream"}
    for rank in range(3):
        dm = module(rank, processed=6)
        dm.load_state_dict(older)
        padded = DistributedEpochSampler(104, 0, 3, rank)  # the shares of the runs before
        shards = [padded.shard(e) for e in (1, 2)]
        drawn = [list(b) for b in dm.train_dataloader().batch_sampler]
        assert drawn == [shards[0][7:14], shards[0][14:21], shards[0][21:28], shards[0][28:35],
                         shards[1][0:7]]  # 5 steps an epoch: step 6 is the second of epoch 1
        assert dm.state_dict()["stream"] == {"clips_per_step": 21, "steps_per_epoch": 5, "batch_size": 7,
                                             "processes": 3, "shares": "padded"}
        again = module(rank, processed=6)
        again.load_state_dict(dm.state_dict())  # a later checkpoint of the resumed run
        assert [list(b) for b in again.train_dataloader().batch_sampler] == drawn


def test_a_resumed_data_module_refuses_another_split_or_dataset_and_takes_its_own(dataset, tmp_path):
    """`load_state_dict` (what Lightning calls on resume) accepts the checkpoint's own split and
    dataset, refuses another split seed or fraction (the validation episodes would include ones
    trained on) and another dataset, and checks nothing when a checkpoint is only scored."""
    from types import SimpleNamespace

    def module(path=dataset, **kwargs):
        dm = LeWMDataModule(str(path), num_frames=2, frameskip=5, batch_size=4, num_workers=0,
                            **{"val_fraction": 0.34, "split_seed": 3, **kwargs})
        dm.setup("fit")
        dm.trainer = fitting_trainer()
        return dm

    state = module().state_dict()
    module().load_state_dict(state)  # the same settings resume
    for other in ({"split_seed": 4}, {"val_fraction": 0.5}):
        assert not np.array_equal(module(**other).val_episodes, module().val_episodes)
        with pytest.raises(ValueError, match="other validation episodes than last.ckpt"):
            module(**other).load_state_dict(state)
    elsewhere = tmp_path / "other.h5"
    collect("tworoom", episodes=6, steps=30, resolution=RES, noise=1.0, seed=4, out=elsewhere, chunk_size=4,
            progress=False)
    differs = r"does not hold the dataset last.ckpt was trained on:(.|\n)*seed: 4 \(the checkpoint's: 3\)"
    with pytest.raises(ValueError, match=differs):
        module(elsewhere).load_state_dict(state)
    scored = module(split_seed=4)
    scored.trainer.state.fn = "validate"
    scored.load_state_dict(state)  # scoring a checkpoint on other episodes is allowed


def test_data_module_uses_its_split_seed_and_training_action_statistics(dataset):
    """The episode split follows data.split_seed, and the action statistics are those of the
    training episodes alone (computed here from the raw rows)."""
    dm = LeWMDataModule(str(dataset), num_frames=2, frameskip=5, batch_size=4, num_workers=0, val_fraction=0.34,
                        split_seed=3)
    dm.setup("fit")
    train, val = split_episodes(6, 0.34, 3)
    np.testing.assert_array_equal(dm.val_episodes, val)
    np.testing.assert_array_equal(dm.train_episodes, train)
    assert not np.array_equal(val, split_episodes(6, 0.34, 0)[1])  # seed 3 is another split than seed 0
    store = EpisodeStore(dataset)
    rows = np.concatenate([store.episode(e)["action"][:-1] for e in train]).astype(np.float64)  # actions taken
    everything = np.concatenate([store.episode(e)["action"][:-1] for e in range(6)]).astype(np.float64)
    np.testing.assert_allclose(dm.action_mean, rows.mean(0), rtol=1e-6)
    np.testing.assert_allclose(dm.action_std, rows.std(0), rtol=1e-5)
    assert np.abs(dm.action_mean - everything.mean(0)).max() > 1e-3  # validation rows would show


def test_validation_order_is_the_same_whatever_epoch_lightning_sets(dataset):
    """Lightning calls set_epoch on every sampler that has it: the validation clips must not move."""
    dm = LeWMDataModule(str(dataset), num_frames=2, frameskip=5, batch_size=4, num_workers=0, val_fraction=0.34)
    dm.setup("fit")
    sampler = dm.val_dataloader().sampler
    first = list(sampler)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(3)
    assert list(sampler) == first and first != sorted(first)


@pytest.mark.parametrize("batch_size", [7, 103])
def test_no_training_batch_holds_a_single_clip(dataset, batch_size):
    """A last batch of one clip would break the projector's BatchNorm: with 104 training clips,
    batches of 103 would leave exactly one."""
    dm = LeWMDataModule(str(dataset), num_frames=2, frameskip=5, batch_size=batch_size, num_workers=0,
                        val_fraction=0.34)
    dm.setup("fit")
    assert len(dm.train_set) == 104
    sizes = [len(b["action"]) for b in dm.train_dataloader()]
    assert sizes == [batch_size] * (104 // batch_size)  # full batches only


def test_an_episode_exactly_one_clip_long_gives_one_clip(tmp_path):
    path = tmp_path / "short.h5"
    collect("tworoom", episodes=2, steps=10, resolution=16, seed=0, out=path, progress=False)
    store = EpisodeStore(path)
    steps = int(store.episode_length[0]) - 1  # actions taken in episode 0
    assert len(ClipDataset(store, [0], num_frames=2, frameskip=steps)) == 1
    assert len(ClipDataset(store, [0], num_frames=3, frameskip=steps // 2)) == steps - 2 * (steps // 2) + 1
    with pytest.raises(ValueError, match="long enough"):
        ClipDataset(store, [0], num_frames=2, frameskip=steps + 1)


def test_split_keeps_a_training_episode_at_any_fraction():
    for n in range(2, 12):
        for fraction in (0.0, 0.1, 0.5, 0.9, 0.99):
            train, val = split_episodes(n, fraction, seed=n)
            assert len(train) >= 1 and sorted([*train, *val]) == list(range(n))
            assert len(val) == (0 if fraction == 0 else min(n - 1, max(1, round(fraction * n))))


@pytest.mark.parametrize("world, limit, per_epoch, span", [
    (1, 1.0, 14, 7), (1, 5, 5, 7), (1, 0.5, 7, 7),  # 104 clips in batches of 7: 14 full batches an epoch
    (2, 1.0, 7, 7), (20, 1.0, 1, 6),  # two ranks of 52 clips: 7 batches each; 20 ranks of 6: one batch of 6
])
def test_training_follows_the_run_with_lightnings_batches_per_epoch(dataset, world, limit, per_epoch, span):
    """The training sampler follows the trainer's count of batches trained on, with as many batches
    an epoch as Lightning runs (drop_last, limit_train_batches) and their size; without a trainer,
    or for the re-estimation at the end (`from_start`), it draws its epoch's order from the start."""
    from types import SimpleNamespace

    dm = LeWMDataModule(str(dataset), num_frames=2, frameskip=5, batch_size=7, num_workers=0, val_fraction=0.34)
    dm.setup("fit")
    assert len(dm.train_set) == 104
    progress = SimpleNamespace(total=SimpleNamespace(processed=0))
    dm.trainer = SimpleNamespace(world_size=world, global_rank=0, limit_train_batches=limit,
                                 fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))
    loader = dm.train_dataloader()
    sampler = loader.sampler._order if world > 1 else loader.sampler
    batches_done, got_per_epoch, got_span = sampler._run
    assert (got_per_epoch, got_span) == (per_epoch, span)
    progress.total.processed = 11  # read when a pass begins, not when the loader is built
    assert batches_done() == 11
    assert dm.train_dataloader(from_start=True).sampler._order._run is None if world > 1 else \
        dm.train_dataloader(from_start=True).sampler._run is None


def test_collection_blocks_draw_other_episodes_and_follow_the_noise_setting():
    """Every block of a collection has its own env and policy streams, and `noise` reaches the policy."""
    from leworld.data.collect import collect_block

    a, b = (collect_block("tworoom", 4, 5, 16, "random", None, seed=0, block=k) for k in (0, 1))
    assert not np.array_equal(a["state"][:, 0], b["state"][:, 0])  # other starts
    assert not np.array_equal(a["action"][:, :-1], b["action"][:, :-1])  # other random actions
    again = collect_block("tworoom", 4, 5, 16, "random", None, seed=0, block=1)
    np.testing.assert_array_equal(again["action"], b["action"])
    quiet = collect_block("tworoom", 8, 10, 16, "expert", 0.0, seed=0, block=0)
    norms = np.linalg.norm(quiet["action"][:, :-1].astype(np.float64), axis=-1)
    np.testing.assert_allclose(norms[norms > 0], 1.0, rtol=1e-6)  # noiseless: unit steps toward the aim
    noisy = collect_block("tworoom", 8, 10, 16, "expert", 0.5, seed=0, block=0)
    assert np.abs(np.linalg.norm(noisy["action"][:, :-1], axis=-1) - 1).max() > 0.1


def test_stored_actions_are_the_executed_ones_inside_the_action_box(monkeypatch):
    """The env clips what it is given to [-1, 1]; the file must hold the clipped action, the one
    executed, even from a policy that overshoots, or a model would learn from actions (and action
    statistics) that never happened."""
    from leworld.data.collect import collect_block

    made = collect_mod.make_policy

    class Overshooting:
        def __init__(self, *args, **kwargs):
            self.inner = made(*args, **kwargs)

        def reset(self, env):
            self.inner.reset(env)

        def act(self, env):
            return 3.0 * np.asarray(self.inner.act(env))

    plain = collect_block("tworoom", 8, 10, 16, "random", None, seed=0, block=0)
    monkeypatch.setattr(collect_mod, "make_policy", Overshooting)
    wild = collect_block("tworoom", 8, 10, 16, "random", None, seed=0, block=0)
    expected = np.clip(3.0 * plain["action"][:, :-1], -1.0, 1.0)
    assert (np.abs(3.0 * plain["action"][:, :-1]) > 1).mean() > 0.3  # the policy did overshoot
    np.testing.assert_array_equal(wild["action"][:, :-1], expected)
    env = envs.make_batch("tworoom", num_envs=8, resolution=16)
    env.reset(seed=0)
    env.set_state(wild["state"][:, 0])
    for t in range(10):  # the stored actions replay the stored states
        env.step(wild["action"][:, t])
        np.testing.assert_allclose(env.get_state(), wild["state"][:, t + 1], atol=1e-9)


@pytest.mark.parametrize("compression", [None, "lzf"])
def test_frames_read_in_any_order_are_the_stored_rows(tmp_path, compression):
    """read / read_into with shuffled, repeated rows give h5py's own reading of those rows, compressed or not."""
    path = tmp_path / "d.h5"
    collect("tworoom", episodes=3, steps=8, resolution=16, seed=0, out=path, progress=False, compression=compression)
    store = EpisodeStore(path)
    rows = np.array([20, 3, 3, 0, 26, 11])
    with h5py.File(path, "r") as f:
        assert f["pixels"].compression == compression
        want = np.stack([f["pixels"][int(r)] for r in rows])
    np.testing.assert_array_equal(store.read("pixels", rows), want)
    out = np.zeros_like(want)
    store.read_into(rows, out)
    np.testing.assert_array_equal(out, want)
    assert len({want[i].tobytes() for i in (0, 1, 3, 4)}) == 4  # distinct frames: a mix-up would show


def test_collection_timings_and_counts_reach_the_file_and_its_summary(dataset):
    store = EpisodeStore(dataset)
    assert store.metadata["seconds"] > 0 and store.metadata["steps_per_second"] > 0
    with h5py.File(dataset, "r") as f:  # written into the file, not only kept in memory
        assert json.loads(f.attrs["metadata"])["seconds"] == store.metadata["seconds"]
    summary = store.summary()
    assert "collected in" in summary and "episodes  6, 186 frames, 180 steps" in summary  # 6 x (30 + 1) rows
    assert "policy    expert (noise 1.0), seed 3" in summary


@pytest.mark.parametrize("policy, said", [("expert", "expert (noise 2.0, the policy's default)"),
                                          ("random", "random (no action noise)")])
def test_the_summary_names_the_noise_a_default_policy_applied(tmp_path, policy, said):
    """Without --noise the file records noise None beside the noise the policy applied: the
    summary said "noise None"."""
    path = tmp_path / "d.h5"
    collect("tworoom", episodes=1, steps=3, resolution=16, policy=policy, seed=0, out=path, progress=False)
    assert f"policy    {said}, seed 0" in EpisodeStore(path).summary()


def test_a_file_whose_writer_has_not_closed_is_refused_as_incomplete(tmp_path):
    """The writer marks its file complete only in `close()`: a copy taken while it is still writing
    (all episodes appended and flushed to disk) is refused, and the same file closed is read."""
    from leworld.data.store import EpisodeWriter
    path = tmp_path / "d.h5"
    block = {"pixels": np.zeros((2, 3, 4, 4, 3), np.uint8), "action": np.zeros((2, 3, 2), np.float32),
             "proprio": np.zeros((2, 3, 2), np.float32), "state": np.zeros((2, 3, 4), np.float64)}
    writer = EpisodeWriter(path, resolution=4, action_dim=2, proprio_dim=2, state_dim=4, metadata={"env": "tworoom"})
    writer.append(block)
    writer._file.create_dataset("episode_offset", data=np.array([0, 3]))  # everything a reader needs but the mark
    writer._file.create_dataset("episode_length", data=np.array([3, 3]))
    writer._file.flush()
    snapshot = tmp_path / "snapshot.h5"
    snapshot.write_bytes(writer.tmp_path.read_bytes())
    writer.abort()
    with pytest.raises(DatasetError, match="incomplete"):
        EpisodeStore(snapshot)
    with h5py.File(snapshot, "a") as f:  # the very same file once marked complete is accepted
        f.attrs["complete"] = True
    assert EpisodeStore(snapshot).num_episodes == 2


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_loader_workers_started_without_fork_give_the_same_batches(dataset, context):
    """macOS and Windows start DataLoader workers with spawn, and Python 3.14 on Linux with
    forkserver: the dataset, sampler and collate function must cross into such a worker, which
    opens its own file handle, and the batches must be those read in this process."""
    def batches(workers):
        dm = LeWMDataModule(str(dataset), num_frames=2, frameskip=5, batch_size=8, num_workers=workers,
                            val_fraction=0.3)
        dm.setup("fit")
        loader = dm.train_dataloader()
        if workers:
            loader.multiprocessing_context = context
        return [{k: v.clone() for k, v in b.items()} for b in loader]

    here, spawned = batches(0), batches(1)
    assert len(here) == len(spawned) >= 2
    for a, b in zip(here, spawned):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_a_dataset_records_the_noise_its_policy_drew_actions_with(tmp_path):
    """`noise` unset means the policy's default: the file says what that is (2.0 for the Two-Room
    expert, per sub-policy for the Push-T mix, None where uniform actions add no noise), and a
    config that asks for other noise is told about the difference."""
    import warnings

    from envs.policies import action_noise, make_policy
    from envs.policies.push_t import _POLICIES
    from envs.policies.two_room import DEFAULT_NOISE

    path = tmp_path / "default.h5"
    collect("tworoom", episodes=3, steps=10, resolution=RES, seed=0, out=path, progress=False)
    meta = EpisodeStore(path).metadata
    assert meta["noise"] is None and meta["policy_noise"] == DEFAULT_NOISE["expert"] == 2.0
    collect("tworoom", episodes=2, steps=5, resolution=RES, noise=0.25, out=tmp_path / "set.h5", progress=False)
    assert EpisodeStore(tmp_path / "set.h5").metadata["policy_noise"] == 0.25

    pusht = envs.make_batch("pusht", num_envs=2, resolution=RES, seed=0)
    mix = make_policy("pusht", "mix", pusht, seed=0)
    expected = {name: (None if name == "random" else _POLICIES[name](pusht).noise) for name in mix.names}
    assert action_noise(mix) == expected and expected["contact"] != expected["pusher"]
    assert action_noise(make_policy("tworoom", "random", envs.make_batch("tworoom", num_envs=1))) is None

    dm = LeWMDataModule(str(path), num_frames=2, frameskip=2, batch_size=2, num_workers=0,
                        generate=CollectSpec(env="tworoom", resolution=RES, episodes=3, steps=10, noise=0.5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    assert any("noise 2.0 (data.generate.noise is 0.5)" in str(w.message) for w in caught)


def test_the_missing_dataset_hint_is_filled_in_with_what_the_caller_knows(tmp_path):
    from leworld.data.store import ENV_HINT, RESOLUTION_HINT, fill_collect_hint

    with pytest.raises(DatasetError) as err:
        EpisodeStore(tmp_path / "none.h5")
    message = str(err.value)
    assert f"--env {ENV_HINT} --resolution {RESOLUTION_HINT} --out" in message
    assert fill_collect_hint(message) == message
    assert "--env pusht --resolution 64 --supersample 4 --out" in fill_collect_hint(message, "pusht", 64, 4)
    assert "--env tworoom --resolution 32 --out" in fill_collect_hint(message, "tworoom", 32, 1)
