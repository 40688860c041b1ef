"""Success split by the start error of each pair (`python -m leworld.evaluation.breakdown`)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leworld.evaluation.breakdown import add_failures, breakdown, failures, parse_split
from leworld.evaluation.evaluate import wilson_interval

ROOT = Path(__file__).resolve().parents[1]


def fake_results(n=40, seed=0, policies=("model (cem)", "random")) -> dict:
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 180, n).round(3)
    angle[:3] = 20.0  # on the threshold: counted as "at most"
    rows = []
    for name in policies:
        success = rng.random(n) < 0.5
        end = rng.uniform(0, 180, n).round(3)
        end[3:5] = 20.0  # on the threshold: not "above"
        end[5] = angle[5]  # as far as at the start: not "further"
        rows.append({"policy": name, "per_episode": [
            {"success": bool(s), "start_errors": {"angle_deg": float(a), "pose_px": 50.0},
             "final_errors": {"angle_deg": float(e), "pose_px": 10.0}}
            for s, a, e in zip(success, angle, end)]})
    return {"results": rows}


def test_groups_match_a_brute_force_count():
    res = fake_results()
    split = breakdown(res, "angle_deg", 20.0)
    for row, out in zip(res["results"], split["policies"]):
        low = [e["success"] for e in row["per_episode"] if not e["start_errors"]["angle_deg"] > 20.0]
        high = [e["success"] for e in row["per_episode"] if e["start_errors"]["angle_deg"] > 20.0]
        assert out["at_most"]["episodes"] == len(low) and out["above"]["episodes"] == len(high)
        assert out["at_most"]["successes"] == sum(low) and out["above"]["successes"] == sum(high)
        assert out["above"]["rate"] == pytest.approx(sum(high) / len(high))
        assert tuple(out["above"]["ci95"]) == wilson_interval(sum(high), len(high))
    assert split["pairs"]["at_most"] + split["pairs"]["above"] == 40 and split["pairs"]["at_most"] >= 3


def test_failures_match_a_brute_force_count():
    res, other = fake_results(), fake_results(seed=1)
    rows = failures(res, "angle_deg", 20.0)
    for row, out in zip(res["results"], rows):
        failed = [e for e in row["per_episode"] if not e["success"]]
        above = [e for e in failed if e["final_errors"]["angle_deg"] > 20.0]
        further = [e for e in failed if e["final_errors"]["angle_deg"] > e["start_errors"]["angle_deg"]]
        assert out["failures"] == len(failed) > 0
        assert out["end_above"] == len(above) and out["end_further"] == len(further)
        assert 0 < out["end_above"] < out["failures"]
    total = add_failures([rows, failures(other, "angle_deg", 20.0)])
    both = res["results"][0]["per_episode"] + other["results"][0]["per_episode"]
    assert total[0]["failures"] == sum(not e["success"] for e in both)
    assert total[0]["end_further"] == sum(not e["success"] and e["final_errors"]["angle_deg"] >
                                          e["start_errors"]["angle_deg"] for e in both)
    with pytest.raises(ValueError, match="same policies"):
        add_failures([rows, failures(fake_results(policies=("random",)), "angle_deg", 20.0)])
    no_final = fake_results()
    for e in no_final["results"][0]["per_episode"]:
        del e["final_errors"]
    with pytest.raises(ValueError, match="final_errors"):
        failures(no_final, "angle_deg", 20.0)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="KEY:THRESHOLD"):
        parse_split("angle_deg")
    with pytest.raises(ValueError, match="KEY:THRESHOLD"):
        parse_split("angle_deg:x")
    with pytest.raises(ValueError, match="has \\['angle_deg', 'pose_px'\\]"):
        breakdown(fake_results(), "agent_px", 1.0)
    old = fake_results()
    del old["results"][1]["per_episode"][0]["start_errors"]
    with pytest.raises(ValueError, match="rerun plan.py"):
        breakdown(old, "angle_deg", 20.0)
    for field in ("start_errors", "final_errors"):  # an episode after the first lacks the key
        edited = fake_results()
        episode = edited["results"][1]["per_episode"][next(
            i for i, e in enumerate(edited["results"][1]["per_episode"]) if i and not e["success"])]
        del episode[field]["angle_deg"]
        with pytest.raises(ValueError, match=rf"policy 'random'.*{field}.*'angle_deg'.*rerun plan.py"):
            (breakdown if field == "start_errors" else failures)(edited, "angle_deg", 20.0)
        if field == "start_errors":
            with pytest.raises(ValueError, match=r"start_errors\['angle_deg'\]: rerun plan.py"):
                failures(edited, "angle_deg", 20.0)
    other = fake_results()
    other["results"][1] = fake_results(seed=1)["results"][1]
    with pytest.raises(ValueError, match="same pairs"):
        breakdown(other, "angle_deg", 20.0)
    with pytest.raises(ValueError, match="no policy rows"):
        breakdown({}, "angle_deg", 20.0)
    with pytest.raises(ValueError, match="JSON list, not an object"):
        breakdown([1, 2], "angle_deg", 20.0)
    no_success = fake_results()
    del no_success["results"][0]["per_episode"][3]["success"]
    for fn in (breakdown, failures):
        with pytest.raises(ValueError, match="no per_episode records with 'success'"):
            fn(no_success, "angle_deg", 20.0)


def test_cli_bad_files_and_out_are_usage_errors(tmp_path, capsys):
    from leworld.evaluation.breakdown import main

    good = tmp_path / "r.json"
    good.write_text(json.dumps(fake_results()))
    (tmp_path / "not.json").write_text("not json")
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "adir").mkdir()
    for args, message in (([str(tmp_path / "not.json")], "is not JSON"),
                          ([str(tmp_path / "list.json")], "JSON list, not an object"),
                          ([str(good), "--out", str(tmp_path / "adir")], "--out: .*is a directory")):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--split", "angle_deg:20"])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err), message
    assert list((tmp_path / "adir").iterdir()) == []


def test_cli_prints_and_writes_the_split(tmp_path):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(fake_results()))
    out = tmp_path / "split.json"
    cmd = [sys.executable, "-m", "leworld.evaluation.breakdown", str(src), "--split", "angle_deg:20", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "angle_deg > 20" in proc.stdout and "random" in proc.stdout and "end further than start" in proc.stdout
    written = json.loads(out.read_text())["splits"][0]
    assert written["policies"] == json.loads(json.dumps(breakdown(fake_results(), "angle_deg", 20.0)["policies"]))
    assert written["failures"] == failures(fake_results(), "angle_deg", 20.0)
    src2 = tmp_path / "r2.json"
    src2.write_text(json.dumps(fake_results(seed=1)))
    two = subprocess.run(cmd[:4] + [str(src2)] + cmd[4:], cwd=ROOT, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert "all 2 files" in two.stdout
    assert json.loads(out.read_text())["failures"] == add_failures(
        [failures(fake_results(seed=k), "angle_deg", 20.0) for k in (0, 1)])
    missing = subprocess.run(cmd[:3] + [str(tmp_path / "none.json"), "--split", "angle_deg:20"], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no results file" in missing.stderr
