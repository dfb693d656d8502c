"""Page-cache statistics of memory-mapped expert stores (GGUF files, read through mincore(2)) and
OffloadedModel.store_info() (the same description as `info --json`). Residency oracles are the OS's own:
an anonymous map's untouched pages are never resident, posix_fadvise(DONTNEED) drops a synced file's
clean pages, and reading a file puts it in the page cache."""

from __future__ import annotations

import gc
import json
import mmap
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import moe_offload as mo  # noqa: E402
from moe_offload.gguf_checkpoint import GgufCheckpoint  # noqa: E402
from moe_offload.offload import ExpertCache, make_policy  # noqa: E402
from moe_offload.offload import pagecache  # noqa: E402
from moe_offload.offload.pagecache import PAGE_SIZE, PageCacheProbe, missing_bytes, row_missing_bytes  # noqa: E402
from moe_offload.offload.rows import Segments  # noqa: E402
from moe_offload.offload.store import HostExpertStore  # noqa: E402
from moe_offload.offload.transfer import CopyFaults, ThreadCopyEngine  # noqa: E402

from test_gguf import PROMPT, tiny_mixtral, write_gguf, write_wide_gguf  # noqa: E402

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore is asked on Linux only")
P = PAGE_SIZE


def anon_map(pages: int) -> tuple[mmap.mmap, torch.Tensor]:
    m = mmap.mmap(-1, pages * P)  # anonymous: untouched pages are not resident
    return m, torch.from_numpy(np.frombuffer(m, dtype=np.uint8))


@linux
def test_mincore_counts_the_bytes_on_non_resident_pages_of_a_range():
    _, t = anon_map(16)
    base = t.data_ptr()
    assert missing_bytes(base, 16 * P) == 16 * P
    t[P + 5] = 1  # page 1 resident
    assert missing_bytes(base + 100, 3 * P) == 3 * P - P  # pages 0 (part), 1 (resident), 2, 3 (part)
    assert missing_bytes(base + P + 10, 100) == 0  # inside the resident page
    assert missing_bytes(base + 2 * P - 30, 60) == 30  # 30 bytes on page 1, 30 on page 2
    assert missing_bytes(base, 0) == 0
    seg = Segments([t[10:5000], t[3 * P: 5 * P], t[8 * P + 7: 8 * P + 9]])
    assert row_missing_bytes(seg) == (seg.nbytes, (P - 10) + 2 * P + 2)  # 904 bytes of the first on page 1
    assert row_missing_bytes(t[P: 2 * P]) == (P, 0)
    t[:] = 1
    assert row_missing_bytes(seg) == (seg.nbytes, 0)


def test_where_the_os_cannot_tell_the_probe_says_unknown(monkeypatch):
    monkeypatch.setattr(pagecache, "_MINCORE", None)
    probe = PageCacheProbe()
    assert probe.method == "unknown" and probe.check(torch.zeros(10, dtype=torch.uint8)) is None
    assert missing_bytes(12345, 10) is None


def drop_from_page_cache(path) -> None:
    gc.collect()  # models of earlier tests unmap the file (DONTNEED keeps pages a live mapping holds)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # written pages are clean after this, so DONTNEED can drop them
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_whole_file(path) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 20):
            pass


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A GGUF file whose experts are 1 MB each (2 layers x 8 of Q8_0, 16 MB)."""
    return write_wide_gguf(tmp_path_factory.mktemp("pc") / "wide.gguf", inter=1280)


def file_missing_bytes(path) -> int:
    """Bytes of the file outside the page cache, through a mapping of its own (no page of it touched)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mm:
        view = np.frombuffer(mm, dtype=np.uint8)
        try:
            return missing_bytes(view.ctypes.data, view.size)
        finally:
            del view


@linux
def test_a_gguf_stores_loads_count_page_cache_misses_and_never_change_results(tmp_path):
    f = write_wide_gguf(tmp_path / "wide.gguf", inter=1280)  # a file no other test has mapped
    with mo.load(f, device="cpu", dtype="float32", cache_per_layer=2) as m:
        store = m.expert_cache.store
        drop_from_page_cache(f)  # after load (which read the dense tensors and the header): experts only
        cold_rows = [row_missing_bytes(store.row(0, e))[1] for e in range(store.num_experts)]
        r = m.generate(PROMPT, max_new_tokens=4)
        st = m.cache_stats()
        assert st["page_cache"] == "mincore" and st["misses"] > 0
        assert st["page_cache_checked_bytes"] == st["bytes_h2d"]  # every load of the map was asked about
        assert 0 <= st["page_cache_miss_bytes"] <= st["page_cache_checked_bytes"]
        assert sum(p["page_cache_miss_bytes"] for p in st["per_layer"]) == st["page_cache_miss_bytes"]
        cold = st["page_cache_miss_bytes"]
        print(f"after DONTNEED (layer 0's rows missing {cold_rows} bytes): {cold:,} of "
              f"{st['page_cache_checked_bytes']:,} loaded bytes missed the page cache")
        if min(cold_rows) == 0:  # the OS kept the file cached: consistency only (asserted above)
            pytest.xfail("the OS kept the file in the page cache despite POSIX_FADV_DONTNEED")
        # nothing reads layer 0's experts before its first load, which finds its row outside the cache
        assert st["per_layer"][0]["page_cache_miss_bytes"] > 0
        read_whole_file(f)  # every page resident now
        m.expert_cache.clear()
        r2 = m.generate(PROMPT, max_new_tokens=4)
        st = m.cache_stats()
        assert st["page_cache_checked_bytes"] == st["bytes_h2d"] > 0 and st["page_cache_miss_bytes"] == 0
    want = mo.load(f, device="cpu", dtype="float32", offload=False).generate(PROMPT, max_new_tokens=4).token_ids
    assert r.token_ids == r2.token_ids == want  # the check reads nothing: results as without it


@linux
def test_each_load_counts_its_rows_missing_bytes_and_a_cancelled_prefetch_takes_them_back(wide):
    ck = GgufCheckpoint(wide)
    store = HostExpertStore.from_checkpoint(ck, torch.float32, fmt=ck.config.expert_format)
    drop_from_page_cache(wide)
    dropped = file_missing_bytes(wide)
    # the worker sits 0.3 s on the first chunk of (0, 0): (0, 1)'s prefetch waits in the queue
    engine = ThreadCopyEngine(CopyFaults(delay=lambda key: 0.3 if key == (0, 0) else 0.0))
    c = ExpertCache(store, 4, make_policy("lru"), torch.device("cpu"), engine)
    try:
        assert c.stats.page_cache == "mincore"
        one = store.layer_bytes[0]
        want0 = row_missing_bytes(store.row(0, 0))  # the OS's answer just before the load
        assert c.prefetch((0, 0), protect=set())
        time.sleep(0.05)
        want1 = row_missing_bytes(store.row(0, 1))
        assert c.prefetch((0, 1), protect=set())
        assert int(c.stats.page_cache_checked_bytes[0]) == 2 * one == want0[0] + want1[0]
        assert int(c.stats.page_cache_miss_bytes[0]) == want0[1] + want1[1]
        assert c.cancel_prefetch((0, 1))
        assert int(c.stats.page_cache_checked_bytes[0]) == one and int(c.stats.bytes_h2d[0]) == one
        assert int(c.stats.page_cache_miss_bytes[0]) == want0[1]
        c.reap()
        c.stats.check()
        if dropped == 0:
            pytest.xfail("the OS kept the file in the page cache despite POSIX_FADV_DONTNEED")
        assert want0[1] > 0  # the dropped file's expert row: its load read from disk
    finally:
        c.close()


@linux
def test_a_prefetch_cancelled_after_a_stats_reset_takes_nothing_from_the_new_window(wide):
    # generate() resets the stats while a prefetch of the previous call may still be queued: its bytes
    # were counted in the old window, so cancelling it must not drive the new one below zero.
    ck = GgufCheckpoint(wide)
    store = HostExpertStore.from_checkpoint(ck, torch.float32, fmt=ck.config.expert_format)
    engine = ThreadCopyEngine(CopyFaults(delay=lambda key: 0.3 if key == (0, 0) else 0.0))
    c = ExpertCache(store, 4, make_policy("lru"), torch.device("cpu"), engine)
    try:
        assert c.prefetch((0, 0), protect=set())
        time.sleep(0.05)
        assert c.prefetch((0, 1), protect=set())
        c.reset_stats()
        assert c.cancel_prefetch((0, 1))
        assert int(c.stats.page_cache_checked_bytes[0]) == 0 and int(c.stats.page_cache_miss_bytes[0]) == 0
        assert int(c.stats.bytes_h2d[0]) == 0
        c.reap()
        c.stats.check()
    finally:
        c.close()


def test_a_store_that_is_not_memory_mapped_reports_null():
    with mo.load(device="cpu", dtype="float32", cache_per_layer=2) as m:  # the bundled safetensors folder
        m.generate("In the beginning", max_new_tokens=2)
        st = m.cache_stats()
        assert st["misses"] > 0 and st["page_cache"] is None
        assert st["page_cache_checked_bytes"] is None and st["page_cache_miss_bytes"] is None
        assert all("page_cache_miss_bytes" not in p for p in st["per_layer"])
        assert m.expert_cache.page_probe is None


def test_a_mapped_store_on_an_os_that_cannot_tell_reports_unknown(wide, monkeypatch):
    monkeypatch.setattr(pagecache, "_MINCORE", None)
    with mo.load(wide, device="cpu", dtype="float32", cache_per_layer=2) as m:
        m.generate(PROMPT, max_new_tokens=2)
        st = m.cache_stats()
        assert st["page_cache"] == "unknown" and st["misses"] > 0
        assert st["page_cache_checked_bytes"] is None and st["page_cache_miss_bytes"] is None


@linux
def test_metrics_export_page_cache_miss_bytes_for_a_mapped_store(wide):
    from moe_offload.serve.app import _metrics
    from moe_offload.serve.engine import Counters

    engine = SimpleNamespace(counters=Counters(), scheduler=SimpleNamespace(queue_length=0), active=0)
    with mo.load(wide, device="cpu", dtype="float32", cache_per_layer=2) as m:
        m.generate(PROMPT, max_new_tokens=2)
        miss = m.cache_stats()["page_cache_miss_bytes"]
        assert f"moe_offload_expert_page_cache_miss_bytes_total {miss:g}\n" in _metrics(m, engine)
    with mo.load(device="cpu", dtype="float32", cache_per_layer=2) as m:
        assert "page_cache" not in _metrics(m, engine)


def info_store(path, capsys) -> dict:
    from moe_offload.cli import main

    assert main(["info", "--model", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["expert_store"]


def test_store_info_equals_info_json_for_a_gguf_file(tmp_path, capsys):
    f = write_gguf(tmp_path / "m.gguf", tiny_mixtral(64, 96), "llama", types=("Q4_0", "Q4_1", "Q8_0"), dense="Q8_0")
    want = info_store(f, capsys)
    assert want["mapped"] is True and want["format"] == "gguf:Q4_0,Q4_1,Q8_0"
    for offload in (True, False):  # the cache's store, or the resident packed experts' (the same map)
        with mo.load(f, device="cpu", dtype="float32", offload=offload) as m:
            got = m.store_info()
            assert got == want
            store = m.expert_cache.store if offload else m.model.experts.store
            assert (got["host_bytes"], got["one_expert_bytes"]) == (store.host_bytes, store.expert_bytes)


def test_store_info_equals_info_json_for_a_safetensors_folder(tmp_path, capsys):
    from moe_offload.cli import main

    d = tmp_path / "int8"
    assert main(["quantize", "--out", str(d), "--expert-dtype", "int8"]) == 0
    capsys.readouterr()
    want = info_store(d, capsys)
    assert want["mapped"] is False and want["format"] == "int8"
    with mo.load(d, device="cpu", dtype="float32", cache_per_layer=2) as m:
        got = m.store_info()
        assert got == want and got["host_bytes"] == m.expert_cache.store.host_bytes
    with mo.load(device="cpu", dtype="float32", cache_per_layer=2) as m:  # float experts: the store as loaded
        got = m.store_info()
        assert got["format"] == "fp32" and got["mapped"] is False
        assert got["host_bytes"] == m.expert_cache.store.host_bytes > 0 and "tensor_groups" in got
    with mo.load(device="cpu", dtype="float32", offload=False) as m:
        with pytest.raises(mo.MoeOffloadError, match="no host expert store"):
            m.store_info()
