"""The benchmark scripts run and report what they claim (timings themselves are not tested)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import train_loop  # noqa: E402

from leworld.device import cpu_model  # noqa: E402


def test_train_loop_runs_the_trainer_and_reports_its_rate(tmp_path):
    result = train_loop.run(str(ROOT / "configs/tworoom_tiny.yaml"), steps=3, warmup=1, device="cpu", batch_size=8,
                            log_every=2, root=str(tmp_path))
    assert result["steps"] == 3 and result["batch_size"] == 8 and result["log_every_n_steps"] == 2
    assert result["clips_per_s"] == pytest.approx(8 * 1000 / result["ms_per_step"], rel=0.01)
    assert "syncs_per_step" not in result  # counted on CUDA only
    assert result["device"].startswith(cpu_model()) and "torch threads" in result["device"]  # the hardware, named
    metrics = (tmp_path / "train_loop" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert "train/loss" in header and "train/grad_norm" in header
    steps = [int(row.split(",")[header.index("step")]) for row in metrics[1:] if row.split(",")[header.index("train/loss")]]
    assert steps == [1, 3]  # written every 2 steps of the 4 run


def test_plan_latency_takes_the_devices_other_commands_take_and_prints_what_ran(tmp_path):
    """`--device auto` resolves as in plan.py (here: the CPU); `--amp` off CUDA is printed and
    recorded as off, since autocast runs on CUDA only; an unknown device is a usage error."""
    import json
    import subprocess

    cmd = [sys.executable, str(ROOT / "bench/plan_latency.py"), "--config", str(ROOT / "configs/tworoom_tiny.yaml"),
           "--batch", "1", "--num-samples", "8", "--topk", "2", "--iterations", "1", "--repeats", "1",
           "--warmup", "0", "--amp", "--json", str(tmp_path / "r.jsonl")]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([*cmd, "--device", "auto"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "amp False" in out.stdout and "amp True" not in out.stdout
    record = json.loads((tmp_path / "r.jsonl").read_text())
    assert record["amp"] is False and record["device"].startswith(cpu_model())
    bad = subprocess.run([*cmd, "--device", "bogus"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "--device:" in bad.stderr and "Traceback" not in bad.stderr


def test_train_throughput_times_training_steps_and_records_the_device(tmp_path):
    """The command as its docstring and bench/gpu.sh run it: a few steps on the device resolved
    from --device, one JSON line with the rate it printed."""
    import json
    import subprocess

    cmd = [sys.executable, str(ROOT / "bench/train_throughput.py"), "--config", str(ROOT / "configs/tworoom_tiny.yaml"),
           "--steps", "2", "--warmup", "1", "--batch-size", "8", "--json", str(tmp_path / "r.jsonl")]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    for device in ("cpu", "auto"):
        out = subprocess.run([*cmd, "--device", device], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "clips/s" in out.stdout
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert record["batch_size"] == 8 and record["device"].startswith(cpu_model())
        assert record["clips_per_s"] == pytest.approx(8 / record["step_s"], rel=1e-9) and record["loss"] > 0


@pytest.mark.parametrize("script", ["train_throughput", "train_loop"])
def test_training_benchmarks_refuse_an_unknown_device_as_a_usage_error(script):
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / f"bench/{script}.py"), "--config",
                          str(ROOT / "configs/tworoom_tiny.yaml"), "--device", "bogus"], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "--device:" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.slow  # 2.5 minutes on 2 cores: every stage, torch.compile included, at tiny size
def test_the_gpu_script_runs_every_stage_at_tiny_size_on_the_cpu(tmp_path):
    """`QUICK=1 bash bench/gpu.sh`, the check to run before a GPU is lent: every stage writes its
    result, none fails (the script exits 1 when one does), and no scratch folder is left."""
    import os
    import subprocess

    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "TMPDIR": str(tmp_path)}
    out = subprocess.run(["bash", str(ROOT / "bench/gpu.sh")], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "stage stopped" not in out.stdout and "stage skipped" not in out.stdout
    lines = {name: (tmp_path / "out" / name).read_text().splitlines()
             for name in ("plan.jsonl", "train.jsonl", "train_loop.jsonl")}
    assert [len(v) for v in lines.values()] == [3, 2, 2]
    assert not list(tmp_path.glob("tmp.*"))  # the scratch folder (mktemp -d) is gone
