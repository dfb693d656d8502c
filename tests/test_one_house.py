"""The house rules: dependencies run one way, one device->host read per MoE layer in decode, and the
five bugs the "one house" issue verified stay fixed."""

from __future__ import annotations

import ast
import gc
import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_offload
from helpers import write_model
from moe_offload.analysis.host_reads import count_reads
from moe_offload.analysis.sim import StepCosts
from moe_offload.analysis.bench import model_config
from moe_offload.analysis.sim import get_hardware
from moe_offload.offload import (CopyFaults, ExpertCache, HostExpertStore, ThreadCopyEngine, make_policy)
from moe_offload.options import OffloadConfig

ROOT = Path(__file__).resolve().parents[1]

# --- the import graph ---------------------------------------------------------------------------

# What each part of the package may import (besides the leaves config, checkpoint, errors, families,
# quant, results and itself). Top to bottom: cli -> runtime -> generate/analysis/predict -> model ->
# offload -> kernels. kernels imports nothing from moe_offload at all. families (the adapters that
# config, checkpoint and the model core ask) imports only errors.
LEAVES = {"config", "checkpoint", "errors", "families", "formats", "options", "quant", "results", "validate"}
MAY_IMPORT = {
    "kernels": set(),
    "families": {"errors"},
    "offload": {"kernels"},
    "model": {"kernels"},
    "predict": {"model", "kernels"},
    "analysis": {"offload", "model", "predict", "kernels"},
    "generate": {"model"},
    # a top-level entry point like cli: anything below it, nothing that imports it
    "integrations": {"runtime", "generate", "analysis", "predict", "model", "offload", "kernels", "validate"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for base, prefix in ((ROOT / "moe_offload", "moe_offload"),):
        for f in base.rglob("*.py"):
            rel = f.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([prefix, *parts])] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    pkg = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports count too: a cycle of types is a cycle
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        out.update(t for t in targets if t in mods and t != name)
    return out


def _part(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_import_graph_has_no_cycles_and_runs_one_way():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    # No cycle among modules (a package __init__ that re-exports its children is not an edge back).
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if d.startswith(m + "."):  # a package importing its own submodules
                continue
            if state.get(d) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [m, d])}")
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    bad = []
    for m, deps in graph.items():
        allowed = MAY_IMPORT.get(_part(m))
        if allowed is None:
            continue
        for d in deps:
            p = _part(d)
            if p != _part(m) and p not in allowed and not (p in LEAVES and _part(m) not in ("kernels", "families")):
                bad.append(f"{m} imports {d}")
    assert not bad, "dependencies must run one way:\n" + "\n".join(bad)


def test_import_graph_check_can_fail(monkeypatch):
    # The checker sees an upward import: pretend offload may import nothing.
    monkeypatch.setitem(MAY_IMPORT, "offload", set())
    with pytest.raises(AssertionError, match="offload"):
        test_import_graph_has_no_cycles_and_runs_one_way()


# --- one read per MoE layer ---------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(cache_per_layer=4), dict(cache_per_layer=4, predictor="next-gate"),
                                     dict(offload=False)], ids=["m2r2-prefetch", "next-gate-prefetch", "resident"])
def test_decode_step_reads_back_once_per_moe_layer(options):
    m = moe_offload.load(config=OffloadConfig.make(device="cpu", **options))
    L = m.config.num_hidden_layers
    prompt = "In the beginning God created"
    m.generate(prompt, max_new_tokens=2)  # warm-up
    one = count_reads(m.model, lambda: m.generate(prompt, max_new_tokens=1))
    many = count_reads(m.model, lambda: m.generate(prompt, max_new_tokens=6))
    per_step = {k: (many[k] - one[k]) / 5 for k in set(many) | set(one)}
    # resident on the CPU, the compiled decode step reads each layer's routed ids inside its own call
    assert {k: v for k, v in per_step.items() if v} == ({} if options == dict(offload=False) else {"cpu": L})
    if "cache_per_layer" in options:
        assert m.prefetcher is not None and m.prefetcher.issued > 0  # predictions did ride along


# --- the verified bugs --------------------------------------------------------------------------

def tiny_cache(num_slots, policy, faults=None):
    store = HostExpertStore(2, 4, 16, 16, torch.float32)
    for l in range(2):
        for e in range(4):
            store.row(l, e).fill_(l * 10 + e)
    return ExpertCache(store, num_slots, make_policy(policy), torch.device("cpu"), ThreadCopyEngine(faults))


def test_failed_prefetch_never_surfaces_on_an_unrelated_demand_load():
    c = tiny_cache(2, "lru", CopyFaults(delay=lambda k: 0.02 if k == (1, 3) else 0.0,
                                       fail=lambda k: k == (1, 3)))
    assert c.prefetch((1, 3), protect=set())  # will fail, slowly
    c.acquire(0, [1, 2])  # needs both slots: waits on the prefetch's slot; its failure is not ours
    c.release(0, [1, 2])
    assert set(c.resident()) == {(0, 1), (0, 2)}
    for key in c.resident():
        assert torch.all(c.pool[c.slot_of[key]] == key[0] * 10 + key[1])
    c.stats.check()


def test_a_needed_expert_whose_prefetch_failed_is_loaded_on_demand():
    from moe_offload.offload.transfer import COPY_RETRIES

    fails = {(1, 3): 1 + COPY_RETRIES}  # the prefetch fails even after its retries

    def fail(key):
        if fails.get(key):
            fails[key] -= 1
            return True
        return False

    c = tiny_cache(2, "lru", CopyFaults(fail=fail))
    assert c.prefetch((1, 3), protect=set())
    c.acquire(1, [3])  # the prefetch failed: loaded again on demand, no error
    c.release(1, [3])
    assert torch.all(c.pool[c.slot_of[1, 3]] == 13)
    assert c.stats.misses[1] == 1 and c.stats.hits[1] == 0 and c.stats.prefetch_hits[1] == 0
    c.stats.check()


def test_lfu_counts_a_miss_once_and_breaks_ties_by_recency():
    c = tiny_cache(3, "lfu")
    for e in (0, 1, 1, 2):
        c.acquire(0, [e])
        c.release(0, [e])
    assert c.policy.count[(0, 0)] == 1 and c.policy.count[(0, 1)] == 2  # a miss is one use
    c.acquire(0, [3])  # (0,0) and (0,2) both used once: (0,0) is the least recent
    c.release(0, [3])
    assert set(c.resident()) == {(0, 1), (0, 2), (0, 3)}


def test_sampling_without_a_seed_leaves_the_global_rng_alone(tmp_path):
    m = moe_offload.load(write_model(tmp_path), device="cpu")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    m.generate([1, 2, 3], max_new_tokens=4, temperature=1.0)
    assert torch.equal(torch.get_rng_state(), state)


def test_gpu_check_is_not_ok_when_offloaded_tokens_differ():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gc_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc_mod)
    row = {"capacity": 2, "tokens_equal": True, "prefill_logits_max_rel_diff": 1e-3}
    good = {"float16": {"by_capacity": [row]}, "bundled_greedy_tokens_equal_cache_per_layer_2": True}
    assert gc_mod.section_failures("offload_exactness", good) == []
    bad = {"float16": {"by_capacity": [{**row, "tokens_equal": False}]}}
    assert gc_mod.section_failures("offload_exactness", bad)
    far = {"float16": {"by_capacity": [{**row, "prefill_logits_max_rel_diff": 0.5}]}}
    assert gc_mod.section_failures("offload_exactness", far)
    assert gc_mod.section_failures("sync_debug", {"reads_per_layer": 3})


def test_copy_threads_stop_on_close_and_on_garbage_collection(tmp_path):
    with moe_offload.load(write_model(tmp_path), device="cpu", config=OffloadConfig.make(cache_experts=3)) as m:
        m.generate([1, 2, 3], max_new_tokens=2)
        worker = m.expert_cache.engine._worker
        assert worker.is_alive()
    worker.join(timeout=5)
    assert not worker.is_alive()
    engine = ThreadCopyEngine()
    worker = engine._worker
    del engine
    gc.collect()
    worker.join(timeout=5)
    assert not worker.is_alive()


def test_workers_of_collected_engines_are_joined_at_exit(tmp_path):
    """An engine dropped while its worker is still copying: at interpreter exit the worker must be joined
    (not left running into finalization, where a thread inside a C++ copy aborts the process with
    "terminate called"). An atexit hook registered before moe_offload's runs after it and checks."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import atexit, threading
        atexit.register(lambda: print("alive at exit:", [t.name for t in threading.enumerate()
                                                          if t.name == "moe-offload-copy"]))
        import gc, torch
        from moe_offload.offload.transfer import CopyFaults, ThreadCopyEngine
        engine = ThreadCopyEngine(CopyFaults(delay=lambda key: 0.3))  # the worker is busy for 0.3 s
        src, dst = torch.ones(1 << 20), torch.empty(1 << 20)
        engine.load((0, 0), src, dst, 0)
        del engine
        gc.collect()
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "alive at exit: []" in r.stdout, r.stdout


# --- tests that used to pass with the feature broken ------------------------------------------------

def test_step_costs_match_a_hand_computed_mixtral_timeline():
    costs = StepCosts.for_model(model_config("mixtral-8x7b"), get_hardware("rtx4090-pcie4"), "bf16")
    assert costs.expert_bytes == 352_321_536  # 3 x 4096 x 14336 x 2 bytes
    assert costs.copy == pytest.approx(352_321_536 / 25e9 + 10e-6)  # 14.103 ms
    assert costs.copy * 1e3 == pytest.approx(14.103, abs=5e-4)
    assert costs.expert == pytest.approx(352_321_536 / 1008e9)  # bandwidth-bound at batch 1
    attn_bytes = 2 * 4096 * 128 * (2 * 32 + 2 * 8)
    assert costs.attention == pytest.approx(attn_bytes / 1008e9 + 30e-6)
    assert costs.head == pytest.approx(2 * 32000 * 4096 / 1008e9)


def test_inflight_prefetches_are_never_evicted():
    c = tiny_cache(2, "lru", CopyFaults(delay=lambda k: 0.05 if k == (1, 3) else 0.0))
    assert c.prefetch((1, 3), protect=set())  # on the link for 50 ms
    assert c.prefetch((1, 2), protect=set())  # takes the other (free) slot
    c.reap()
    assert (1, 3) in c.inflight
    assert not c.prefetch((1, 1), protect={(1, 2)})  # the only unprotected resident is in flight
    assert c.slot_of[1, 3] >= 0 and (1, 1) not in c.inflight
    c.clear()


@pytest.mark.parametrize("name", ["lru", "lru-layer", "lfu", "predictive"])
def test_array_victim_choice_equals_the_policy_on_keys(name):
    """policy.pick (numpy, used by the cache) chooses exactly what policy.victim chooses on keys."""
    import numpy as np

    from moe_offload.offload.policy import make_policy

    rng = np.random.default_rng(3)
    L, E = 6, 128
    pol = make_policy(name)
    pol.bind(L, E)
    for step in range(400):
        key = (int(rng.integers(L)), int(rng.integers(E)))
        (pol.on_insert if step % 3 == 0 else pol.on_access)(key)
        if name == "predictive" and step % 50 == 0:
            pol.set_next_use({(int(rng.integers(L)), int(rng.integers(E))): float(rng.integers(1, 9))
                              for _ in range(40)})
        if step % 7 == 0:
            flat = np.unique(rng.choice(L * E, size=int(rng.integers(1, 60)), replace=False))
            keys = [(int(i) // E, int(i) % E) for i in flat]
            for k in keys:  # every candidate is resident: it was inserted once
                if k not in pol.last_use:
                    pol.on_insert(k)
            want = pol.victim(keys)
            assert pol.pick(flat) == want[0] * E + want[1]
            mask = np.zeros(L * E, dtype=bool)
            mask[flat] = True
            assert pol.pick_masked(mask, 0) == want[0] * E + want[1]  # the cache's form: a mask, all layers
            row = int(flat[0]) // E  # ... and one layer's row (per-layer slots)
            in_row = [k for k in keys if k[0] == row]
            want_row = pol.victim(in_row)
            assert pol.pick_masked(mask[row * E:(row + 1) * E], row * E) == want_row[0] * E + want_row[1]


# --- the product surface ------------------------------------------------------------------------

def test_readme_results_and_tracked_files_stay_product_sized():
    # The README is for users (at most 300 lines, history in CHANGELOG.md); benchmarks/results/ holds the
    # current figures only (at most 25 files); no tracked text file outside lab/ names a machine path.
    import re
    import subprocess

    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 300
    assert len(list((ROOT / "benchmarks" / "results").iterdir())) <= 25
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    machine = re.compile(r"/(?:work|home|root)/[A-Za-z]")
    bad = [f for f in files if not f.startswith(("lab/", "tests/")) and f.endswith((".py", ".md", ".json", ".toml"))
           and machine.search((ROOT / f).read_text(encoding="utf-8", errors="replace"))]
    assert not bad, bad
