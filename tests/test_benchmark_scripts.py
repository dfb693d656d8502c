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
    res = run("kernels.py", tmp_path / "k.json")
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


def cross_trace(path: Path, T: int = 48, L: int = 6, E: int = 8, k: int = 2, D: int = 12) -> Path:
    """A synthetic trace whose m2r2 rows (D = 12, crossing tokens) are the future routing plus noise."""
    import numpy as np

    from moe_offload.analysis.trace import RoutingTrace, save_trace

    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(T)]).astype(np.int16)
    truth = np.zeros((T * L + D, E), np.float32)
    np.put_along_axis(truth[: T * L], ids.reshape(T * L, k).astype(np.int64), 1.0, axis=1)
    steps = np.arange(T * L)[:, None] + np.arange(1, D + 1)[None]
    m2r2 = truth[steps].reshape(T, L, D, E) + rng.random((T, L, D, E), dtype=np.float32)
    ng = m2r2.copy()
    for layer in range(L):
        ng[:, layer, L - 1 - layer:] = np.nan  # next-gate stops at the token's last layer
    probs = np.full((T, L, E), 1.0 / E, np.float32)
    trace = RoutingTrace(np.arange(T), ids, np.full((T, L, k), 0.5, np.float32), 64, probs,
                         {"m2r2": m2r2, "next-gate": ng}, None, rng.random((T, L, E), dtype=np.float32))
    return save_trace(path, trace, {"synthetic": True})


def test_cross_token_benchmarks_run_on_a_cross_trace(tmp_path):
    trace = cross_trace(tmp_path / "x.npz")
    out = tmp_path / "abl.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cross_token_ablation.py"), "--trace", str(trace),
                        "--max-tokens", "48", "--out", str(out)], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert rows[0]["vs_lru_layer_none"] == 1.0 and all(0 <= x["on_time_hit_rate"] <= x["hit_rate"] <= 1 for x in rows)
    assert out.with_suffix(".md").read_text().count("\n") == len(rows) + 4
    out2 = tmp_path / "sim.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "simulate_issue12.py"), "--trace", str(trace),
                        "--cross-trace", str(trace), "--max-tokens", "48", "--out", str(out2)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    cross = [x for x in json.loads(out2.read_text())["results"] if x["predictor"] == "m2r2-cross"]
    assert len(cross) == 8 and {x["policy"] for x in cross} == {"predictive"} and cross[0]["rank_depth"] == 8
