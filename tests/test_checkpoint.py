"""Tests of leworld.checkpoint: round trip, clear errors, atomic writes, no unpickling.

Run: pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch

import leworld
import leworld.checkpoint as checkpoint
from leworld.checkpoint import export_model, load_model
from leworld.model import LeWMConfig, LeWorldModel


def tiny_model(encoder: str = "vit") -> LeWorldModel:
    torch.manual_seed(0)
    cfg = LeWMConfig(
        encoder=encoder, image_size=32, patch_size=8, enc_width=32, enc_depth=1, enc_heads=2, enc_mlp=64,
        cnn_channels=(8, 8, 16), embed_dim=16, proj_hidden=32, pred_depth=1, pred_heads=2,
        pred_head_dim=8, pred_mlp=32, action_hidden=16,
    )
    model = LeWorldModel(cfg)
    for block in model.predictor.blocks:  # non-trivial predictor (AdaLN-zero starts at identity)
        torch.nn.init.normal_(block.adaLN[-1].weight, std=0.2)
    model.set_action_stats(torch.tensor([0.3, -0.2]), torch.tensor([1.5, 0.7]))
    model.train()
    model.encode(torch.rand(4, 2, 3, 32, 32))  # move the BatchNorm running statistics
    return model.eval()


def outputs(model: LeWorldModel) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8, generator=g)
    blocks = torch.randn(2, 4, 5, 10, generator=g)
    with torch.no_grad():
        emb = model.encode(pixels)
        return emb, model.rollout(emb, blocks)


@pytest.mark.parametrize("encoder", ["vit", "cnn"])
def test_round_trip_identical_outputs(tmp_path, encoder):
    model = tiny_model(encoder)
    directory = export_model(model, tmp_path / "run", extra={"env": "tworoom", "steps": 3})
    loaded = load_model(directory)
    assert not loaded.training and loaded.config == model.config
    torch.testing.assert_close(loaded.action_mean, model.action_mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded.action_std, model.action_std, rtol=0, atol=0)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)  # bit-identical weights
    for a, b in zip(outputs(model), outputs(loaded)):  # kernels may differ in the last bit
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    info = json.loads((directory / "config.json").read_text())
    assert info["format_version"] == checkpoint.FORMAT_VERSION and "leworld_version" in info
    assert info["extra"] == {"env": "tworoom", "steps": 3}
    # the .safetensors file itself and the package-level lazy export load the same model
    torch.testing.assert_close(outputs(leworld.load_model(directory / "model.safetensors"))[1], outputs(model)[1])


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.py fit"):
        load_model(tmp_path / "nothing_here")
    export_model(tiny_model(), tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_model(tmp_path)


def edit_config(directory, **changes) -> None:
    path = directory / "config.json"
    info = json.loads(path.read_text())
    info["config"].update(changes)
    path.write_text(json.dumps(info))


def test_an_ensemble_is_not_exported_as_one_model(tmp_path):
    from leworld.model import ModelEnsemble

    with pytest.raises(TypeError, match="ModelEnsemble: export its members one by one"):
        export_model(ModelEnsemble([tiny_model(), tiny_model()]), tmp_path / "ens")
    assert not (tmp_path / "ens").exists()


def test_a_config_edited_after_the_export_is_caught_even_where_the_shapes_fit(tmp_path):
    model = tiny_model()
    export_model(model, tmp_path)
    edit_config(tmp_path, pred_heads=4, pred_head_dim=4)  # 2 x 8 -> 4 x 4: the same tensor shapes
    with pytest.raises(ValueError, match=r"config.json is not the config model.safetensors was exported with "
                                         r"\(pred_head_dim: 8 in the weights, 4 in config.json; pred_heads: 2 in"):
        load_model(tmp_path)
    edit_config(tmp_path, pred_heads=2, pred_head_dim=8)  # restored: loads, with the same outputs
    for a, b in zip(outputs(load_model(tmp_path)), outputs(model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _another_value(value):
    """A valid setting other than `value`, of its type."""
    other = {"vit": "cnn", "cnn": "vit", "flatten": "keypoints"}
    if isinstance(value, str):
        return other[value]
    if isinstance(value, (list, tuple)):
        return [2 * v for v in value]
    return value / 2 if isinstance(value, float) else 2 * value


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(LeWMConfig)])
def test_every_setting_of_an_edited_config_is_caught(tmp_path, name):
    """Whatever setting config.json changes after the export, loading names it instead of building
    another model around the weights."""
    export_model(tiny_model(), tmp_path)
    was = json.loads((tmp_path / "config.json").read_text())["config"][name]
    edit_config(tmp_path, **{name: _another_value(was)})
    with pytest.raises(ValueError, match=rf"\({name}: {re.escape(repr(was))} in the weights"):
        load_model(tmp_path)


def without_config_record(directory) -> None:
    """Rewrite the export as exports were before the weights carried their config and config.json
    their sha256."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = str(directory / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "leworld_config"}
    save_file(load_file(path), path, metadata=meta)
    info = json.loads((directory / "config.json").read_text())
    del info["weights_sha256"]
    (directory / "config.json").write_text(json.dumps(info))


def test_mismatched_config_names_the_mismatch(tmp_path):
    export_model(tiny_model(), tmp_path)
    without_config_record(tmp_path)  # an older export: the shapes are what is left to check
    edit_config(tmp_path, embed_dim=24)
    with pytest.raises(ValueError, match=r"shape mismatches.*projector"):
        load_model(tmp_path)
    edit_config(tmp_path, embed_dim=16, pred_depth=2)
    with pytest.raises(ValueError, match=r"missing keys.*predictor\.blocks\.1"):
        load_model(tmp_path)
    edit_config(tmp_path, pred_depth=1, embedding_size=16)
    with pytest.raises(ValueError, match="unknown LeWMConfig keys.*embedding_size"):
        load_model(tmp_path)


def test_atomic_write_leaves_no_temporary_files(tmp_path, monkeypatch):
    model = tiny_model()
    export_model(model, tmp_path)
    export_model(model, tmp_path)  # overwriting is fine
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        export_model(tiny_model("cnn"), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == before
    with pytest.raises(TypeError, match="JSON"):
        export_model(model, tmp_path / "other", extra={"bad": object()})


@pytest.mark.parametrize("failure", ["half written", "rename"])
def test_an_export_that_fails_midway_leaves_the_old_model_whole(tmp_path, monkeypatch, failure):
    """The files are written beside the target and renamed over it: a write cut off halfway (disk
    full) or a failed rename leaves the old export byte for byte, and no temporary file."""
    export_model(tiny_model(), tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("model.safetensors", "config.json")}
    if failure == "half written":
        real = Path.write_bytes

        def write_half(self, data):
            real(self, data[: len(data) // 2])
            raise OSError("disk full")

        monkeypatch.setattr(Path, "write_bytes", write_half)
    else:
        def no_rename(*args):
            raise OSError("rename failed")

        monkeypatch.setattr(checkpoint.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full|rename failed"):
        export_model(tiny_model("cnn"), tmp_path)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_an_export_stopped_between_its_two_files_is_refused_not_loaded_with_the_old_record(tmp_path, monkeypatch):
    """The weights are replaced first; if writing config.json then fails, the old config.json (the
    same architecture, another run's record) sits beside new weights. Loading, and reading the
    record that evaluation takes its held-out episodes from, must refuse that pair."""
    from leworld.checkpoint import model_extra

    export_model(tiny_model(), tmp_path, extra={"global_step": 100, "data": {"path": "data/old.h5"}})
    real = checkpoint._atomic_write

    def fail_on_the_config(path, write):
        if path.name == "config.json":
            raise OSError("disk full")
        real(path, write)

    monkeypatch.setattr(checkpoint, "_atomic_write", fail_on_the_config)
    newer = tiny_model()  # the same architecture, other weights
    newer.set_action_stats(torch.tensor([0.1, 0.1]), torch.tensor([1.0, 1.0]))
    with pytest.raises(OSError, match="disk full"):
        export_model(newer, tmp_path, extra={"global_step": 200, "data": {"path": "data/new.h5"}})
    monkeypatch.undo()
    for read in (load_model, model_extra):
        with pytest.raises(ValueError, match=r"config\.json was written with other weights than .*model\.safetensors "
                                             r"\(sha256 [0-9a-f]{12} recorded, [0-9a-f]{12} found\).*Export the model again"):
            read(tmp_path)
    export_model(tiny_model(), tmp_path, extra={"global_step": 300})  # a whole export pairs them again
    assert model_extra(tmp_path)["global_step"] == 300 and load_model(tmp_path) is not None


def test_a_truncated_weights_file_is_named_as_such_not_as_another_exports(tmp_path):
    export_model(tiny_model(), tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file .*truncated or corrupt"):
        load_model(tmp_path)


@pytest.mark.parametrize("version", ["1", None, 1.5, True])
def test_a_config_json_of_a_bad_format_version_or_encoding_is_a_clear_error(tmp_path, version):
    export_model(tiny_model(), tmp_path)
    info = json.loads((tmp_path / "config.json").read_text())
    info["format_version"] = version
    (tmp_path / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=rf"format_version {re.escape(repr(version))}, not an integer.*export the model again"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{not utf-8")
    for read in (load_model, checkpoint.model_extra):
        with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
            read(tmp_path)


def test_an_export_is_readable_by_others_and_loads_where_asked(tmp_path):
    """Exported files are meant to be shared (mode 0644, not a temporary file's 0600), and
    `map_location` places the loaded model (the meta device needs no GPU to show it)."""
    export_model(tiny_model(), tmp_path)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    model = load_model(tmp_path, map_location="meta")
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}
    assert not model.training


def test_the_same_weights_export_to_the_same_bytes(tmp_path):
    """Results files identify a model by its weights file's sha256, so exporting the same model again
    (in this process or another) must write the same bytes. safetensors itself writes its header's
    metadata in a random order; the file must still be a valid safetensors file with every tensor."""
    import hashlib
    import subprocess
    import sys

    from safetensors import safe_open

    model = tiny_model()
    digests = set()
    for i in range(6):
        export_model(model, tmp_path / f"in{i}", extra={"run": 1})
        digests.add(hashlib.sha256((tmp_path / f"in{i}" / "model.safetensors").read_bytes()).hexdigest())
    script = ("import sys; from leworld.checkpoint import export_model, load_model; "
              "export_model(load_model(sys.argv[1]), sys.argv[2], extra={'run': 1})")
    for i in range(2):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "in0"), str(tmp_path / f"sub{i}")], check=True,
                       timeout=120)
        digests.add(hashlib.sha256((tmp_path / f"sub{i}" / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    raw = (tmp_path / "in0" / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert header_len % 8 == 0 and raw[8 + header_len - 1:8 + header_len] in (b"}", b" ")
    with safe_open(tmp_path / "in0" / "model.safetensors", "pt") as f:
        assert f.metadata()["leworld_config"] == json.dumps(model.config.to_dict(), sort_keys=True)
        for k, v in model.state_dict().items():
            assert torch.equal(f.get_tensor(k), v), k


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model = tiny_model()
    export_model(model, tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header size, then a JSON header
    assert json.loads(raw[8 : 8 + header_len])["__metadata__"]["format"] == "pt"

    def forbidden(*args, **kwargs):
        raise AssertionError("load_model must not unpickle")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    torch.testing.assert_close(outputs(load_model(tmp_path))[1], outputs(model)[1])


@pytest.mark.parametrize("as_object", [False, True])
def test_lightning_ckpt_with_config_in_hparams(tmp_path, as_object):
    model = tiny_model()
    config = model.config if as_object else model.config.to_dict()
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"config": config, "lambda_sigreg": 0.09},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    torch.testing.assert_close(outputs(load_model(tmp_path / "last.ckpt"))[1], outputs(model)[1])
    torch.save({"state_dict": ckpt["state_dict"], "hyper_parameters": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="no LeWMConfig"):
        load_model(tmp_path / "bare.ckpt")


def test_find_model_follows_the_newest_version_of_a_run(tmp_path):
    from leworld.checkpoint import find_model

    cfg = LeWMConfig(encoder="cnn", image_size=32, cnn_channels=(8, 8, 8), enc_width=16, embed_dim=8,
                     proj_hidden=16, history=1, pred_depth=1, pred_heads=2, pred_head_dim=4, pred_mlp=16,
                     action_hidden=8, action_dim=2, frameskip=2)
    for v in (0, 2, 10):
        export_model(LeWorldModel(cfg), tmp_path / "run" / f"version_{v}" / "model")
    (tmp_path / "run" / "version_11").mkdir()  # a run still training: no exported model yet
    assert find_model(tmp_path / "run") == tmp_path / "run" / "version_10" / "model"  # numeric, not lexical
    exported = tmp_path / "run" / "version_2" / "model"
    assert find_model(exported) == exported
    assert find_model(exported.parent) == exported  # a version directory: its model
    assert find_model(tmp_path / "missing") == tmp_path / "missing"
    # a run (or version) with checkpoints but no export yet: the error names the checkpoints, which load too
    ckpts = tmp_path / "stopped" / "version_0" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"")
    for given in (tmp_path / "stopped", tmp_path / "stopped" / "version_0"):
        with pytest.raises(FileNotFoundError, match=r"holds no exported model .* training checkpoints, which load "
                                                    r"too: .*stopped/version_0/checkpoints/last.ckpt"):
            load_model(given)


def test_model_name_names_the_run_whatever_part_of_it_is_given(tmp_path, monkeypatch):
    from leworld.checkpoint import model_name

    monkeypatch.chdir(tmp_path)
    run = Path("runs") / "pusht_tiny"
    exported = run / "version_3" / "model"
    for given in (run, run / "version_3", exported, exported / "model.safetensors", tmp_path / exported):
        assert model_name(given) == "pusht_tiny", given
    # checkpoints of one run differ, so each keeps its stem
    assert model_name(run / "version_0" / "checkpoints" / "last.ckpt") == "pusht_tiny-last"
    assert model_name(run / "version_0" / "checkpoints" / "epoch=2-step=3000.ckpt") == "pusht_tiny-epoch_2-step_3000"
    assert model_name("exports/lam0.3 final") == "lam0.3_final"  # a directory outside a run: its own name
    assert model_name(".") == tmp_path.name  # relative paths are named where they point
    assert model_name(Path("runs") / "a") != model_name(Path("runs") / "b")


def test_result_path_adds_a_seed_other_than_zero(tmp_path):
    from leworld.checkpoint import result_path
    run = tmp_path / "runs" / "pusht_tiny" / "version_0" / "model"
    assert result_path("probe", run) == Path("runs") / "probe" / "pusht_tiny.json"
    assert result_path("probe", run, seed=2) == Path("runs") / "probe" / "pusht_tiny-seed2.json"
    ckpt = run.parent / "checkpoints" / "last.ckpt"
    assert result_path("forecast", ckpt, seed=1) == Path("runs") / "forecast" / "pusht_tiny-last-seed1.json"
    assert result_path("probe", run, seed=1) != result_path("probe", run, seed=0)


def test_a_model_of_a_newer_format_is_refused(tmp_path):
    export_model(tiny_model("cnn"), tmp_path / "m")
    info = json.loads((tmp_path / "m" / "config.json").read_text())
    info["format_version"] = checkpoint.FORMAT_VERSION + 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="newer than this leworld reads"):
        load_model(tmp_path / "m")


class _NotAPlainValue:
    """An object a weights-only load refuses to rebuild."""


def test_an_unreadable_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    """Empty, text and truncated files, and one holding an object a weights-only load does not
    rebuild, each give a ValueError that names the file, never a stray IndexError or KeyError."""
    from leworld.checkpoint import read_checkpoint

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "hyper_parameters": {}}, good)
    data = good.read_bytes()
    files = {"empty": b"", "text": b"epoch=3 step=100\n", "truncated": data[: len(data) // 2]}
    for name, content in files.items():
        (tmp_path / f"{name}.ckpt").write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}.ckpt is not a readable checkpoint \(.+\): it may be "
                                             "truncated or corrupt"):
            read_checkpoint(tmp_path / f"{name}.ckpt")
        with pytest.raises(ValueError, match=f"{name}.ckpt is not a readable checkpoint"):
            load_model(tmp_path / f"{name}.ckpt")
    odd = tmp_path / "odd.ckpt"
    torch.save({"hyper_parameters": {"setting": _NotAPlainValue()}}, odd)
    with pytest.raises(ValueError, match=r"odd.ckpt holds an object of type .*_NotAPlainValue, which a weights-only "
                                         r"load does not rebuild"):
        read_checkpoint(odd)
    assert read_checkpoint(good)["state_dict"]["w"].shape == (3,)
