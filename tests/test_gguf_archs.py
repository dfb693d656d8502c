"""GGUF files of GLM-4.5 ('glm4moe'), DeepSeek-V3 / Kimi-K2 ('deepseek2') and GPT-OSS ('gpt-oss', MXFP4
experts with biases) load and run exactly.

Oracle: the same file's tensors dequantized by gguf.quants and written back under the Hugging Face names
(this file's own tables, read from llama.cpp's converter) into a safetensors folder, which transformers'
own class and our runtime each load. The GGUF run (experts kept packed, float32 compute) matches both:
logits within 1e-4 relative, greedy tokens equal; offloaded equals resident.

Two sources of files: a writer here (GGUFWriter, the converter's names and metadata keys), always run;
and llama.cpp's own convert_hf_to_gguf.py on a tiny transformers model, opt-in: it needs the llama.cpp
source tree named by the environment variable LLAMA_CPP_SRC.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFWriter  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

import moe_offload as mo  # noqa: E402
from moe_offload.errors import CheckpointError, ConfigError  # noqa: E402
from moe_offload.gguf_checkpoint import GgufCheckpoint  # noqa: E402
from helpers import decode_logits, rel_err  # noqa: E402

TOKENIZER = Path(__file__).resolve().parents[1] / "moe_offload" / "assets" / "tiny-mixtral"
REL_TOL = 1e-4
L, K_DENSE, E, K = 3, 1, 8, 3
# rows of 32 or 64 weights, so that Q8_0 (blocks of 32) holds every matrix, experts included
GLM = dict(vocab_size=4096, hidden_size=64, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, n_routed_experts=E, num_experts_per_tok=K,
           n_shared_experts=1, first_k_dense_replace=K_DENSE, n_group=4, topk_group=2, routed_scaling_factor=2.5,
           attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5, norm_topk_prob=True,
           max_position_embeddings=128, initializer_range=0.1, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
           tie_word_embeddings=False, num_nextn_predict_layers=1)
PROMPT = [1, 5, 9, 17, 33, 700, 2048, 4000, 12, 3]
IDS = torch.randint(3, 4096, (16,), generator=torch.Generator().manual_seed(1)).tolist()


def hf_to_gguf(name: str) -> tuple[str, int | None]:
    """A Hugging Face GLM-4.5 tensor name -> (llama.cpp's name, expert index in its fused tensor or None)."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name], None
    parts = name.split(".")
    layer, rest = parts[2], ".".join(parts[3:])
    if rest.startswith("mlp.experts."):  # mlp.experts.{e}.{gate,up,down}_proj.weight
        e, proj = int(parts[5]), parts[6].removesuffix("_proj")
        return f"blk.{layer}.ffn_{proj}_exps.weight", e
    fixed = {"input_layernorm.weight": "attn_norm.weight",
             "post_attention_layernorm.weight": "post_attention_norm.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
             "mlp.gate.e_score_correction_bias": "exp_probs_b.bias"}
    for x in "qkv":
        fixed[f"self_attn.{x}_proj.weight"] = f"attn_{x}.weight"
        fixed[f"self_attn.{x}_proj.bias"] = f"attn_{x}.bias"
    for x in "qk":
        fixed[f"self_attn.{x}_norm.weight"] = f"attn_{x}_norm.weight"
    for proj in ("gate", "up", "down"):
        fixed[f"mlp.{proj}_proj.weight"] = f"ffn_{proj}.weight"  # a dense leading layer
        fixed[f"mlp.shared_experts.{proj}_proj.weight"] = f"ffn_{proj}_shexp.weight"
    return f"blk.{layer}.{fixed[rest]}", None


def build_hf(path: Path, **overrides) -> Path:
    """A tiny random Glm4MoeForCausalLM saved to `path` (hub names, one tensor per expert) with the bundled
    byte-level BPE tokenizer; norms, biases and routers perturbed so that a misplaced tensor shows."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Glm4MoeConfig(**{**GLM, **overrides})
    model = transformers.Glm4MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    for f in TOKENIZER.glob("tokenizer*.json"):
        shutil.copy(f, path)
    return path


def hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float32) for k, v in load_file(str(folder / "model.safetensors")).items()}


def vocab(size: int):
    """A SentencePiece-style vocabulary: <unk> <s> </s>, the 256 byte tokens, padding pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), size)]
    types = [2, 3, 3] + [6] * 256 + [5] * (size - 259)
    return tokens, [0.0] * size, types


def add_keys(w: GGUFWriter, arch: str, keys: dict, skip_keys=()) -> None:
    """Metadata `arch.key` = value, typed as the converter writes them (bool, float32, string, uint32)."""
    for key, v in keys.items():
        if key not in skip_keys:
            add = (w.add_bool if isinstance(v, bool) else w.add_float32 if isinstance(v, float) else
                   w.add_string if isinstance(v, str) else w.add_uint32)
            add(f"{arch}.{key}", v)


def add_vocab(w: GGUFWriter, size: int) -> None:
    """The bundled tokenizer's vocabulary, with BOS 1 and EOS 2."""
    tokens, scores, types = vocab(size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def fused_experts(out: dict[str, np.ndarray], experts: dict[str, dict[int, np.ndarray]], n: int) -> None:
    """Each per-expert tensor stacked into the converter's fused [E, ...] tensor, into `out`."""
    for gname, per in experts.items():
        out[gname] = np.stack([per[e] for e in range(n)])


def add_nextn(out: dict[str, np.ndarray], layer: int, h: int) -> None:
    """The NextN layer's own tensors (llama.cpp counts the layer in block_count; the reader ignores it)."""
    out[f"blk.{layer}.nextn.eh_proj.weight"] = np.zeros((h, 2 * h), np.float32)
    out[f"blk.{layer}.nextn.enorm.weight"] = np.ones(h, np.float32)
    out[f"blk.{layer}.attn_norm.weight"] = np.ones(h, np.float32)


def write_tensors(w: GGUFWriter, out: dict[str, np.ndarray], skip_tensors=(), qtype=None) -> None:
    """The tensors into the file, then close it: `qtype(name, arr)` picks a block type (default: Q8_0 for a
    matrix whose rows are whole blocks), None keeps the array as it is."""
    for gname, arr in out.items():
        if gname in skip_tensors:
            continue
        arr = np.ascontiguousarray(arr)
        t = qtype(gname, arr) if qtype else (T.Q8_0 if arr.ndim >= 2 and arr.shape[-1] % 32 == 0 else None)
        if t is None:
            w.add_tensor(gname, arr)
        else:
            w.add_tensor(gname, quantize(arr, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def save_like(folder: Path, out: Path, sd: dict[str, torch.Tensor]) -> Path:
    """`sd` as out/model.safetensors beside `folder`'s json files (config, tokenizer)."""
    from safetensors.torch import save_file

    save_file(sd, str(out / "model.safetensors"))
    for f in folder.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, out)
    return out


def write_glm_gguf(path: Path, folder: Path, skip_keys=(), skip_tensors=(), kv=None) -> Path:
    """The model in `folder` as a glm4moe GGUF the way llama.cpp's converter lays it out: metadata keys,
    tensor names, experts fused per layer in Q8_0, other matrices Q8_0, vectors F32, block_count counting
    the NextN layer (whose tensors follow, to be ignored)."""
    c = json.loads((folder / "config.json").read_text())
    w = GGUFWriter(str(path), "glm4moe")
    keys = {"block_count": L + 1, "context_length": 128, "embedding_length": c["hidden_size"],
            "feed_forward_length": c["intermediate_size"], "attention.head_count": c["num_attention_heads"],
            "attention.head_count_kv": c["num_key_value_heads"], "rope.freq_base": 10000.0,
            "attention.layer_norm_rms_epsilon": 1e-6, "expert_count": E, "expert_used_count": K,
            "expert_group_count": c["n_group"], "expert_group_used_count": c["topk_group"],
            "attention.key_length": c["head_dim"], "attention.value_length": c["head_dim"],
            "rope.dimension_count": c["head_dim"] // 2, "expert_feed_forward_length": c["moe_intermediate_size"],
            "expert_shared_count": c["n_shared_experts"], "leading_dense_block_count": c["first_k_dense_replace"],
            "expert_gating_func": 2, "expert_weights_scale": float(c["routed_scaling_factor"]),
            "expert_weights_norm": True, "nextn_predict_layers": 1, **(kv or {})}
    add_keys(w, "glm4moe", keys, skip_keys)
    add_vocab(w, c["vocab_size"])
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, arr in hf_tensors(folder).items():
        gname, e = hf_to_gguf(name)
        if e is None:
            out[gname] = arr
        else:
            experts.setdefault(gname, {})[e] = arr
    fused_experts(out, experts, E)
    add_nextn(out, L, c["hidden_size"])
    write_tensors(w, out, skip_tensors)
    return path


def dequantized_folder(gguf_path: Path, folder: Path, out: Path) -> Path:
    """`folder`'s model with every tensor replaced by its GGUF counterpart as gguf.quants dequantizes it."""
    out.mkdir()
    r = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
    sd = {}
    for name, arr in hf_tensors(folder).items():
        gname, e = hf_to_gguf(name)
        t = r[gname]
        w = dequantize(t.data, t.tensor_type)
        sd[name] = torch.from_numpy(np.ascontiguousarray(w if e is None else w[e]).reshape(arr.shape).copy())
    return save_like(folder, out, sd)


def assert_exact(gguf_path: Path, deq: Path, hf_class: str = "Glm4MoeForCausalLM") -> None:
    """The GGUF run equals transformers (its class `hf_class`) and our own run on the dequantized folder."""
    import transformers

    ours = mo.load(gguf_path, device="cpu", dtype="float32")
    assert ours.config.expert_format == "gguf:Q8_0"  # experts kept packed
    hf = getattr(transformers, hf_class).from_pretrained(deq, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        want = hf(torch.tensor([IDS])).logits[0]
    got = ours.logits(IDS)
    assert rel_err(got, want) < REL_TOL
    assert rel_err(decode_logits(ours, IDS, 5), want) < REL_TOL
    folder_run = mo.load(deq, device="cpu", dtype="float32")
    assert rel_err(got, folder_run.logits(IDS)) < REL_TOL
    tokens = ours.generate(PROMPT, max_new_tokens=12).token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=[2], pad_token_id=0)
    assert tokens == ref[0, len(PROMPT):].tolist()
    assert tokens == folder_run.generate(PROMPT, max_new_tokens=12).token_ids
    with mo.load(gguf_path, device="cpu", dtype="float32", cache_per_layer=K) as off:  # experts from the file map
        assert torch.equal(off.logits(IDS), got)


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """(HF folder, written GGUF, its dequantized folder)."""
    root = tmp_path_factory.mktemp("glm_gguf")
    folder = build_hf(root / "hf")
    f = write_glm_gguf(root / "glm.gguf", folder)
    return folder, f, dequantized_folder(f, folder, root / "deq")


def test_glm4moe_config_from_metadata(glm):
    _, f, _ = glm
    cfg = GgufCheckpoint(f).config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_moe_layers, cfg.mtp_layers) == ("glm4_moe", L, L - K_DENSE, 1)
    assert (cfg.first_k_dense_replace, cfg.dense_intermediate_size, cfg.intermediate_size) == (1, 64, 32)
    assert (cfg.scoring, cfg.correction_bias, cfg.n_group, cfg.topk_group) == ("sigmoid", True, 4, 2)
    assert (cfg.partial_rotary_factor, cfg.qk_norm, cfg.qkv_bias, cfg.norm_topk_prob) == (0.5, "per_head", True, True)
    assert (cfg.shared_expert_intermediate_size, cfg.routed_scaling_factor) == (32, 2.5)


def test_glm4moe_written_gguf_is_exact(glm):
    _, f, deq = glm
    assert_exact(f, deq)


@pytest.mark.parametrize("key", ["expert_feed_forward_length", "expert_shared_count", "block_count"])
def test_glm4moe_missing_key_is_one_line(tmp_path, glm, key):
    folder, _, _ = glm
    f = write_glm_gguf(tmp_path / "bad.gguf", folder, skip_keys=(key,))
    with pytest.raises(ConfigError) as e:
        mo.load(f, device="cpu", dtype="float32")
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and f"glm4moe.{key}" in msg


@pytest.mark.parametrize("tensor", ["blk.1.exp_probs_b.bias", "blk.2.post_attention_norm.weight",
                                    "blk.0.ffn_up.weight", "blk.1.ffn_down_shexp.weight", "blk.2.ffn_up_exps.weight"])
def test_glm4moe_missing_tensor_is_one_line(tmp_path, glm, tensor):
    folder, _, _ = glm
    f = write_glm_gguf(tmp_path / "bad.gguf", folder, skip_tensors=(tensor,))
    with pytest.raises(CheckpointError) as e:
        mo.load(f, device="cpu", dtype="float32")
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and tensor in msg


def test_glm4moe_softmax_gating_is_refused(tmp_path, glm):
    folder, _, _ = glm
    f = write_glm_gguf(tmp_path / "bad.gguf", folder, kv={"expert_gating_func": 1})
    with pytest.raises(ConfigError, match="expert_gating_func is 1"):
        mo.load(f, device="cpu", dtype="float32")


# --- llama.cpp's own converter (opt-in) ---------------------------------------------------------------------
CONVERT = textwrap.dedent("""
    import os, sys
    src = os.environ["LLAMA_CPP_SRC"]
    sys.path[:0] = [src, os.path.join(src, "gguf-py")]
    sys.argv = ["convert_hf_to_gguf.py", sys.argv[1], "--outtype", sys.argv[2], "--outfile", sys.argv[3]]
    import convert_hf_to_gguf
    from conversion import base
    known = base.TextModel.get_vocab_base_pre
    def pre(self, tokenizer):  # the bundled tokenizer is GPT-2-style byte-level BPE, unknown by its hash
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"
    base.TextModel.get_vocab_base_pre = pre
    # GLM's vocabulary setter looks up GLM's own special tokens, which the bundled tokenizer lacks
    base.TextModel._set_vocab_glm = base.TextModel._set_vocab_gpt2
    convert_hf_to_gguf.main()
""")


def test_glm4moe_llama_cpp_converted_gguf_is_exact(tmp_path):
    src = os.environ.get("LLAMA_CPP_SRC")
    if not src or not (Path(src) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("opt-in: set LLAMA_CPP_SRC to a llama.cpp source tree (with convert_hf_to_gguf.py) to convert "
                    "a tiny GLM-4.5 with llama.cpp's own converter")
    folder = build_hf(tmp_path / "hf")
    script = tmp_path / "convert.py"
    script.write_text(CONVERT)
    f = tmp_path / "glm-q8_0.gguf"
    done = subprocess.run([sys.executable, str(script), str(folder), "q8_0", str(f)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = GGUFReader(str(f))
    assert r.fields["general.architecture"].contents() == "glm4moe"
    assert r.fields["glm4moe.nextn_predict_layers"].contents() == 1  # block_count counts it
    assert {t.tensor_type.name for t in r.tensors if "_exps" in t.name} == {"Q8_0"}
    assert_exact(f, dequantized_folder(f, folder, tmp_path / "deq"))
    from tokenizers import Tokenizer

    text = "In the beginning God created the heaven and the earth."
    want = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert GgufCheckpoint(f).tokenizer().encode(text, add_special_tokens=False).ids == want


# --- DeepSeek-V3 / R1 / Kimi-K2: llama.cpp's architecture 'deepseek2' ---------------------------------------
# Latent attention (q-LoRA 32, latent 32, rope dims 16; per head 64 + 16 key dims, 64 value dims, so that the
# latent MQA's key_length / value_length differ from the _mla ones), yarn RoPE; 1 dense + 2 MoE layers of 8
# experts, top-2.
DS_E, DS_K = 8, 2
DS_YARN = dict(type="yarn", rope_type="yarn", factor=4.0, original_max_position_embeddings=32, mscale=1.0,
               mscale_all_dim=1.0, beta_fast=32.0, beta_slow=1.0)
DS = dict(vocab_size=4096, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=L,
          num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=DS_E,
          num_experts_per_tok=DS_K, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=64,
          v_head_dim=64, first_k_dense_replace=K_DENSE, n_group=4, topk_group=2, routed_scaling_factor=2.5,
          norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",  # as the hub's config.json
          rope_scaling=DS_YARN, max_position_embeddings=128, initializer_range=0.1,
          bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6, tie_word_embeddings=False)
DS_ATTN = {"q_a_proj": "attn_q_a", "q_a_layernorm": "attn_q_a_norm", "q_b_proj": "attn_q_b", "q_proj": "attn_q",
           "kv_a_proj_with_mqa": "attn_kv_a_mqa", "kv_a_layernorm": "attn_kv_a_norm", "o_proj": "attn_output"}


def ds_hf_to_gguf(name: str) -> tuple[str, int | None]:
    """A Hugging Face DeepSeek-V3 tensor name -> (llama.cpp's name, expert index or None); kv_b_proj maps to
    'attn_kv_b', which the converter writes split (ds_split_kv_b)."""
    parts = name.split(".")
    if name.startswith("model.layers.") and parts[3] == "self_attn":
        proj = parts[4]
        return f"blk.{parts[2]}.{'attn_kv_b' if proj == 'kv_b_proj' else DS_ATTN[proj]}.weight", None
    if name.endswith("post_attention_layernorm.weight"):
        return f"blk.{parts[2]}.ffn_norm.weight", None
    return hf_to_gguf(name)


def ds_split_kv_b(kv_b: np.ndarray, heads: int, dn: int, dv: int) -> tuple[np.ndarray, np.ndarray]:
    """The converter's split of kv_b_proj [nh (dn + dv), r]: attn_k_b [nh, r, dn] (each head's key part
    transposed), attn_v_b [nh, dv, r]."""
    kv = kv_b.reshape(heads, dn + dv, -1)
    return np.ascontiguousarray(kv[:, :dn].transpose(0, 2, 1)), np.ascontiguousarray(kv[:, dn:])


def build_ds_hf(path: Path, **overrides) -> Path:
    """A tiny random DeepseekV3ForCausalLM saved to `path` with the bundled tokenizer; norms, correction bias
    and routers perturbed so that a misplaced tensor shows."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(**{**DS, **overrides})
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("e_score_correction_bias"):
                p.normal_(0.0, 0.3)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    for f in TOKENIZER.glob("tokenizer*.json"):
        shutil.copy(f, path)
    return path


def write_ds_gguf(path: Path, folder: Path, skip_keys=(), skip_tensors=(), kv=None, split_kv_b=True) -> Path:
    """The model in `folder` as a deepseek2 GGUF the way llama.cpp's converter lays it out: its metadata keys
    (head_count_kv 1, key_length / value_length of the latent MQA, the _mla lengths per head, yarn with
    yarn_log_multiplier = 0.1 * mscale_all_dim), kv_b_proj split into attn_k_b / attn_v_b, experts fused per
    layer in Q8_0, other matrices Q8_0, vectors F32; plus one NextN layer counted in block_count, to be
    ignored. split_kv_b=False: kv_b_proj whole as attn_kv_b and per-head key_length / value_length (no _mla
    keys), as older converters wrote them."""
    c = json.loads((folder / "config.json").read_text())
    y = c.get("rope_parameters") or c["rope_scaling"]
    r, dr, dn, dv = c["kv_lora_rank"], c["qk_rope_head_dim"], c["qk_nope_head_dim"], c["v_head_dim"]
    nh = c["num_attention_heads"]
    w = GGUFWriter(str(path), "deepseek2")
    keys = {"block_count": L + 1, "context_length": c["max_position_embeddings"], "embedding_length": c["hidden_size"],
            "feed_forward_length": c["intermediate_size"], "attention.head_count": nh, "attention.head_count_kv": 1,
            "rope.freq_base": 10000.0, "attention.layer_norm_rms_epsilon": 1e-6, "expert_count": DS_E,
            "expert_used_count": DS_K, "expert_group_count": c["n_group"], "expert_group_used_count": c["topk_group"],
            "expert_gating_func": 2, "leading_dense_block_count": c["first_k_dense_replace"],
            "vocab_size": c["vocab_size"], "attention.q_lora_rank": c["q_lora_rank"], "attention.kv_lora_rank": r,
            "attention.key_length": r + dr, "attention.value_length": r, "attention.key_length_mla": dn + dr,
            "attention.value_length_mla": dv, "expert_feed_forward_length": c["moe_intermediate_size"],
            "expert_shared_count": c["n_shared_experts"], "expert_weights_scale": float(c["routed_scaling_factor"]),
            "expert_weights_norm": True, "rope.dimension_count": dr, "rope.scaling.type": "yarn",
            "rope.scaling.factor": float(y["factor"]),
            "rope.scaling.original_context_length": y["original_max_position_embeddings"],
            "rope.scaling.yarn_beta_fast": float(y["beta_fast"]), "rope.scaling.yarn_beta_slow": float(y["beta_slow"]),
            "rope.scaling.yarn_log_multiplier": 0.1 * y["mscale_all_dim"], "nextn_predict_layers": 1}
    if not split_kv_b:  # older converters: per-head lengths, no _mla keys
        keys.update({"attention.key_length": dn + dr, "attention.value_length": dv})
        del keys["attention.key_length_mla"], keys["attention.value_length_mla"]
    keys.update(kv or {})
    add_keys(w, "deepseek2", keys, skip_keys)
    add_vocab(w, c["vocab_size"])
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, arr in hf_tensors(folder).items():
        gname, e = ds_hf_to_gguf(name)
        if gname.endswith("attn_kv_b.weight") and split_kv_b:
            k_b, v_b = ds_split_kv_b(arr, nh, dn, dv)
            out[gname.replace("attn_kv_b", "attn_k_b")], out[gname.replace("attn_kv_b", "attn_v_b")] = k_b, v_b
        elif e is None:
            out[gname] = arr
        else:
            experts.setdefault(gname, {})[e] = arr
    fused_experts(out, experts, DS_E)
    add_nextn(out, L, c["hidden_size"])
    write_tensors(w, out, skip_tensors)
    return path


def ds_dequantized_folder(gguf_path: Path, folder: Path, out: Path) -> Path:
    """`folder`'s DeepSeek model with every tensor replaced by its GGUF counterpart as gguf.quants dequantizes
    it; kv_b_proj joined back from attn_k_b / attn_v_b (or read whole from attn_kv_b)."""
    c = json.loads((folder / "config.json").read_text())
    nh, dn, dv = c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"]
    out.mkdir()
    r = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}

    def deq(gname: str) -> np.ndarray:
        return dequantize(r[gname].data, r[gname].tensor_type)

    sd = {}
    for name, arr in hf_tensors(folder).items():
        gname, e = ds_hf_to_gguf(name)
        if gname.endswith("attn_kv_b.weight") and gname not in r:
            k_b = deq(gname.replace("attn_kv_b", "attn_k_b")).reshape(nh, -1, dn).transpose(0, 2, 1)
            v_b = deq(gname.replace("attn_kv_b", "attn_v_b")).reshape(nh, dv, -1)
            w = np.concatenate([k_b, v_b], axis=1)
        else:
            w = deq(gname)
            w = w if e is None else w[e]
        sd[name] = torch.from_numpy(np.ascontiguousarray(w).reshape(arr.shape).copy())
    return save_like(folder, out, sd)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """(HF folder, written deepseek2 GGUF, its dequantized folder)."""
    root = tmp_path_factory.mktemp("ds_gguf")
    folder = build_ds_hf(root / "hf")
    f = write_ds_gguf(root / "ds.gguf", folder)
    return folder, f, ds_dequantized_folder(f, folder, root / "deq")


def test_deepseek2_config_from_metadata(ds):
    _, f, _ = ds
    cfg = GgufCheckpoint(f).config
    assert (cfg.model_type, cfg.attention, cfg.num_hidden_layers, cfg.num_moe_layers, cfg.mtp_layers) == (
        "deepseek_v3", "mla", L, L - K_DENSE, 1)
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (
        32, 32, 64, 16, 64)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rope_interleave) == (4, 4, True)
    assert (cfg.first_k_dense_replace, cfg.dense_intermediate_size, cfg.intermediate_size) == (1, 64, 32)
    assert (cfg.scoring, cfg.correction_bias, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob) == (
        "sigmoid", True, 4, 2, True)
    assert (cfg.shared_expert_intermediate_size, cfg.routed_scaling_factor) == (32, 2.5)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position) == ("yarn", 4.0, 32)
    assert (cfg.rope_mscale, cfg.rope_mscale_all_dim, cfg.rope_beta_fast, cfg.rope_beta_slow) == (1.0, 1.0, 32.0, 1.0)


def test_deepseek2_written_gguf_is_exact(ds):
    _, f, deq = ds
    assert_exact(f, deq, "DeepseekV3ForCausalLM")


def test_deepseek2_whole_kv_b_is_exact(tmp_path, ds):
    """A file of an older converter, with kv_b_proj whole (attn_kv_b), runs exact too."""
    folder, _, _ = ds
    f = write_ds_gguf(tmp_path / "old.gguf", folder, split_kv_b=False)
    assert "blk.1.attn_kv_b.weight" in {t.name for t in GGUFReader(str(f)).tensors}
    assert_exact(f, ds_dequantized_folder(f, folder, tmp_path / "deq"), "DeepseekV3ForCausalLM")


@pytest.mark.parametrize("key", ["attention.kv_lora_rank", "attention.key_length_mla", "rope.dimension_count",
                                 "expert_shared_count",
                                 "rope.scaling.original_context_length", "expert_gating_func"])
def test_deepseek2_missing_key_is_one_line(tmp_path, ds, key):
    folder, _, _ = ds
    f = write_ds_gguf(tmp_path / "bad.gguf", folder, skip_keys=(key,))
    with pytest.raises(ConfigError) as e:
        mo.load(f, device="cpu", dtype="float32")
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and f"deepseek2.{key}" in msg


@pytest.mark.parametrize("tensor", ["blk.1.attn_k_b.weight", "blk.2.attn_v_b.weight", "blk.0.attn_kv_a_norm.weight",
                                    "blk.2.attn_q_a_norm.weight", "blk.1.attn_q_b.weight", "blk.2.ffn_norm.weight",
                                    "blk.1.ffn_up_shexp.weight", "blk.2.ffn_gate_exps.weight"])
def test_deepseek2_missing_tensor_is_one_line(tmp_path, ds, tensor):
    folder, _, _ = ds
    f = write_ds_gguf(tmp_path / "bad.gguf", folder, skip_tensors=(tensor,))
    with pytest.raises(CheckpointError) as e:
        mo.load(f, device="cpu", dtype="float32")
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and tensor in msg


def test_deepseek2_softmax_gating_is_refused(tmp_path, ds):
    folder, _, _ = ds
    f = write_ds_gguf(tmp_path / "bad.gguf", folder, kv={"expert_gating_func": 1})
    with pytest.raises(ConfigError, match="expert_gating_func is 1"):
        mo.load(f, device="cpu", dtype="float32")


def test_deepseek2_llama_cpp_converted_gguf_is_exact(tmp_path):
    src = os.environ.get("LLAMA_CPP_SRC")
    if not src or not (Path(src) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("opt-in: set LLAMA_CPP_SRC to a llama.cpp source tree (with convert_hf_to_gguf.py) to convert "
                    "a tiny DeepSeek-V3 with llama.cpp's own converter")
    folder = build_ds_hf(tmp_path / "hf")
    script = tmp_path / "convert.py"
    script.write_text(CONVERT)
    f = tmp_path / "ds-q8_0.gguf"
    done = subprocess.run([sys.executable, str(script), str(folder), "q8_0", str(f)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = GGUFReader(str(f))
    assert r.fields["general.architecture"].contents() == "deepseek2"
    assert "blk.1.attn_k_b.weight" in {t.name for t in r.tensors}  # kv_b_proj written split
    assert r.fields["deepseek2.rope.scaling.yarn_log_multiplier"].contents() == pytest.approx(0.1)
    assert GgufCheckpoint(f).config.rope_mscale_all_dim == 1.0
    assert {t.tensor_type.name for t in r.tensors if "_exps" in t.name} == {"Q8_0"}
    assert_exact(f, ds_dequantized_folder(f, folder, tmp_path / "deq"), "DeepseekV3ForCausalLM")


# --- GPT-OSS: llama.cpp's architecture 'gpt-oss' ------------------------------------------------------------
# 4 layers alternating sliding (window 4) / full, 8 experts top-2, MXFP4 experts with nonzero biases (F32
# [E, N] tensors beside the blocks), attention sinks, q/k/v/o biases, a router with a bias, yarn RoPE.
OSS_L, OSS_E, OSS_K = 4, 8, 2
OSS = dict(vocab_size=4096, hidden_size=64, intermediate_size=64, num_hidden_layers=OSS_L, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, num_local_experts=OSS_E, num_experts_per_tok=OSS_K, sliding_window=4,
           layer_types=["sliding_attention", "full_attention"] * (OSS_L // 2), max_position_embeddings=2048,
           rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                             original_max_position_embeddings=64),
           rope_theta=150000.0, initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
           tie_word_embeddings=False)  # swiglu_limit 7.0: llama.cpp hard-codes it


def oss_hf_to_gguf(name: str) -> str:
    """A Hugging Face GPT-OSS tensor name (experts excluded) -> llama.cpp's name."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    parts = name.split(".")
    rest = ".".join(parts[3:])
    fixed = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
             "self_attn.sinks": "attn_sinks.weight", "mlp.router.weight": "ffn_gate_inp.weight",
             "mlp.router.bias": "ffn_gate_inp.bias", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.o_proj.bias": "attn_output.bias"}
    for x in "qkv":
        fixed[f"self_attn.{x}_proj.weight"] = f"attn_{x}.weight"
        fixed[f"self_attn.{x}_proj.bias"] = f"attn_{x}.bias"
    return f"blk.{parts[2]}.{fixed[rest]}"


def build_oss_hf(path: Path) -> Path:
    """A tiny random GptOssForCausalLM (float experts) saved to `path` with the bundled tokenizer; norms,
    biases, sinks perturbed so that a misplaced tensor shows."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**OSS, experts_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("bias", "sinks")):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    for f in TOKENIZER.glob("tokenizer*.json"):
        shutil.copy(f, path)
    return path


def oss_gguf_tensors(folder: Path) -> dict[str, np.ndarray]:
    """llama.cpp's tensors of the model in `folder` (float32): the converter's split of gate_up_proj [E, H, 2I]
    (gate = columns 0::2, up = 1::2) into ffn_gate_exps / ffn_up_exps [E, I, H], down_proj [E, I, H] transposed
    to ffn_down_exps [E, H, I], the fused biases split alike."""
    out = {}
    for name, arr in hf_tensors(folder).items():
        if ".mlp.experts." not in name:
            out[oss_hf_to_gguf(name)] = arr
            continue
        b = f"blk.{name.split('.')[2]}."
        kind = name.rsplit(".", 1)[1]
        if kind == "gate_up_proj":
            out[b + "ffn_gate_exps.weight"] = arr[:, :, 0::2].transpose(0, 2, 1)
            out[b + "ffn_up_exps.weight"] = arr[:, :, 1::2].transpose(0, 2, 1)
        elif kind == "gate_up_proj_bias":
            out[b + "ffn_gate_exps.bias"], out[b + "ffn_up_exps.bias"] = arr[:, 0::2], arr[:, 1::2]
        elif kind == "down_proj":
            out[b + "ffn_down_exps.weight"] = arr.transpose(0, 2, 1)
        else:
            out[b + "ffn_down_exps.bias"] = arr
    return out


def write_oss_gguf(path: Path, folder: Path, skip_keys=(), skip_tensors=(), kv=None) -> Path:
    """The model in `folder` as a gpt-oss GGUF the way llama.cpp's converter lays it out: its metadata keys
    (sliding_window, expert_feed_forward_length, yarn rope.scaling.*), experts MXFP4, their biases F32 [E, N],
    other matrices Q8_0, vectors F32."""
    c = json.loads((folder / "config.json").read_text())
    y = c.get("rope_parameters") or c["rope_scaling"]
    w = GGUFWriter(str(path), "gpt-oss")
    keys = {"block_count": OSS_L, "context_length": c["max_position_embeddings"], "embedding_length": c["hidden_size"],
            "feed_forward_length": c["intermediate_size"], "attention.head_count": c["num_attention_heads"],
            "attention.head_count_kv": c["num_key_value_heads"], "rope.freq_base": float(c.get("rope_theta")
                                                                                          or y["rope_theta"]),
            "attention.layer_norm_rms_epsilon": float(c["rms_norm_eps"]), "expert_count": OSS_E,
            "expert_used_count": OSS_K, "attention.key_length": c["head_dim"], "attention.value_length": c["head_dim"],
            "rope.scaling.type": "yarn", "rope.scaling.factor": float(y["factor"]),
            "rope.scaling.original_context_length": y["original_max_position_embeddings"],
            "rope.scaling.yarn_beta_fast": float(y["beta_fast"]), "rope.scaling.yarn_beta_slow": float(y["beta_slow"]),
            "attention.sliding_window": c["sliding_window"], "expert_feed_forward_length": c["intermediate_size"],
            **(kv or {})}
    add_keys(w, "gpt-oss", keys, skip_keys)
    add_vocab(w, c["vocab_size"])

    def qtype(gname: str, arr: np.ndarray):  # experts MXFP4, other matrices Q8_0, biases and vectors as they are
        if gname.endswith("_exps.weight"):
            return T.MXFP4
        return T.Q8_0 if arr.ndim >= 2 and arr.shape[-1] % 32 == 0 and not gname.endswith(".bias") else None

    out = {g: np.asarray(a, dtype=np.float32) for g, a in oss_gguf_tensors(folder).items()}
    write_tensors(w, out, skip_tensors, qtype)
    return path


def oss_dequantized_folder(gguf_path: Path, folder: Path, out: Path) -> Path:
    """`folder`'s GPT-OSS with every tensor replaced by its GGUF counterpart as gguf.quants dequantizes it,
    the experts' gate / up (and their biases) interleaved back into gate_up_proj."""
    out.mkdir()
    r = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}

    def deq(gname: str) -> np.ndarray:
        return dequantize(r[gname].data, r[gname].tensor_type).astype(np.float32)

    sd = {}
    for name, arr in hf_tensors(folder).items():
        if ".mlp.experts." not in name:
            w = deq(oss_hf_to_gguf(name))
        else:
            b, kind = f"blk.{name.split('.')[2]}.", name.rsplit(".", 1)[1]
            w = np.empty_like(arr)
            if kind == "gate_up_proj":
                w[:, :, 0::2] = deq(b + "ffn_gate_exps.weight").transpose(0, 2, 1)
                w[:, :, 1::2] = deq(b + "ffn_up_exps.weight").transpose(0, 2, 1)
            elif kind == "gate_up_proj_bias":
                w[:, 0::2], w[:, 1::2] = deq(b + "ffn_gate_exps.bias"), deq(b + "ffn_up_exps.bias")
            elif kind == "down_proj":
                w = deq(b + "ffn_down_exps.weight").transpose(0, 2, 1)
            else:
                w = deq(b + "ffn_down_exps.bias")
        sd[name] = torch.from_numpy(np.ascontiguousarray(w).reshape(arr.shape).copy())
    return save_like(folder, out, sd)


def assert_oss_exact(gguf_path: Path, deq: Path, fmt: str = "gguf:MXFP4") -> None:
    """The GGUF run (MXFP4 experts kept packed, biases from the file) equals transformers and our own run on
    the dequantized folder: logits, decode, greedy tokens; offloaded (experts through the device cache from
    the file's map) equals resident."""
    import transformers

    ours = mo.load(gguf_path, device="cpu", dtype="float32")
    assert ours.config.expert_format == fmt
    hf = transformers.GptOssForCausalLM.from_pretrained(deq, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        want = hf(torch.tensor([IDS])).logits[0]
    got = ours.logits(IDS)
    assert rel_err(got, want) < REL_TOL
    assert rel_err(decode_logits(ours, IDS, 5), want) < REL_TOL
    folder_run = mo.load(deq, device="cpu", dtype="float32")
    assert rel_err(got, folder_run.logits(IDS)) < REL_TOL
    tokens = ours.generate(PROMPT, max_new_tokens=12).token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=[2], pad_token_id=0)
    assert tokens == ref[0, len(PROMPT):].tolist()
    assert tokens == folder_run.generate(PROMPT, max_new_tokens=12).token_ids
    with mo.load(gguf_path, device="cpu", dtype="float32", cache_per_layer=OSS_K) as off:
        assert torch.equal(off.logits(IDS), got)


@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    """(HF folder, written gpt-oss GGUF, its dequantized folder)."""
    root = tmp_path_factory.mktemp("oss_gguf")
    folder = build_oss_hf(root / "hf")
    f = write_oss_gguf(root / "oss.gguf", folder)
    return folder, f, oss_dequantized_folder(f, folder, root / "deq")


def test_gpt_oss_config_from_metadata(oss):
    _, f, _ = oss
    ckpt = GgufCheckpoint(f)
    cfg = ckpt.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_local_experts, cfg.intermediate_size) == ("gpt_oss", 4, 8, 64)
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2 and cfg.sliding_window == 4
    assert (cfg.attention_sinks, cfg.expert_bias, cfg.router_logit_bias, cfg.qkv_bias, cfg.o_bias) == (True,) * 5
    assert (cfg.swiglu_limit, cfg.swiglu_alpha) == (7.0, 1.702)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position, cfg.rope_truncate) == ("yarn", 32.0, 64, False)
    fmt = ckpt.expert_format()
    assert fmt.name == "gguf:MXFP4" and fmt.bias and fmt.bias_dtype == torch.float32
    assert [s.name for s in fmt.layout(64, 64)] == ["b1", "b3", "b2", "w1", "w3", "w2"]


def test_gpt_oss_written_gguf_is_exact(oss):
    _, f, deq = oss
    assert_oss_exact(f, deq)


@pytest.mark.parametrize("key", ["attention.sliding_window", "expert_feed_forward_length",
                                 "rope.scaling.original_context_length"])
def test_gpt_oss_missing_key_is_one_line(tmp_path, oss, key):
    folder, _, _ = oss
    f = write_oss_gguf(tmp_path / "bad.gguf", folder, skip_keys=(key,))
    with pytest.raises(ConfigError) as e:
        mo.load(f, device="cpu", dtype="float32")
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and f"gpt-oss.{key}" in msg


@pytest.mark.parametrize("tensor", ["blk.1.ffn_gate_exps.bias", "blk.3.ffn_down_exps.bias", "blk.2.attn_sinks.weight",
                                    "blk.0.ffn_gate_inp.bias", "blk.1.attn_output.bias", "blk.2.post_attention_norm.weight",
                                    "blk.3.ffn_up_exps.weight"])
def test_gpt_oss_missing_tensor_is_one_line(tmp_path, oss, tensor):
    folder, _, _ = oss
    f = write_oss_gguf(tmp_path / "bad.gguf", folder, skip_tensors=(tensor,))
    with pytest.raises(CheckpointError) as e:
        mo.load(f, device="cpu", dtype="float32")
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and tensor in msg


def test_gpt_oss_triton_is_refused_in_one_line(oss):
    _, f, _ = oss
    from moe_offload.options import OffloadConfig

    with pytest.raises(mo.MoeOffloadError) as e:
        mo.load(f, device="cpu", dtype="float32", config=OffloadConfig.make(moe_backend="triton"))
    assert "\n" not in str(e.value) and "loop" in str(e.value)


def oss_hub_mxfp4(folder: Path, out: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """`folder`'s GPT-OSS with its experts in the hub's MXFP4 layout (quantization_config mxfp4), as
    openai/gpt-oss-* ship: (the folder, {fused tensor name: the values its MXFP4 stands for [E, N out, K in]})."""
    from safetensors.torch import save_file
    from test_gpt_oss_mxfp4 import QC, mxfp4_quantize

    out.mkdir()
    sd, spec = {}, {}
    for name, arr in hf_tensors(folder).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales, values = mxfp4_quantize(arr.transpose(0, 2, 1))
            sd[name + "_blocks"], sd[name + "_scales"] = torch.from_numpy(blocks), torch.from_numpy(scales)
            spec[name] = values
        else:
            sd[name] = torch.from_numpy(arr)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in folder.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = QC
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out, spec


@pytest.mark.parametrize("experts", ["float", "mxfp4"])
def test_gpt_oss_llama_cpp_converted_gguf_is_exact(tmp_path, experts):
    """llama.cpp's converter on a float GPT-OSS (experts written Q8_0) and on one whose experts are the hub's
    MXFP4 (repacked to ggml MXFP4: the GGUF's experts equal the hub's values exactly)."""
    src = os.environ.get("LLAMA_CPP_SRC")
    if not src or not (Path(src) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("opt-in: set LLAMA_CPP_SRC to a llama.cpp source tree (with convert_hf_to_gguf.py) to convert "
                    "a tiny GPT-OSS with llama.cpp's own converter")
    folder = build_oss_hf(tmp_path / "hf")
    src_folder, spec = (folder, None) if experts == "float" else oss_hub_mxfp4(folder, tmp_path / "hub")
    script = tmp_path / "convert.py"
    script.write_text(CONVERT)
    f = tmp_path / "oss-q8_0.gguf"
    done = subprocess.run([sys.executable, str(script), str(src_folder), "q8_0", str(f)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = GGUFReader(str(f))
    assert r.fields["general.architecture"].contents() == "gpt-oss"
    tensors = {t.name: t for t in r.tensors}
    assert {tensors[f"blk.0.ffn_{p}_exps.bias"].tensor_type.name for p in ("gate", "up", "down")} == {"F32"}
    kind = "Q8_0" if experts == "float" else "MXFP4"
    assert {t.tensor_type.name for n, t in tensors.items() if n.endswith("_exps.weight")} == {kind}
    if spec is not None:  # the converter's repacked blocks stand for the hub's values, gate rows 0::2, up 1::2
        gu = spec["model.layers.1.mlp.experts.gate_up_proj"]
        gate = dequantize(tensors["blk.1.ffn_gate_exps.weight"].data, T.MXFP4)
        up = dequantize(tensors["blk.1.ffn_up_exps.weight"].data, T.MXFP4)
        assert np.array_equal(gate, gu[:, 0::2]) and np.array_equal(up, gu[:, 1::2])
        down = dequantize(tensors["blk.1.ffn_down_exps.weight"].data, T.MXFP4)
        assert np.array_equal(down, spec["model.layers.1.mlp.experts.down_proj"])
    assert GgufCheckpoint(f).config.layer_types == ("sliding_attention", "full_attention") * 2
    assert_oss_exact(f, oss_dequantized_folder(f, folder, tmp_path / "deq"), f"gguf:{kind}")
