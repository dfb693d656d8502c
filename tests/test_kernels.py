"""Triton fused_moe (under TRITON_INTERPRET=1 on CPU) against the per-expert torch loop."""

import ast
import importlib.metadata
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_offload.kernels import (TileConfig, fused_moe, fused_moe_grouped_mm, fused_moe_reference,
                                 grouped_mm_supported, moe_align_block_size, tile_config)
from moe_offload.kernels.configs import nearest

# Max error relative to the output's max magnitude. The kernel accumulates in float32 in another order
# than the loop, and rounds the SiLU*up intermediate to the dtype once: a few units of roundoff
# (fp32 2^-24, fp16 2^-11, bf16 2^-8) on values that sum ~H terms.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_case(t, e, k, h, i, dtype, extra_slots=3, seed=0, ids=None):
    g = torch.Generator().manual_seed(seed)
    s = e + extra_slots
    hidden = torch.randn(t, h, generator=g).to(dtype)
    if ids is None:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])  # [T, k] distinct
    weights = torch.softmax(torch.randn(t, k, generator=g), -1)
    # Unused slots hold NaN garbage, which must never reach the output.
    w13 = torch.full((s, 2 * i, h), float("nan"), dtype=dtype)
    w2 = torch.full((s, h, i), float("nan"), dtype=dtype)
    slot_of = torch.randperm(s, generator=g)[:e].to(torch.int32)  # random residency
    for x in range(e):
        w13[slot_of[x]] = (torch.randn(2 * i, h, generator=g) / h ** 0.5).to(dtype)
        w2[slot_of[x]] = (torch.randn(h, i, generator=g) / i ** 0.5).to(dtype)
    return hidden, ids, weights, w13, w2, slot_of


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


CASES = list(itertools.product([1, 3, 17, 64], [8, 5], [1, 2], [torch.float32, torch.float16]))


@pytest.mark.parametrize("t,e,k,dtype", CASES)
def test_fused_moe_matches_loop_reference(t, e, k, dtype):
    h, i = 37, 23  # odd sizes: every tile edge is masked
    hidden, ids, w, w13, w2, slot_of = make_case(t, e, k, h, i, dtype, seed=t * 100 + e * 10 + k)
    ref = fused_moe_reference(hidden, ids, w, w13, w2, slot_of)
    out = torch.full_like(hidden, float("nan"))
    got = fused_moe(hidden, ids, w, w13, w2, slot_of, out=out, debug=True)
    assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any(), "output not fully written (or NaN slot garbage leaked)"
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_tokens_on_one_expert_and_idle_experts(dtype):
    t, e, k = 17, 8, 2
    ids = torch.tensor([[3, 6]] * t)  # experts 0,1,2,4,5,7 get nothing; 3 and 6 get everything
    hidden, ids, w, w13, w2, slot_of = make_case(t, e, k, 40, 32, dtype, ids=ids)
    ref = fused_moe_reference(hidden, ids, w, w13, w2, slot_of)
    got = fused_moe(hidden, ids, w, w13, w2, slot_of, debug=True)
    assert rel_err(got, ref) < TOL[dtype]
    single = torch.tensor([[5]] * t)
    hidden, single, w1, w13, w2, slot_of = make_case(t, e, 1, 40, 32, dtype, ids=single)
    assert rel_err(fused_moe(hidden, single, w1, w13, w2, slot_of), fused_moe_reference(
        hidden, single, w1, w13, w2, slot_of)) < TOL[dtype]


def test_bf16_runs_with_in_kernel_upcast_under_the_interpreter():
    # The interpreter's bf16 tl.dot is wrong (triton 3.9 on CPU), so under TRITON_INTERPRET=1 the kernel upcasts
    # its bf16 tiles to float32 before tl.dot; on a GPU bf16 goes to tl.dot directly (GPU script checks it).
    assert os.environ.get("TRITON_INTERPRET") == "1"
    hidden, ids, w, w13, w2, slot_of = make_case(17, 8, 2, 64, 48, torch.bfloat16)
    ref = fused_moe_reference(hidden, ids, w, w13, w2, slot_of)
    got = fused_moe(hidden, ids, w, w13, w2, slot_of, debug=True)
    assert got.dtype == torch.bfloat16 and rel_err(got, ref) < TOL[torch.bfloat16]


def test_non_resident_expert_is_a_caller_error_in_debug_mode():
    hidden, ids, w, w13, w2, slot_of = make_case(3, 5, 2, 32, 32, torch.float32, ids=torch.tensor([[0, 4]] * 3))
    slot_of[4] = -1
    with pytest.raises(ValueError, match=r"expert\(s\) \[4\] that have no valid slot"):
        fused_moe(hidden, ids, w, w13, w2, slot_of, debug=True)
    with pytest.raises(ValueError, match=r"w2_pool must be"):
        fused_moe(hidden, ids, w, w13, w2[:, :, :5], slot_of)


@pytest.mark.parametrize("block_m", [16, 32])
def test_alignment_groups_and_pads_by_expert(block_m):
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 4]])  # expert 3 idle
    al = moe_align_block_size(ids, 5, block_m)
    flat = ids.reshape(-1)
    n = flat.numel()
    assert al.sorted_ids.numel() % block_m == 0
    valid = al.sorted_ids[al.sorted_ids < n].long()
    assert sorted(valid.tolist()) == list(range(n))  # every assignment exactly once
    for b, ex in enumerate(al.block_expert.tolist()):
        rows = al.sorted_ids[b * block_m:(b + 1) * block_m]
        rows = rows[rows < n].long()
        if ex < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows] == ex).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_path_matches_loop(dtype):
    hidden, ids, w, w13, w2, slot_of = make_case(17, 8, 2, 64, 32, dtype)
    assert grouped_mm_supported(hidden, w13)
    ref = fused_moe_reference(hidden, ids, w, w13, w2, slot_of)
    assert rel_err(fused_moe_grouped_mm(hidden, ids, w, w13, w2, slot_of), ref) < TOL[dtype]
    odd = make_case(3, 5, 2, 37, 23, dtype)
    assert not grouped_mm_supported(odd[0], odd[3])
    with pytest.raises(ValueError, match="16-byte-aligned"):
        fused_moe_grouped_mm(*odd)


def test_tile_configs_are_data_with_nearest_m_lookup():
    table = {1: TileConfig(16, 32, 32), 16: TileConfig(16, 64, 64), 256: TileConfig(64, 128, 64)}
    assert nearest(table, 1) == table[1] and nearest(table, 9) == table[16]
    assert nearest(table, 200) == table[256] and nearest(table, 5000) == table[256]
    assert tile_config(3, torch.device("cpu")).block_m == 16
    with pytest.raises(ValueError, match="block_k=8"):
        TileConfig(16, 32, 8)


# Our kernels live in moe_offload/kernels only. A PyPI package named `kernels` exists (transformers
# installs it and imports it when found), so ours must never be what `import kernels` finds. A script file,
# not `python -c`: -c puts the cwd on sys.path, and from a source checkout's root any folder is importable.
FIND_KERNELS = """import importlib.util, json, os
import moe_offload.kernels
spec = importlib.util.find_spec("kernels")
found = None if spec is None else [spec.origin] + list(spec.submodule_search_locations or [])
print(json.dumps({"found": found, "ours": os.path.dirname(moe_offload.kernels.__file__)}))
"""


def _inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


@pytest.mark.parametrize("cwd", ["tmp", "repo"])
def test_our_kernels_folder_is_never_importable_as_kernels(tmp_path, cwd):
    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "find_kernels.py"
    script.write_text(FIND_KERNELS)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path if cwd == "tmp" else repo, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    ours = [Path(res["ours"]), repo / "moe_offload" / "kernels"]  # the installed package and the source folder
    assert not (repo / "kernels").exists()  # no top-level kernels/ folder in the checkout
    for place in res["found"] or []:  # None, or the PyPI package: anything but our folder
        assert place is None or not any(_inside(place, folder) for folder in ours), res


def _editable_mapping(dist) -> dict:
    """The package -> folder map of a setuptools editable install (empty for a wheel install)."""
    mapping = {}
    for f in dist.files or []:
        if f.name.startswith("__editable__") and f.name.endswith("_finder.py"):
            for node in ast.parse(Path(dist.locate_file(f)).read_text()).body:
                if isinstance(node, (ast.Assign, ast.AnnAssign)) and getattr(
                        node.targets[0] if isinstance(node, ast.Assign) else node.target, "id", "") == "MAPPING":
                    mapping.update(ast.literal_eval(node.value))
    return mapping


def test_installed_distribution_declares_no_top_level_kernels():
    dist = importlib.metadata.distribution("moe_offload")
    assert "kernels" not in (dist.read_text("top_level.txt") or "").split()
    files = [str(f).replace("\\", "/") for f in dist.files or []]
    assert not [f for f in files if f.startswith("kernels/")]  # a wheel's RECORD: only moe_offload/kernels/...
    mapping = _editable_mapping(dist)
    assert "kernels" not in mapping and all(name.startswith("moe_offload") for name in mapping), mapping


def test_package_build_declares_no_top_level_kernels(tmp_path):
    """What a build of this checkout would install (setup.py's package list, through egg_info): only
    moe_offload at the top level. -P: the repo root off sys.path (else setuptools' egg_info plugins,
    the PyPI kernels package's among them, would import our folder as `kernels`)."""
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-P", "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=repo,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (info,) = tmp_path.glob("*.egg-info")
    assert (info / "top_level.txt").read_text().split() == ["moe_offload"]
