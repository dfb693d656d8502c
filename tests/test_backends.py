"""Every MoE backend runs the whole model to the same result (triton via the interpreter on CPU)."""

import pytest
import torch

import moe_offload
from helpers import write_model
from moe_offload import MoeOffloadError
from moe_offload.options import OffloadConfig

REL_TOL_FP32 = 1e-5  # float32 accumulation-order differences only


@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_backend_matches_loop_end_to_end(tmp_path, backend):
    path = write_model(tmp_path)
    ref = moe_offload.load(path, device="cpu", config=OffloadConfig.make(moe_backend="loop"))
    other = moe_offload.load(path, device="cpu", config=OffloadConfig.make(moe_backend=backend))
    assert other.runtime.moe_backend == backend
    ids = [1, 7, 3, 9, 11, 4, 2, 8]
    a, b = ref.logits(ids), other.logits(ids)
    assert ((a - b).abs().max() / a.abs().max()).item() < REL_TOL_FP32
    assert ref.generate(ids, max_new_tokens=8).token_ids == other.generate(ids, max_new_tokens=8).token_ids


def test_auto_backend_and_bad_choices(tmp_path, monkeypatch):
    path = write_model(tmp_path)
    assert moe_offload.load(path, device="cpu").runtime.moe_backend == "loop"
    with pytest.raises(MoeOffloadError, match=r"tuning.moe_backend must be one of \['auto', 'triton', 'grouped_mm', 'loop'\], got 'cuda_graph'"):
        moe_offload.load(path, device="cpu", config=OffloadConfig.make(moe_backend="cuda_graph"))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(MoeOffloadError, match="set TRITON_INTERPRET=1"):
        moe_offload.load(path, device="cpu", config=OffloadConfig.make(moe_backend="triton"))


@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_offloaded_kernel_backends_with_grouped_prefill(tmp_path, backend):
    # 2 slots < 4 experts per layer: prefill runs each layer's experts in groups through the kernels.
    path = write_model(tmp_path)
    ref = moe_offload.load(path, device="cpu", offload=False, config=OffloadConfig.make(moe_backend="loop"))
    m = moe_offload.load(path, device="cpu", config=OffloadConfig.make(cache_experts=2, moe_backend=backend))
    ids = [1, 7, 3, 9, 11, 4, 2, 8, 5, 13, 6, 21]
    a, b = ref.logits(ids), m.logits(ids)
    assert ((a - b).abs().max() / a.abs().max()).item() < REL_TOL_FP32
    assert m.cache_stats()["misses"] == 8
    assert ref.generate(ids, max_new_tokens=6).token_ids == m.generate(ids, max_new_tokens=6).token_ids
