"""Safetensors experts read in place: the host expert store reads a safetensors checkpoint's experts
straight from the file's memory map (as it reads a GGUF file's) wherever the file's bytes are the rows
the format holds: float experts stored in the compute dtype, a hub format as shipped (GPTQ here; GPT-OSS's
fused MXFP4 slices). Oracles: the same store copied into RAM (map_file=False; the path every other test
exercises), the resident model, the file's own bytes (safetensors' load_file) and the OS (mincore)."""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_offload as mo
from helpers import decode_logits, make_hf_checkpoint
from hub_writers import convert_folder, expert_file_bytes
from moe_offload.checkpoint import Checkpoint
from moe_offload.errors import MoeOffloadError, NonFiniteError
from moe_offload.offload import store as store_mod
from moe_offload.offload.packed import PackedResidentExperts
from moe_offload.offload.rows import Segments, Stacked, copy_row
from moe_offload.offload.store import HostExpertStore, reads_in_place
from moe_offload.offload.store_info import expert_store_info

PROMPT = [5, 17, 3, 88, 41, 9, 60, 2, 33]
L, E = 2, 6
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
             num_local_experts=E, num_experts_per_tok=2, vocab_size=96)
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore is asked on Linux only")


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    """A random MixtralForCausalLM saved by transformers' save_pretrained (float32, one file)."""
    d = tmp_path_factory.mktemp("mapped") / "f32"
    make_hf_checkpoint(d, **SHAPE)
    return d


@pytest.fixture(scope="module")
def gptq_folder(tmp_path_factory):
    """The same kind of model with every expert and attention linear GPTQ (act-order), as published."""
    root = tmp_path_factory.mktemp("mapped_gptq")
    make_hf_checkpoint(root / "float", **{**SHAPE, "hidden_size": 128, "intermediate_size": 128})
    d = root / "gptq"
    return d, convert_folder(root / "float", d, "gptq", bits=4, group=32, sym=True, desc_act=True)


@contextmanager
def copying(monkeypatch):
    """load() with the store copied into RAM (map_file=False): the reference."""
    orig = HostExpertStore.from_checkpoint.__func__
    with monkeypatch.context() as mp:
        mp.setattr(HostExpertStore, "from_checkpoint",
                   classmethod(lambda cls, *a, **k: orig(cls, *a, **{**k, "map_file": False})))
        yield


def assert_rows_are_the_files_tensors(ckpt: Checkpoint, store: HostExpertStore, names) -> None:
    """Every row is pieces of the file's memory map, each at its tensor's own offset in the file (no
    copy), in the format's section order, holding the file's bytes."""
    cfg = ckpt.config
    files = {info.file for info in ckpt.tensors.values()}
    maps = {f: ckpt.file_map(f) for f in files}
    stored = {}
    for f in files:
        stored.update(load_file(f))
    assert store.mapped and store.buffer is None and store.layer_rows is None and not store.pinned
    for layer in range(cfg.num_moe_layers):
        secs = store.formats[layer].layout(cfg.hidden_size, cfg.intermediate_size)
        for e in range(cfg.num_local_experts):
            row = store.row(layer, e)
            assert isinstance(row, Segments) and row.nbytes == sum(s.nbytes for s in secs)
            for sec, part in zip(secs, row.parts):
                name = names(layer, e, sec.name)
                info = ckpt.tensors[name]
                base = maps[info.file].data_ptr()
                assert part.data_ptr() == base + info.offset  # the file's bytes where they lie: a view
                assert base <= part.data_ptr() < base + maps[info.file].numel()
                assert ckpt.in_map(part) and part.untyped_storage().data_ptr() == base
                want = stored[name].contiguous().view(-1).view(torch.uint8)
                assert torch.equal(row[sec.offset: sec.offset + sec.nbytes], want)


def float_names(ckpt):
    fam = ckpt.config.family
    return lambda layer, e, sec: fam.expert_name(layer, e, sec)


# --- float experts in the compute dtype ------------------------------------------------------------------
def test_float_experts_in_the_compute_dtype_are_read_in_place(float_folder):
    ckpt = Checkpoint(float_folder)
    ckpt.validate()
    store = HostExpertStore.from_checkpoint(ckpt, torch.float32)  # pin False: a CPU run
    assert_rows_are_the_files_tensors(ckpt, store, float_names(ckpt))
    copy = HostExpertStore.from_checkpoint(Checkpoint(float_folder), torch.float32, map_file=False)
    assert not copy.mapped and copy.buffer is not None
    assert (store.host_bytes, store.expert_bytes, store.row_lengths) == (copy.host_bytes, copy.expert_bytes,
                                                                         copy.row_lengths)
    x = torch.randn(3, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(0))
    for layer in range(L):
        pool = store.layer_pool(layer)  # straight over the file's tensors
        assert isinstance(pool.w13, Stacked) and pool.num_slots == E
        assert not ckpt.in_map(pool.dequant_projection("w13", 0))  # w1, w2, w3 in the file: [w1; w3] gathered
        for e in range(E):
            row = torch.empty_like(copy.row(layer, e))
            copy_row(row, store.row(layer, e))
            assert torch.equal(row, copy.row(layer, e))  # a slot filled from the map holds the copy's row
            assert torch.equal(store.w13(layer, e), copy.w13(layer, e)) and torch.equal(store.w2(layer, e),
                                                                                        copy.w2(layer, e))
            assert torch.equal(pool.ffn(e, x), copy.layer_pool(layer).ffn(e, x))
            assert torch.equal(store.cpu_expert(layer, e).ffn(0, x), copy.cpu_expert(layer, e).ffn(0, x))
        assert torch.equal(store.layer_rows_on(layer, torch.device("cpu")), copy.layer_rows[layer])
    with pytest.raises(MoeOffloadError, match="reads a file's memory map"):
        store.put(0, 0, *(torch.zeros(1),) * 3)


def test_logits_and_tokens_equal_the_copied_store_bit_for_bit_and_offloaded_equals_resident(float_folder,
                                                                                            monkeypatch):
    res = mo.load(float_folder, device="cpu", dtype="float32", offload=False)  # resident experts (the oracle)
    ref_logits, ref_decode = res.logits(PROMPT), decode_logits(res, PROMPT)
    ref_tokens = res.generate(PROMPT, max_new_tokens=10).token_ids
    with copying(monkeypatch), mo.load(float_folder, device="cpu", dtype="float32", cache_per_layer=3) as c:
        assert not c.expert_cache.store.mapped
        copied = (c.logits(PROMPT), decode_logits(c, PROMPT), c.generate(PROMPT, max_new_tokens=10).token_ids)
    for cap in (2, 3, E):  # cache smaller than the experts (cpu link copies from the map), and all of them
        with mo.load(float_folder, device="cpu", dtype="float32", cache_per_layer=cap) as m:
            assert m.expert_cache.store.mapped and m.expert_cache.store.buffer is None
            assert torch.equal(m.logits(PROMPT), ref_logits)
            assert torch.equal(decode_logits(m, PROMPT), ref_decode)
            r = m.generate(PROMPT, max_new_tokens=10)
            assert r.token_ids == ref_tokens
            if cap < E:
                assert r.stats["misses"] > 0
            if cap == 3:
                assert torch.equal(copied[0], ref_logits) and torch.equal(copied[1], ref_decode)
                assert copied[2] == r.token_ids


def test_gate_and_up_stored_side_by_side_run_from_the_map_without_a_gather(tmp_path, monkeypatch):
    """Qwen's experts.E.{down,gate,up}_proj sort with gate right before up: [w1; w3] is a view of the file
    (Mixtral's w1, w2, w3 need a gather); either way an expert computes what the copied row computes."""
    from test_families import build_hf

    d = tmp_path / "qwen3"
    build_hf(d, "qwen3_moe")
    ckpt = Checkpoint(d)
    store = HostExpertStore.from_checkpoint(ckpt, torch.float32)
    copy = HostExpertStore.from_checkpoint(Checkpoint(d), torch.float32, map_file=False)
    assert_rows_are_the_files_tensors(ckpt, store, float_names(ckpt))
    x = torch.randn(2, ckpt.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for layer in range(ckpt.config.num_moe_layers):
        pool = store.layer_pool(layer)
        for e in range(ckpt.config.num_local_experts):
            w13 = pool.dequant_projection("w13", e)
            assert w13.data_ptr() == pool.w13[e].data_ptr() and ckpt.in_map(w13)  # no copy
            assert torch.equal(w13, copy.w13(layer, e))
            assert torch.equal(pool.ffn(e, x), copy.layer_pool(layer).ffn(e, x))
    with copying(monkeypatch), mo.load(d, device="cpu", dtype="float32", cache_per_layer=3) as c:
        ref_logits, ref_tokens = c.logits([1, 5, 9, 3]), c.generate([1, 5, 9, 3], max_new_tokens=6).token_ids
    with mo.load(d, device="cpu", dtype="float32", cache_per_layer=3) as m:
        assert m.expert_cache.store.mapped
        assert torch.equal(m.logits([1, 5, 9, 3]), ref_logits)
        assert m.generate([1, 5, 9, 3], max_new_tokens=6).token_ids == ref_tokens


def test_a_sharded_checkpoint_is_read_in_place_from_every_shard(tmp_path):
    d = tmp_path / "sharded"
    make_hf_checkpoint(d, max_shard_size="60KB", **SHAPE)
    ckpt = Checkpoint(d)
    shards = {info.file for info in ckpt.tensors.values()}
    assert len(shards) > 2
    store = HostExpertStore.from_checkpoint(ckpt, torch.float32)
    assert_rows_are_the_files_tensors(ckpt, store, float_names(ckpt))
    assert len({ckpt.tensors[float_names(ckpt)(l, e, "w1")].file for l in range(L) for e in range(E)}) > 1
    res = mo.load(d, device="cpu", dtype="float32", offload=False)
    with mo.load(d, device="cpu", dtype="float32", cache_per_layer=2) as m:
        assert m.expert_cache.store.mapped
        assert torch.equal(m.logits(PROMPT), res.logits(PROMPT))


def rss_anon() -> int:
    """This process's anonymous resident memory (what a copy of the experts would add), Linux's RssAnon;
    the page cache pages a map of the file faults in are RssFile, not counted."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@linux
def test_reading_in_place_allocates_no_copy_of_the_experts(tmp_path):
    import gc

    from helpers import write_model
    from moe_offload import ModelConfig

    cfg = ModelConfig(vocab_size=32, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                      head_dim=128, max_position_embeddings=32, torch_dtype="float32")
    d = write_model(tmp_path / "wide", cfg)
    HostExpertStore.from_checkpoint(Checkpoint(d), torch.float32)  # every first-use cost paid
    gc.collect()
    before = rss_anon()
    store = HostExpertStore.from_checkpoint(Checkpoint(d), torch.float32)  # maps, then scans every expert
    grown = rss_anon() - before
    print(f"experts {store.host_bytes / 1e6:.1f} MB; anonymous RSS grew {grown / 1e6:.1f} MB")
    assert 45e6 < store.host_bytes < 55e6 and store.mapped
    assert grown < 0.25 * store.host_bytes  # a copy into RAM would add all of them


# --- where the bytes differ: the copy stays --------------------------------------------------------------
def test_a_dtype_conversion_or_quantize_on_load_keeps_the_copy(float_folder, monkeypatch):
    ckpt = Checkpoint(float_folder)
    bf16 = HostExpertStore.from_checkpoint(ckpt, torch.bfloat16)  # a float32 file, bfloat16 compute: converted
    assert not bf16.mapped and bf16.buffer is not None and bf16.buffer.dtype == torch.bfloat16
    assert not reads_in_place(ckpt, None, torch.bfloat16)
    with pytest.raises(MoeOffloadError, match=r"cannot be read in place .* stored as float32, the bf16 rows hold "
                                              r"bfloat16"):
        HostExpertStore.from_checkpoint(ckpt, torch.bfloat16, map_file=True)
    int8 = HostExpertStore.from_checkpoint(ckpt, torch.float32, fmt="int8")  # quantized as it loads
    assert not int8.mapped and int8.buffer is not None
    with pytest.raises(MoeOffloadError, match="quantized to int8 as they load"):
        HostExpertStore.from_checkpoint(ckpt, torch.float32, fmt="int8", map_file=True)
    with mo.load(float_folder, device="cpu", dtype="bfloat16", cache_per_layer=2) as m:
        assert not m.expert_cache.store.mapped and m.store_info()["mapped"] is False
    # a copy that does not fit in RAM is refused as before (it cannot be read in place instead)
    monkeypatch.setattr(store_mod, "available_host_bytes", lambda: store_mod.HOST_RAM_MARGIN + 1000)
    with pytest.raises(MoeOffloadError, match="host RAM too small for the host expert store"):
        HostExpertStore.from_checkpoint(ckpt, torch.bfloat16)


def test_moe_offloads_own_int8_export_is_repacked_not_mapped(float_folder, tmp_path):
    from moe_offload.quant.export import quantize_checkpoint

    d = tmp_path / "int8"
    quantize_checkpoint(float_folder, d, "int8", 128)
    ckpt = Checkpoint(d)
    store = HostExpertStore.from_checkpoint(ckpt, torch.float32, fmt=ckpt.config.expert_format)
    assert not store.mapped and store.buffer is not None
    with pytest.raises(MoeOffloadError, match="own export"):
        HostExpertStore.from_checkpoint(ckpt, torch.float32, fmt=ckpt.config.expert_format, map_file=True)


# --- the choice: CPU runs map; a CUDA run keeps its pinned copy unless RAM is short --------------------
def test_a_store_larger_than_ram_is_read_in_place_and_warns_with_the_shortfall(float_folder, monkeypatch):
    ckpt = Checkpoint(float_folder)
    experts = HostExpertStore.from_checkpoint(ckpt, torch.float32).host_bytes
    monkeypatch.setattr(store_mod, "available_host_bytes", lambda: 1 << 50)
    assert reads_in_place(ckpt, None, torch.float32) and not reads_in_place(ckpt, None, torch.float32, pin=True)
    copy = HostExpertStore.from_checkpoint(ckpt, torch.float32, map_file=False)
    assert not copy.mapped
    monkeypatch.setattr(store_mod, "available_host_bytes", lambda: store_mod.HOST_RAM_MARGIN + experts // 4)
    assert reads_in_place(ckpt, None, torch.float32, pin=True)  # the copy would not fit: the map instead
    short = (experts - experts // 4) / 1e9
    with pytest.warns(UserWarning, match=rf"exceed the RAM available .* by {short:.2f} GB.*memory map.*projected "
                                         r"disk-bound decode about \S+ tokens/s; experts not scanned for NaN/Inf"):
        store = HostExpertStore.from_checkpoint(ckpt, torch.float32, pin=True)  # pin: a CUDA run's request
    assert store.mapped and not store.pinned and store.buffer is None
    assert_rows_are_the_files_tensors(ckpt, store, float_names(ckpt))
    with pytest.warns(UserWarning, match="exceed the RAM available"):
        m = mo.load(float_folder, device="cpu", dtype="float32", cache_per_layer=2)
    with m:
        assert m.expert_cache.store.mapped and m.generate(PROMPT, max_new_tokens=3).token_ids  # still runs
    monkeypatch.setattr(store_mod, "available_host_bytes", lambda: store_mod.HOST_RAM_MARGIN + experts)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert HostExpertStore.from_checkpoint(ckpt, torch.float32).mapped  # fits: mapped on the CPU, no warning


def test_nan_in_an_expert_read_in_place_is_named_at_load(float_folder, tmp_path):
    d = tmp_path / "nan"
    d.mkdir()
    for f in float_folder.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    name = "model.layers.1.block_sparse_moe.experts.4.w2.weight"
    tensors = load_file(d / "model.safetensors")
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] = float("nan")
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=name.replace(".", r"\.")):
        HostExpertStore.from_checkpoint(Checkpoint(d), torch.float32)
    with pytest.raises(NonFiniteError, match=name.replace(".", r"\.")):
        mo.load(d, device="cpu", dtype="float32", cache_per_layer=2)


# --- a hub format as shipped -----------------------------------------------------------------------------
def test_gptq_experts_are_read_in_place_and_run_as_the_copy_does(gptq_folder, monkeypatch):
    d, tensors = gptq_folder
    ckpt = Checkpoint(d)
    ckpt.validate()
    cfg = ckpt.config
    fmt = cfg.expert_format
    store = HostExpertStore.from_checkpoint(ckpt, torch.float32, fmt=fmt, group_size=cfg.expert_group_size)
    assert store.host_bytes == expert_file_bytes(tensors) == ckpt.expert_file_bytes()

    def names(layer, e, sec):
        w, sfx = sec.split(".", 1)
        return f"{cfg.family.expert_name(layer, e, w).removesuffix('.weight')}.{sfx}"

    assert_rows_are_the_files_tensors(ckpt, store, names)
    copy = HostExpertStore.from_checkpoint(Checkpoint(d), torch.float32, fmt=fmt, group_size=cfg.expert_group_size,
                                           map_file=False)
    for layer in range(L):
        mapped_pool, copy_pool = store.layer_pool(layer), copy.layer_pool(layer)
        for e in range(E):
            for which in ("w13", "w2"):
                assert torch.equal(mapped_pool.dequant_projection(which, e), copy_pool.dequant_projection(which, e))
    # resident (packed experts over the map on the cpu) and offloaded: equal to the copied store's, bit for bit
    with copying(monkeypatch):
        ref = mo.load(d, device="cpu", dtype="float32")
        assert not ref.model.experts.store.mapped
        ref_logits, ref_tokens = ref.logits(PROMPT), ref.generate(PROMPT, max_new_tokens=10).token_ids
    m = mo.load(d, device="cpu", dtype="float32")
    assert isinstance(m.model.experts, PackedResidentExperts) and m.model.experts.store.mapped
    assert torch.equal(m.logits(PROMPT), ref_logits)
    assert m.generate(PROMPT, max_new_tokens=10).token_ids == ref_tokens
    with mo.load(d, device="cpu", dtype="float32", cache_per_layer=2) as off:
        assert off.expert_cache.store.mapped
        assert torch.equal(off.logits(PROMPT), ref_logits)
        r = off.generate(PROMPT, max_new_tokens=10)
        assert r.token_ids == ref_tokens and r.stats["misses"] > 0


def test_gpt_oss_fused_mxfp4_slices_are_read_in_place(tmp_path, monkeypatch):
    from test_gpt_oss_mxfp4 import EXPERTS, K, PROMPT, build

    path, _ = build(tmp_path)
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    store = HostExpertStore.from_checkpoint(ckpt, torch.float32, fmt=ckpt.expert_format())
    fused = {"w13.blocks": "gate_up_proj_blocks", "w13.scales": "gate_up_proj_scales", "b13": "gate_up_proj_bias",
             "w2.blocks": "down_proj_blocks", "w2.scales": "down_proj_scales", "b2": "down_proj_bias"}
    file = load_file(path / "model.safetensors")
    base = ckpt.file_map(path / "model.safetensors").data_ptr()
    assert store.mapped and store.buffer is None and store.host_bytes == ckpt.expert_file_bytes()
    for layer in range(cfg.num_moe_layers):
        for e in range(cfg.num_local_experts):
            row = store.row(layer, e)
            for sec, part in zip(store.format.layout(cfg.hidden_size, cfg.intermediate_size), row.parts):
                name = EXPERTS.format(layer) + fused[sec.name]
                assert part.data_ptr() == base + ckpt.tensors[name].offset + e * sec.nbytes  # slice e of [E, ...]
                assert torch.equal(part, file[name][e].contiguous().view(-1).view(torch.uint8))
    with copying(monkeypatch), mo.load(path, device="cpu", dtype="float32", cache_per_layer=K + 1) as c:
        assert not c.expert_cache.store.mapped
        ref_logits, ref_tokens = c.logits(PROMPT), c.generate(PROMPT, max_new_tokens=8).token_ids
    with mo.load(path, device="cpu", dtype="float32", cache_per_layer=K + 1) as m:
        assert m.expert_cache.store.mapped
        assert torch.equal(m.logits(PROMPT), ref_logits)
        assert m.generate(PROMPT, max_new_tokens=8).token_ids == ref_tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA run's choice: needs a GPU")
def test_on_cuda_the_pinned_copy_stays_unless_ram_is_short_then_the_map(float_folder, monkeypatch):
    from moe_offload.options import OffloadConfig

    cfg = OffloadConfig.make(device="cuda", dtype="float32", cache_per_layer=2, cpu_experts="off")
    with mo.load(float_folder, config=cfg) as c:  # RAM enough: async copies from pinned memory
        store = c.expert_cache.store
        assert not store.mapped and store.pinned
        ref_logits, ref_tokens = c.logits(PROMPT).cpu(), c.generate(PROMPT, max_new_tokens=10).token_ids
    monkeypatch.setattr(store_mod, "available_host_bytes", lambda: store_mod.HOST_RAM_MARGIN + store.host_bytes // 4)
    with pytest.warns(UserWarning, match="exceed the RAM available"):
        m = mo.load(float_folder, config=cfg)
    with m:  # the copy would not fit: the CUDA link copies the map's pieces (pageable) into the slots
        assert m.expert_cache.store.mapped and not m.expert_cache.store.pinned
        assert torch.allclose(m.logits(PROMPT).cpu(), ref_logits, atol=1e-5, rtol=1e-5)
        r = m.generate(PROMPT, max_new_tokens=10)
        assert r.token_ids == ref_tokens and r.stats["misses"] > 0


# --- page cache, store_info / info --json ----------------------------------------------------------------
@linux
def test_a_mapped_safetensors_stores_loads_count_page_cache_misses(float_folder):
    with mo.load(float_folder, device="cpu", dtype="float32", cache_per_layer=2) as m:
        m.generate(PROMPT, max_new_tokens=4)
        st = m.cache_stats()
        assert m.expert_cache.page_probe is not None
        assert st["page_cache"] == "mincore" and st["misses"] > 0
        assert st["page_cache_checked_bytes"] == st["bytes_h2d"] > 0  # every load from the map was asked about
        assert 0 <= st["page_cache_miss_bytes"] <= st["page_cache_checked_bytes"]


def test_store_info_equals_info_json_and_says_mapped(gptq_folder, float_folder, capsys):
    from moe_offload.cli import main

    d, _ = gptq_folder
    assert main(["info", "--model", str(d), "--json"]) == 0
    want = json.loads(capsys.readouterr().out)["expert_store"]
    assert want["mapped"] is True and want["format"] == "gptq:4,g32,sym,act"
    for offload in (True, False):  # the cache's store, or the resident packed experts' (the same map)
        with mo.load(d, device="cpu", dtype="float32", offload=offload) as m:
            assert m.store_info() == want
    assert main(["info", "--model", str(d)]) == 0
    assert "read in place from the file's memory map" in capsys.readouterr().out
    with mo.load(float_folder, device="cpu", dtype="float32", cache_per_layer=2) as m:
        got = m.store_info()
        assert got["mapped"] is True and got["format"] == "fp32"
        assert got == expert_store_info(Checkpoint(float_folder), m.expert_cache.store)
