"""GGUF files (llama.cpp): tiny files written with gguf.GGUFWriter from a transformers model. Oracles are
never our own code: gguf.quants.dequantize for every block type (bit for bit), transformers' Mixtral on
the file's weights dequantized by gguf.quants (llama q/k rows un-permuted with transformers' own GGUF
function), transformers' GGUF loader for qwen3moe and its GGUF tokenizer for the vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFWriter  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

import moe_offload as mo  # noqa: E402
from moe_offload.errors import CheckpointError, ConfigError, MoeOffloadError  # noqa: E402
from moe_offload.formats import get_format  # noqa: E402
from moe_offload.formats.gguf import BLOCK_TYPES  # noqa: E402
from moe_offload.gguf_checkpoint import GgufCheckpoint  # noqa: E402
from moe_offload.offload.store import HostExpertStore  # noqa: E402

QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # gguf.quants can write these
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # random valid blocks
FP16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(rng, qtype: str, rows: int, k: int, scale: float = 0.01) -> np.ndarray:
    """uint8 [rows, row bytes]: random bytes with every fp16 field a small finite value."""
    bt = BLOCK_TYPES[qtype]
    raw = rng.integers(0, 256, size=(rows * (k // bt.block), bt.nbytes), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        vals = rng.uniform(-scale, scale, size=raw.shape[0]).astype(np.float16)
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def spm_vocab(size: int):
    """A SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces with scores."""
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    scores += [0.0] * 256
    types += [6] * 256
    pieces = ["\u2581", "e", "t", "a", "o", "n", "h", "i", "s", "r", "d", "l", "\u2581t", "he", "\u2581the", "in",
              "\u2581a", "an", "nd", "\u2581and", "er", "\u2581b", "eg", "\u2581beg", "\u2581be", "\u2581in", "\u2581G",
              "o", "d", "\u2581Go", "\u2581God", "c", "\u2581c", "re", "at", "ed", "\u2581cre", "\u2581creat",
              "\u2581created", "g", "\u2581beginning", "nn", "ing", "\u2581begin"]
    seen = set(tokens)
    for i, p in enumerate(dict.fromkeys(pieces)):
        if p in seen:
            continue
        tokens.append(p)
        scores.append(-float(i))
        types.append(1)
    while len(tokens) < size:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(5)
    return tokens, scores, types


def _put(w: GGUFWriter, name: str, arr: np.ndarray, qtype: str | None, rng) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype is None or qtype == "F32":
        w.add_tensor(name, arr)
    elif qtype in QUANTIZABLE:
        w.add_tensor(name, quantize(arr, T[qtype]), raw_dtype=T[qtype])
    else:  # K types: random valid blocks of the same shape
        rows, k = int(np.prod(arr.shape[:-1])), arr.shape[-1]
        q = random_blocks(rng, qtype, rows, k).reshape(*arr.shape[:-1], -1)
        w.add_tensor(name, q, raw_dtype=T[qtype])


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permute of llama q/k rows (its interleaved RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, arch: str, types=("Q8_0",) * 3, dense: str = "F32", seed: int = 0, skip=(), extra_kv=None):
    """The transformers model `hf` as a GGUF file of `arch` ('llama' = Mixtral, 'qwen3moe')."""
    c = hf.config
    rng = np.random.default_rng(seed)
    L, E = c.num_hidden_layers, c.num_local_experts if arch == "llama" else c.num_experts
    I = c.intermediate_size if arch == "llama" else c.moe_intermediate_size
    w = GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(I)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(E)
    w.add_expert_used_count(c.num_experts_per_tok)
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(I)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    tokens, scores, ttypes = spm_vocab(c.vocab_size)
    if "tokenizer.ggml.model" not in skip:
        w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    if "tokenizer.ggml.scores" not in skip:
        w.add_token_scores(scores)
    w.add_token_types(ttypes)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for k, v in (extra_kv or {}).items():
        w.add_string(k, v)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    _put(w, "token_embd.weight", sd["model.embed_tokens.weight"], None, rng)
    _put(w, "output_norm.weight", sd["model.norm.weight"], None, rng)
    _put(w, "output.weight", sd["lm_head.weight"], dense, rng)
    for l in range(L):
        p = f"model.layers.{l}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = permute(q, c.num_attention_heads), permute(k, c.num_key_value_heads)
        b = f"blk.{l}."
        _put(w, b + "attn_norm.weight", sd[p + "input_layernorm.weight"], None, rng)
        _put(w, b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], None, rng)
        _put(w, b + "attn_q.weight", q, dense, rng)
        _put(w, b + "attn_k.weight", k, dense, rng)
        _put(w, b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"], dense, rng)
        _put(w, b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"], dense, rng)
        if arch == "qwen3moe":
            _put(w, b + "attn_q_norm.weight", sd[p + "self_attn.q_norm.weight"], None, rng)
            _put(w, b + "attn_k_norm.weight", sd[p + "self_attn.k_norm.weight"], None, rng)
        _put(w, b + "ffn_gate_inp.weight", sd[p + "mlp.gate.weight"], None, rng)
        gu, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]  # [E, 2I, H], [E, H, I]
        _put(w, b + "ffn_gate_exps.weight", gu[:, :I], types[0], rng)
        _put(w, b + "ffn_up_exps.weight", gu[:, I:], types[1], rng)
        _put(w, b + "ffn_down_exps.weight", down, types[2], rng)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def oracle_from_file(hf, path, arch: str):
    """transformers' model with every weight replaced by the file's, dequantized by gguf.quants."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    c = hf.config
    r = GGUFReader(str(path))
    t = {x.name: torch.from_numpy(np.array(dequantize(x.data, x.tensor_type), dtype=np.float32)) for x in r.tensors}
    unperm = LlamaTensorProcessor()._reverse_permute_weights
    sd = hf.state_dict()
    new = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"],
           "lm_head.weight": t["output.weight"]}
    for l in range(c.num_hidden_layers):
        p, b = f"model.layers.{l}.", f"blk.{l}."
        q, k = t[b + "attn_q.weight"], t[b + "attn_k.weight"]
        if arch == "llama":
            q = torch.from_numpy(unperm(q.numpy(), c.num_attention_heads, c.num_attention_heads))
            k = torch.from_numpy(unperm(k.numpy(), c.num_attention_heads, c.num_key_value_heads))
        new.update({p + "input_layernorm.weight": t[b + "attn_norm.weight"],
                    p + "post_attention_layernorm.weight": t[b + "ffn_norm.weight"],
                    p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": t[b + "attn_v.weight"],
                    p + "self_attn.o_proj.weight": t[b + "attn_output.weight"],
                    p + "mlp.gate.weight": t[b + "ffn_gate_inp.weight"],
                    p + "mlp.experts.gate_up_proj": torch.cat([t[b + "ffn_gate_exps.weight"],
                                                               t[b + "ffn_up_exps.weight"]], dim=1),
                    p + "mlp.experts.down_proj": t[b + "ffn_down_exps.weight"]})
        if arch == "qwen3moe":
            new[p + "self_attn.q_norm.weight"] = t[b + "attn_q_norm.weight"]
            new[p + "self_attn.k_norm.weight"] = t[b + "attn_k_norm.weight"]
    assert set(new) == set(sd), set(sd) ^ set(new)
    hf.load_state_dict({k: v.reshape(sd[k].shape) for k, v in new.items()})
    return hf.eval()


def tiny_mixtral(hidden: int, inter: int, vocab: int = 320, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=vocab,
                        max_position_embeddings=128, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                        tie_word_embeddings=False, experts_implementation="eager")
    m = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m


PROMPT = [1, 270, 300, 275, 280, 290, 301, 262]


def greedy_hf(hf, n: int = 10) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, eos_token_id=[2], pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


# --- block types --------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", list(BLOCK_TYPES))
def test_dequantized_experts_equal_gguf_quants_bit_for_bit(qtype, tmp_path):
    """Each type's codec, through the host store's rows (the file's bytes), equals gguf.quants.dequantize."""
    hf = tiny_mixtral(256, 256) if qtype in K_TYPES else tiny_mixtral(64, 96)
    f = write_gguf(tmp_path / "m.gguf", hf, "llama", types=(qtype,) * 3)
    ck = GgufCheckpoint(f)
    assert ck.config.expert_format == f"gguf:{qtype}"
    store = HostExpertStore.from_checkpoint(ck, torch.float32, fmt=ck.config.expert_format)
    pool = store.format.pool_views(store.buffer, store.hidden, store.inter)
    r = {t.name: t for t in GGUFReader(str(f)).tensors}
    E = ck.config.num_local_experts
    for l in range(ck.config.num_hidden_layers):
        ref = {g: dequantize(r[f"blk.{l}.ffn_{g}_exps.weight"].data, T[qtype]) for g in ("gate", "up", "down")}
        for e in range(E):
            w13, w2 = pool.dequant(l * E + e, torch.float32)
            want13 = np.concatenate([ref["gate"][e], ref["up"][e]])
            assert np.array_equal(w13.numpy().view(np.uint32), want13.view(np.uint32))
            assert np.array_equal(w2.numpy().view(np.uint32), ref["down"][e].view(np.uint32))
    # bytes per expert: the file's bytes (+ alignment padding of at most 15 bytes per section)
    file_bytes = ck.expert_file_bytes()
    assert store.buffer.numel() >= file_bytes
    assert store.buffer.numel() - file_bytes <= 3 * 15 * ck.config.num_hidden_layers * E


def test_mixed_expert_types_and_offloaded_equals_resident(tmp_path):
    """gate / up / down of different types (as Q4_K_M files mix them); offloaded equals resident."""
    hf = tiny_mixtral(64, 96)
    f = write_gguf(tmp_path / "m.gguf", hf, "llama", types=("Q4_0", "Q4_1", "Q8_0"))
    assert GgufCheckpoint(f).config.expert_format == "gguf:Q4_0,Q4_1,Q8_0"
    res = mo.load(f, device="cpu", dtype="float32", offload=False).generate(PROMPT, max_new_tokens=10)
    for cap in (2, 3):
        with mo.load(f, device="cpu", dtype="float32", cache_per_layer=cap) as off:
            r = off.generate(PROMPT, max_new_tokens=10)
            assert r.token_ids == res.token_ids and r.stats["misses"] > 0


@pytest.mark.parametrize("types,dense", [(("Q8_0",) * 3, "F32"), (("Q5_1", "Q5_0", "Q4_0"), "Q8_0"),
                                         (("Q4_K", "Q4_K", "Q6_K"), "Q8_0")])
def test_mixtral_gguf_greedy_tokens_equal_transformers_on_the_dequantized_file(types, dense, tmp_path):
    hf = tiny_mixtral(256, 256) if "Q4_K" in types else tiny_mixtral(64, 96)
    f = write_gguf(tmp_path / "m.gguf", hf, "llama", types=types, dense=dense)
    oracle = oracle_from_file(hf, f, "llama")
    ours = mo.load(f, device="cpu", dtype="float32")
    with torch.no_grad():
        want = oracle(torch.tensor([PROMPT])).logits[0]
    assert torch.allclose(ours.logits(PROMPT), want, atol=1e-4, rtol=1e-4)
    assert ours.generate(PROMPT, max_new_tokens=10).token_ids == greedy_hf(oracle)


def test_qwen3moe_gguf_equals_transformers_gguf_loader(tmp_path):
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(1)
    # transformers' GGUF loader reads no expert_feed_forward_length: it keeps its default moe width 768
    cfg = Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=768, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                         num_experts_per_tok=2, vocab_size=320, max_position_embeddings=128, norm_topk_prob=True,
                         initializer_range=0.1, tie_word_embeddings=False, experts_implementation="eager",
                         bos_token_id=1, eos_token_id=2)
    hf = Qwen3MoeForCausalLM(cfg).eval()
    f = write_gguf(tmp_path / "q.gguf", hf, "qwen3moe", types=("Q8_0", "Q8_0", "Q5_1"))
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32,
                                                  experts_implementation="eager").eval()
    ours = mo.load(f, device="cpu", dtype="float32", cache_per_layer=2)
    assert ours.config.model_type == "qwen3_moe"
    with torch.no_grad():
        want = oracle(torch.tensor([PROMPT])).logits[0]
    assert torch.allclose(ours.logits(PROMPT), want, atol=1e-4, rtol=1e-4)
    assert ours.generate(PROMPT, max_new_tokens=10).token_ids == greedy_hf(oracle)


def test_tokenizer_from_the_gguf_vocab_equals_transformers(tmp_path):
    from transformers import AutoTokenizer

    f = write_gguf(tmp_path / "m.gguf", tiny_mixtral(64, 96), "llama")
    ours = mo.load(f, device="cpu")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ("In the beginning God created", "the theand  a\u00e9!", "begin"):
        want = theirs.encode(text, add_special_tokens=False)
        assert ours.tokenizer.encode(text, add_special_tokens=False).ids == want
        assert ours.encode(text) == [1] + want  # Mixtral prepends bos
    r = ours.generate("In the beginning", max_new_tokens=4)
    assert r.prompt_token_ids[0] == 1


# --- bad input -----------------------------------------------------------------------------------------
def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_bad_gguf_files_are_one_clear_line(tmp_path):
    hf = tiny_mixtral(64, 96)
    good = write_gguf(tmp_path / "good.gguf", hf, "llama")
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError) as e:
        mo.load(cut, device="cpu")
    assert "cut.gguf" in _one_line(e) and ("truncated" in str(e.value) or "not a readable GGUF" in str(e.value))
    with pytest.raises(CheckpointError) as e:
        mo.load(tmp_path / "nope.gguf", device="cpu")
    assert "does not exist" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        mo.load(tmp_path / "m-00001-of-00002.gguf", device="cpu")
    assert "split GGUF" in _one_line(e)
    # a missing tokenizer key
    f = write_gguf(tmp_path / "notok.gguf", hf, "llama", skip=("tokenizer.ggml.model",))
    with pytest.raises(CheckpointError) as e:
        mo.load(f, device="cpu")
    assert "'tokenizer.ggml.model' is missing" in _one_line(e) and "notok.gguf" in str(e.value)
    # an expert type without a codec: named with its tensor
    f = tmp_path / "f16.gguf"
    write_gguf(f, hf, "llama", types=("Q8_0", "Q8_0", "F32"))
    with pytest.raises(CheckpointError) as e:
        mo.load(f, device="cpu")
    assert "blk.0.ffn_down_exps.weight has type F32" in _one_line(e)
    # another architecture
    f = tmp_path / "arch.gguf"
    w = GGUFWriter(str(f), "gpt2")
    w.add_tensor("x", np.zeros((2, 2), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ConfigError) as e:
        mo.load(f, device="cpu")
    assert "architecture 'gpt2' is not supported" in _one_line(e)


def test_a_tensor_whose_bytes_do_not_match_its_type_and_shape(tmp_path):
    """Patch a tensor's declared shape in the header so its bytes run into the next tensor's."""
    hf = tiny_mixtral(64, 96)
    f = write_gguf(tmp_path / "m.gguf", hf, "llama")
    r = GGUFReader(str(f))
    t = next(x for x in r.tensors if x.name == "blk.0.attn_q.weight")
    shape_field = t.field.parts[3]  # ne[] of the tensor info (uint64 per dim)
    data = bytearray(f.read_bytes())
    off = int(shape_field.ctypes.data - np.asarray(r.data).ctypes.data)  # the header's own bytes
    ne = np.frombuffer(bytes(data[off:off + 16]), dtype=np.uint64).copy()
    ne[1] *= 2  # twice the rows: more bytes than the tensor has before the next one
    data[off:off + 16] = ne.tobytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises((CheckpointError, ConfigError)) as e:
        mo.load(bad, device="cpu")
    msg = _one_line(e)
    assert "bad.gguf" in msg and "blk.0.attn_q.weight" in msg and "does not match its type and shape" in msg


def test_triton_backend_refuses_gguf_with_a_clear_error(tmp_path):
    f = write_gguf(tmp_path / "m.gguf", tiny_mixtral(64, 96), "llama")
    from moe_offload.formats import choose_format

    with pytest.raises(MoeOffloadError, match="run on moe_backend 'loop' only"):
        choose_format("gguf:Q8_0", 128, torch.float32, "triton")
    assert get_format("gguf:Q4_K,Q4_K,Q6_K").name == "gguf:Q4_K,Q4_K,Q6_K"
    with pytest.raises(ValueError, match="GGUF types"):
        get_format("gguf:IQ2_XS")
    with pytest.raises(NotImplementedError):
        get_format("gguf:Q4_0").pack(torch.zeros(1, 32), torch.zeros(1, 32), torch.zeros(32, 1))
    assert f.exists()


def test_info_json_reports_tensor_group_formats_and_store_bytes(tmp_path, capsys):
    import json

    from moe_offload.cli import main

    f = write_gguf(tmp_path / "m.gguf", tiny_mixtral(64, 96), "llama", types=("Q4_0", "Q4_0", "Q8_0"), dense="Q8_0")
    assert main(["info", "--model", str(f), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    st = info["expert_store"]
    assert st["format"] == "gguf:Q4_0,Q4_0,Q8_0"
    g = st["tensor_groups"]
    assert g["ffn_gate_exps"] == {"Q4_0": 2} and g["ffn_down_exps"] == {"Q8_0": 2} and g["attn_q"] == {"Q8_0": 2}
    assert g["token_embd"] == {"F32": 1}
    assert st["file_expert_bytes"] <= st["host_bytes"] <= st["file_expert_bytes"] * 1.02 + 3 * 15 * 8
    store = HostExpertStore.from_checkpoint(GgufCheckpoint(f), torch.float32, fmt=st["format"])
    assert store.buffer.numel() == st["host_bytes"]
    assert main(["info", "--model", str(f)]) == 0
    assert "host store" in capsys.readouterr().out
