"""Projections of published models in their shipped formats: the Qwen3-235B-A22B asset, the formats' true
bytes (Q4_K_M-like, FP8, MXFP4), the top-k scaling of a smaller trace, `info` / `simulate` on hub
configs, the committed projection table, and load()'s host-RAM refusal."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_offload
from moe_offload import MoeOffloadError
from moe_offload.analysis.bench import model_config, simulate
from moe_offload.analysis.projections import dense_bytes_per_param, memory_needs, shipped_formats
from moe_offload.analysis.sim import (StepCosts, expert_layer_bytes, get_cpu, get_hardware, q4_k_m_layers,
                                      sim_format)
from moe_offload.analysis.trace import RoutingTrace
from moe_offload.info import shipped_expert_bytes

ROOT = Path(__file__).resolve().parents[1]


def test_qwen3_235b_asset_matches_the_published_shape_and_counts():
    cfg = model_config("qwen3-235b-a22b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok) == (4096, 94, 128, 8)
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (1536, 64, 4, 128)
    assert cfg.vocab_size == 151936 and not cfg.tie_word_embeddings
    # Qwen's model card: 235B total, 22B activated
    assert cfg.total_params / 1e9 == pytest.approx(235, rel=0.005)
    assert cfg.active_params / 1e9 == pytest.approx(22, rel=0.015)


def test_q4_k_m_follows_llama_cpp_layer_rule_and_block_fallbacks():
    ds = model_config("deepseek-v3")  # 61 blocks, 3 dense: MoE layer j is block j + 3; n/8 = 7, 7n/8 = 53
    layers = q4_k_m_layers(ds)
    assert len(layers) == 58 and all(t[:2] == ("Q4_K", "Q4_K") for t in layers)
    down = {j + 3: t[2] for j, t in enumerate(layers)}
    assert down[3] == down[6] == "Q6_K" and down[7] == "Q4_K"  # i < n/8
    assert down[9] == "Q6_K" and down[10] == "Q4_K" and down[12] == "Q6_K"  # (i - 7) % 3 == 2
    assert down[53] == down[60] == "Q6_K" and down[52] == "Q4_K"  # i >= 7n/8
    for name in ("deepseek-v3", "qwen3-235b-a22b", "qwen3-30b-a3b", "mixtral-8x7b"):
        bpw = memory_needs(model_config(name), "q4_k_m")["bits_per_weight"]
        assert 4.5 < bpw < 4.9, (name, bpw)  # between all-Q4_K (4.5) and the mix's Q6_K share
    # GLM-4.5-Air's experts are 1408 wide: down projections fall back (Q4_K -> Q5_0, Q6_K -> Q8_0)
    glm = q4_k_m_layers(model_config("glm-4.5-air"))
    assert {t[2] for t in glm} == {"Q5_0", "Q8_0"} and {t[0] for t in glm} == {"Q4_K"}


def test_shipped_formats_have_their_true_bytes():
    ds, oss = model_config("deepseek-v3"), model_config("gpt-oss-120b")
    # two independent formulas: the format objects (formats/fp8.py, mxfp4.py) and info.shipped_expert_bytes
    assert expert_layer_bytes(ds, "fp8") == [shipped_expert_bytes(ds)] * 58
    assert expert_layer_bytes(oss, "mxfp4") == [shipped_expert_bytes(oss)] * 36
    assert memory_needs(oss, "mxfp4")["bits_per_weight"] == pytest.approx(4.25, abs=0.01)  # + bf16 biases
    q = expert_layer_bytes(ds, "q4_k_m")
    assert min(q) == 3 * 2048 * 7168 // 256 * 144 and max(q) == 2 * 2048 * 7168 // 256 * 144 + 7168 * 2048 // 256 * 210
    costs = StepCosts.for_model(ds, get_hardware("rtx4090-pcie4"), "q4_k_m")
    assert costs.slot_bytes == max(q) and costs.expert_bytes == round(sum(q) / len(q))
    assert sim_format(ds, "fp8").name == "fp8:128x128" and dense_bytes_per_param("q4_k_m") == 2.0  # dense in bf16 here
    assert shipped_formats(oss) == ["mxfp4"] and shipped_formats(ds)[0] == "fp8"
    with pytest.raises(MoeOffloadError, match="is not one of"):
        StepCosts.for_model(ds, get_hardware("rtx4090-pcie4"), "q5_k_s")


def _trace(T=96, L=4, E=8, k=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([[rng.choice(E, size=k, replace=False) for _ in range(L)] for _ in range(T)]).astype(np.int16)
    probs = rng.random((T, L, E)).astype(np.float32)
    return RoutingTrace(token_ids=np.arange(T), routed_ids=ids, routed_weights=np.full((T, L, k), 0.5, np.float32),
                        router_probs=probs, preds={"next-gate": rng.random((T, L, 1, E)).astype(np.float32)},
                        embed_preds=None, window=T, meta={})


def test_a_top8_model_runs_all_its_experts_from_a_top2_trace():
    ds = model_config("deepseek-v3")
    # an 80 GB card: this runtime keeps the dense weights in bf16 (50 GB with the slots), more than a 4090 holds
    p = simulate(_trace(), ds, get_hardware("h100-pcie5"), "q4_k_m", None, "next-gate",
                 cpu=get_cpu("server-xeon-ddr5-4800-8ch"), deep_oracle_bound=False,
                 dense_bytes_per_param=dense_bytes_per_param("q4_k_m"))
    s = p.settings
    assert s["experts_per_traced_expert"] == 4
    # nearly every one of the 8 x 58 routed experts a token uses is computed on the CPU (2 % resident);
    # per token they are scaled over all 61 blocks, as every per-token figure is
    assert 0.9 * 8 * 58 <= s["cpu_experts_per_token"] <= 8 * 61
    assert s["dense_bytes"] == int(ds.dense_params * 2)
    # ... and the time they take: the host reads 8 x 58 experts' bytes per token (97% of them not resident)
    cpu = get_cpu("server-xeon-ddr5-4800-8ch")
    read = 8 * 58 * s["expert_bytes"] / (cpu.memory_gbps * 1e9 * cpu.efficiency["q4_k_m"])
    assert p.per_token["total"] >= 0.9 * read and 1 < p.tokens_per_second < 30


def test_simulate_and_info_take_a_hub_config(tmp_path, capsys):
    from moe_offload.analysis.trace import save_trace
    from moe_offload.cli import main

    src = ROOT / "moe_offload" / "assets" / "qwen3-235b-a22b.config.json"
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(src.read_text())  # what a user pastes from the hub
    path = save_trace(tmp_path / "t.npz", _trace(), {"note": "test"})
    assert main(["simulate", "--trace", str(path), "--hardware", "rtx5090-pcie5", "--model-config", str(cfg_file),
                 "--expert-dtype", "fp8", "--cpu", "desktop-ddr5-2ch", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["expert_bytes"] == expert_layer_bytes(model_config(str(cfg_file)), "fp8")[0]
    assert out["settings"]["hardware"] == "rtx5090-pcie5" and out["tokens_per_second"] > 0
    assert main(["info", "--config", str(cfg_file)]) == 0
    text = capsys.readouterr().out
    need = memory_needs(model_config(str(cfg_file)), "q4_k_m")
    assert "needs      q4_k_m" in text and f"host RAM {need['host_ram_bytes'] / 1e9:.1f} GB" in text


def test_committed_projection_table_is_labelled_and_cites_its_figures():
    res = json.loads((ROOT / "benchmarks" / "results" / "projections.json").read_text())
    assert "not a measurement" in res["kind"]
    rows = res["results"]
    models = {r["model"] for r in rows}
    assert models == {"deepseek-v3", "gpt-oss-120b", "glm-4.5-air", "qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x7b"}
    assert {r["gpu"] for r in rows} >= {"rtx3090-pcie4", "rtx4090-pcie4", "rtx5090-pcie5", "h100-pcie5"}
    for r in rows:
        assert r["ram_needed_bytes"] > 0 and r["vram_needed_bytes"] > 0
        assert all(p["source"] and p["tokens_per_second"] > 0 for p in r["public"])
    kt = next(r for r in rows if r["host"] == "server-xeon-ddr5-4800-8ch")
    assert [p["tokens_per_second"] for p in kt["public"]] == [8.73, 11.26, 13.69, 4.51]
    assert all("ktransformers" in p["source"] for p in kt["public"])
    # ktransformers keeps DeepSeek-V3's dense weights quantized on its 24 GB card; this runtime dequantizes
    # them to bf16 at load, which a 24 GB card cannot hold: the row says so rather than projecting a speed
    assert kt["projected"]["tokens_per_second"] is None and "slots" in kt["projected"]["why"]


# --- load(): host RAM refused before anything is allocated ---------------------------------------------
def test_load_refuses_copied_experts_beyond_ram_with_the_numbers(monkeypatch):
    from moe_offload.offload import plan, store

    monkeypatch.setattr(plan, "available_host_bytes", lambda: 1 << 30)  # 1 GiB: only the margin
    made = []
    monkeypatch.setattr(store.HostExpertStore, "__init__", lambda *a, **k: made.append(1) or None)
    with pytest.raises(MoeOffloadError) as err:
        moe_offload.load(device="cpu", offload=True)
    msg = str(err.value)
    assert "not enough host RAM" in msg and "GB is available" in msg and "quantized expert_dtype" in msg
    assert "GGUF" in msg and "\n" not in msg and not made  # refused before the store was built
    monkeypatch.setattr(plan, "available_host_bytes", lambda: 1 << 40)
    cfg, fmt = model_config("mixtral-8x7b"), sim_format(model_config("mixtral-8x7b"), "bf16")
    plan.check_load_ram(cfg, fmt, torch.bfloat16, torch.device("cuda"), True, mapped=False)  # 90 GB < 1 TiB


def test_ram_check_counts_what_is_copied_not_what_is_mapped(monkeypatch):
    from moe_offload.offload import plan

    cfg = model_config("deepseek-v3")
    fmt = sim_format(cfg, "q4_k_m")
    monkeypatch.setattr(plan, "available_host_bytes", lambda: 64 * 10**9)
    plan.check_load_ram(cfg, fmt, torch.bfloat16, torch.device("cuda"), True, mapped=True)  # a GGUF: read in place
    with pytest.raises(MoeOffloadError, match=r"needs 394\.0 GB .* 64\.0 GB is available"):
        plan.check_load_ram(cfg, fmt, torch.bfloat16, torch.device("cuda"), True, mapped=False)
    # experts resident on the GPU (no offload, not packed) are not host bytes; on cpu the dense weights are
    bf16 = sim_format(cfg, "bf16")
    plan.check_load_ram(cfg, bf16, torch.bfloat16, torch.device("cuda"), False, mapped=False)
    with pytest.raises(MoeOffloadError, match=r"int4 experts take"):
        plan.check_load_ram(cfg, bf16, torch.bfloat16, torch.device("cpu"), False, mapped=False)
