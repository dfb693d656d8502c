#!/usr/bin/env python
"""Anonymous memory of `load(..., expert_dtype=...)` (quantized on load, one expert at a time).

Each case runs in a fresh subprocess: RssAnon after importing moe_offload is the baseline; a thread
samples RssAnon every 5 ms during load() for the peak; the value after load() is what the model holds.
RssAnon leaves out the checkpoint's memory-mapped pages (file-backed, which VmHWM counts).

    python benchmarks/load_memory.py [--model-734m DIR] [--out benchmarks/results/load_memory.json]

--model-734m defaults to $MOE_OFFLOAD_PEER_DIR/mixtral-734m (made by `benchmarks/cpu_quant.py --build-734m`);
without it only the bundled model is measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from moe_offload.results import result_metadata, write_json_atomic

from _paths import env_path, shown

CHILD = r"""
import json, sys, threading, time
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
import moe_offload as mo
base = anon()
peak, stop = [base], [False]
def watch():
    while not stop[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)
threading.Thread(target=watch, daemon=True).start()
path, fmt, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
kw = dict(expert_dtype=fmt, dtype=dtype)
model = mo.load(None if path == "bundled" else path, **kw)
time.sleep(0.05)
stop[0] = True
print(json.dumps({"baseline_mb": base, "peak_above_baseline_mb": peak[0] - base,
                  "after_load_above_baseline_mb": anon() - base}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-734m", default=None, metavar="DIR",
                    help="a larger Mixtral folder (default: $MOE_OFFLOAD_PEER_DIR/mixtral-734m; skipped if absent)")
    ap.add_argument("--out", default="benchmarks/results/load_memory.json")
    args = ap.parse_args()
    peer_dir = env_path(None, "MOE_OFFLOAD_PEER_DIR")
    if args.model_734m is None and peer_dir is not None:
        args.model_734m = str(peer_dir / "mixtral-734m")
    cases = [("bundled", "int4", "bfloat16")]
    if args.model_734m and Path(args.model_734m).is_dir():
        cases += [(args.model_734m, fmt, dt) for fmt, dt in (("int4", "bfloat16"), ("int8", "bfloat16"),
                                                              ("int4", "float32"), ("auto", "bfloat16"))]
    rows = []
    for path, fmt, dt in cases:
        r = subprocess.run([sys.executable, "-c", CHILD, path, fmt, dt], capture_output=True, text=True, check=True)
        row = {"model": path if path == "bundled" else shown(path), "expert_dtype": fmt, "dtype": dt,
               **json.loads(r.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"{path} {fmt} @{dt}: peak +{row['peak_above_baseline_mb']:.0f} MB, after load "
              f"+{row['after_load_above_baseline_mb']:.0f} MB (baseline {row['baseline_mb']:.0f} MB)", flush=True)
    print("saved", write_json_atomic(args.out, {**result_metadata("cpu"), "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
