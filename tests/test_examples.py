"""The examples run as a user would run them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_embed_expert_cache_example(tmp_path):
    for args in ([], ["--slots", "2", "--policy", "lfu"], ["--slots", "6", "--policy", "lru-layer"],
                 ["--integration", "--slots", "2", "--policy", "lfu"]):
        r = subprocess.run([sys.executable, str(ROOT / "examples" / "embed_expert_cache.py"), *args],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "max relative logit difference" in r.stdout and "misses" in r.stdout
