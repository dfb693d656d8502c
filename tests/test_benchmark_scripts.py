"""The GPU benchmark scripts run end to end in their CPU smoke mode and write well-formed JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, out: Path) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600, cwd=out.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text())


def test_kernel_benchmark_smoke(tmp_path):
    res = run("kernel_speed.py", tmp_path / "k.json")
    assert {"command", "git_commit", "date", "device", "torch", "triton"} <= set(res)
    assert [r["tokens"] for r in res["results"]] == [1, 4, 16]
    assert all(r["correct"] for r in res["results"])


def test_tuning_script_smoke(tmp_path):
    res = run("tune_fused_moe.py", tmp_path / "t.json")
    assert set(res["configs"]) == {"1", "16"}
    assert all(c["block_m"] in (16, 32) for c in res["configs"].values())


def test_decode_benchmark_smoke(tmp_path):
    out = tmp_path / "d.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--smoke", "--tokens", "8",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["all_resident_tokens_per_second"] > 0 and len(res["runs"]) >= 12
    assert all(0 <= run["hit_rate"] <= 1 for run in res["runs"])


def test_bookkeeping_benchmark_host_mode_drives_the_same_cache_as_the_timeline(tmp_path):
    """The host-only mode (instant copies) and the timeline replay see the same routing, so without
    prediction they must count the same hits; with the oracle, every host-mode use is a hit."""
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bookkeeping.py"), "--tokens", "6",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert {(r["experts"], r["predictor"]) for r in rows} == {(e, p) for e in (8, 64, 128) for p in ("none", "oracle")}
    for row in rows:
        assert row["host_us_per_layer"] > 0 and row["timeline_us_per_layer"] > 0
        if row["predictor"] == "none":
            assert row["host_hit_rate"] == row["timeline_hit_rate"]
        else:
            assert row["host_hit_rate"] > 0.95  # 2 layers ahead, copies land at once: only the first layers miss
