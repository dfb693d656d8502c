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

QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4")  # gguf.quants can write these
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


def write_gguf(path, hf, arch: str, types=("Q8_0",) * 3, dense: str = "F32", seed: int = 0, skip=(), extra_kv=None,
               split_max_tensors: int = 0):
    """The transformers model `hf` as a GGUF file of `arch` ('llama' = Mixtral, 'qwen3moe'); split_max_tensors:
    a split set (gguf's writer, llama.cpp's names: path's stem + '-00001-of-0000N.gguf', ...)."""
    c = hf.config
    rng = np.random.default_rng(seed)
    L, E = c.num_hidden_layers, c.num_local_experts if arch == "llama" else c.num_experts
    I = c.intermediate_size if arch == "llama" else c.moe_intermediate_size
    w = GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
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
    if arch == "qwen2moe":
        w.add_expert_feed_forward_length(I)
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
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
        if arch == "qwen2moe":  # q/k/v biases, the shared expert and its sigmoid gate ([H] in the file)
            for x in "qkv":
                _put(w, b + f"attn_{x}.bias", sd[p + f"self_attn.{x}_proj.bias"], None, rng)
            for g, hfname in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                _put(w, b + f"ffn_{g}_shexp.weight", sd[p + f"mlp.shared_expert.{hfname}.weight"], dense, rng)
            _put(w, b + "ffn_gate_inp_shexp.weight", sd[p + "mlp.shared_expert_gate.weight"].reshape(-1), None, rng)
        _put(w, b + "ffn_gate_inp.weight", sd[p + "mlp.gate.weight"], None, rng)
        gu, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]  # [E, 2I, H], [E, H, I]
        lt = types[l] if isinstance(types[0], tuple) else types  # per-layer (gate, up, down) types, or one triple
        _put(w, b + "ffn_gate_exps.weight", gu[:, :I], lt[0], rng)
        _put(w, b + "ffn_up_exps.weight", gu[:, I:], lt[1], rng)
        _put(w, b + "ffn_down_exps.weight", down, lt[2], rng)
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


def tiny_mixtral(hidden: int, inter: int, vocab: int = 320, seed: int = 0, layers: int = 2):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
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
    r = {t.name: t for t in GGUFReader(str(f)).tensors}
    E = ck.config.num_local_experts
    for l in range(ck.config.num_hidden_layers):
        ref = {g: dequantize(r[f"blk.{l}.ffn_{g}_exps.weight"].data, T[qtype]) for g in ("gate", "up", "down")}
        # the file's memory map, and its copy into RAM for the CPU kernels (Q4_0 there in the int4 layout)
        mapped = store.layer_pool(l)
        copied = mapped.in_ram()
        assert (type(copied).__name__ == "Int4Pool") == (qtype == "Q4_0")
        for pool in (mapped, copied):
            for e in range(E):
                w13, w2 = pool.dequant(e, torch.float32)
                want13 = np.concatenate([ref["gate"][e], ref["up"][e]])
                assert np.array_equal(w13.numpy().view(np.uint32), want13.view(np.uint32))
                assert np.array_equal(w2.numpy().view(np.uint32), ref["down"][e].view(np.uint32))
    # bytes per expert and per miss: the file's bytes, exactly (rows are unpadded)
    assert store.mapped and store.buffer is None
    assert store.host_bytes == ck.expert_file_bytes() == E * ck.config.num_hidden_layers * store.expert_bytes
    assert store.row(1, 2).nbytes == store.expert_bytes


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


# --- layers of different expert types (llama.cpp's Q4_K_M mix: some layers' down projections Q6_K) -------
LAYER_MIX = [("Q4_K",) * 3, ("Q4_K", "Q4_K", "Q6_K"), ("Q5_K", "Q5_K", "Q6_K")]


@pytest.fixture(scope="module")
def layer_mix(tmp_path_factory):
    hf = tiny_mixtral(256, 256, layers=3)
    f = write_gguf(tmp_path_factory.mktemp("mix") / "m.gguf", hf, "llama", types=LAYER_MIX, dense="Q8_0")
    return hf, f


def test_layers_of_different_expert_types_load_and_dequantize_as_gguf_quants(layer_mix):
    hf, f = layer_mix
    ck = GgufCheckpoint(f)
    assert ck.config.expert_format == "gguf:Q4_K;Q4_K,Q4_K,Q6_K;Q5_K,Q5_K,Q6_K"
    fmt = get_format(ck.config.expert_format)
    assert [x.name for x in fmt.per_layer(3)] == ["gguf:Q4_K", "gguf:Q4_K,Q4_K,Q6_K", "gguf:Q5_K,Q5_K,Q6_K"]
    assert get_format("gguf:Q4_K*2;Q8_0").name == "gguf:Q4_K*2;Q8_0"
    with pytest.raises(ValueError, match="describes 3 layers"):
        fmt.per_layer(2)
    store = HostExpertStore.from_checkpoint(ck, torch.float32, fmt=ck.config.expert_format)
    assert store.layer_bytes[0] < store.layer_bytes[1] < store.layer_bytes[2] == store.expert_bytes
    assert store.host_bytes == ck.expert_file_bytes()
    r = {t.name: t for t in GGUFReader(str(f)).tensors}
    for l, types in enumerate(LAYER_MIX):
        pool = store.layer_pool(l)
        ref = {g: dequantize(r[f"blk.{l}.ffn_{g}_exps.weight"].data, T[t]) for g, t in zip(("gate", "up", "down"), types)}
        for e in range(4):
            w13, w2 = pool.dequant(e, torch.float32)
            assert np.array_equal(w13.numpy().view(np.uint32),
                                  np.concatenate([ref["gate"][e], ref["up"][e]]).view(np.uint32))
            assert np.array_equal(w2.numpy().view(np.uint32), ref["down"][e].view(np.uint32))


def assert_equals_dequantized_oracle(hf, f) -> None:
    """Our float32 logits (within 1e-4) and 10 greedy tokens equal transformers' on the file's weights as
    gguf.quants dequantizes them."""
    oracle = oracle_from_file(hf, f, "llama")
    ours = mo.load(f, device="cpu", dtype="float32")
    with torch.no_grad():
        want = oracle(torch.tensor([PROMPT])).logits[0]
    assert torch.allclose(ours.logits(PROMPT), want, atol=1e-4, rtol=1e-4)
    assert ours.generate(PROMPT, max_new_tokens=10).token_ids == greedy_hf(oracle)


def test_layers_of_different_expert_types_greedy_tokens_equal_the_dequantized_oracle(layer_mix):
    hf, f = layer_mix
    assert_equals_dequantized_oracle(hf, f)


def _slots_hold_the_file(m, f):
    """Every resident expert's slot, read through its layer's views of the pool, dequantizes to gguf.quants."""
    c = m.expert_cache
    r = {t.name: t for t in GGUFReader(str(f)).tensors}
    seen = 0
    for l, types in enumerate(LAYER_MIX):
        w13_pool, _ = c.layer_views[l]
        for e in np.flatnonzero(c.slot_of[l] >= 0):
            w13, w2 = w13_pool.dequant(int(c.slot_of[l, e]), torch.float32)
            want = dequantize(r[f"blk.{l}.ffn_down_exps.weight"].data, T[types[2]])[e]
            assert np.array_equal(w2.numpy(), want)
            seen += 1
    assert seen


@pytest.mark.parametrize("engine", ["thread", "cuda-link"])
def test_layers_of_different_expert_types_offloaded_equals_resident(layer_mix, engine):
    """Slots shared by layers of different row sizes (global lru), a slot share per layer (lru-layer),
    copies in chunks that cut the gate / up / down pieces of the file (thread engine and the CUDA link
    engine on a fake device): tokens equal the resident run's; bytes per miss are that layer's."""
    from moe_offload import OffloadConfig
    from moe_offload.offload.transfer import ThreadCopyEngine

    _, f = layer_mix
    res = mo.load(f, device="cpu", dtype="float32", offload=False).generate(PROMPT, max_new_tokens=10)
    for policy, cap, predictor in (("lru", 2, "auto"), ("lru", 3, "auto"), ("lru-layer", 2, "auto"),
                                   ("lru", 4, "auto"), ("lru", 2, "none")):
        with mo.load(f, OffloadConfig.make(device="cpu", dtype="float32", cache_per_layer=cap, policy=policy,
                                           predictor=predictor)) as m:
            c = m.expert_cache
            old = c.engine
            if engine == "thread":
                c.engine = ThreadCopyEngine(chunk_bytes=1000)
            else:
                from test_cuda_link import FakeOps, engine as cuda_engine

                c.engine = cuda_engine(FakeOps(), chunk_bytes=1000)
            old.close()
            r = m.generate(PROMPT, max_new_tokens=10)
            assert r.token_ids == res.token_ids, (policy, cap, predictor)
            st = r.stats
            assert st["misses"] > 0
            for l in range(3):  # misses and prefetches of layer l, each that layer's bytes
                n, rem = divmod(int(c.stats.bytes_h2d[l]), c.store.layer_bytes[l])
                assert n >= c.stats.misses[l]
                # a prefetch cancelled part-way through its chunked copy counts only the bytes it sent;
                # without prefetches every load is one whole row of the layer's size
                assert rem == 0 or predictor != "none"
            c.engine.drain()
            _slots_hold_the_file(m, f)


# --- split sets -------------------------------------------------------------------------------------------
def test_a_split_gguf_set_loads_as_the_single_file_does(tmp_path):
    hf = tiny_mixtral(64, 96)
    one = write_gguf(tmp_path / "one.gguf", hf, "llama", types=("Q4_0", "Q4_1", "Q8_0"))
    write_gguf(tmp_path / "set.gguf", hf, "llama", types=("Q4_0", "Q4_1", "Q8_0"), split_max_tensors=8)
    parts = sorted(tmp_path.glob("set-*-of-*.gguf"))
    assert len(parts) >= 3 and parts[0].name == f"set-00001-of-{len(parts):05d}.gguf"
    ck = GgufCheckpoint(parts[1])  # any part names the set
    assert ck.parts == parts and ck.expert_file_bytes() == GgufCheckpoint(one).expert_file_bytes()
    want = mo.load(one, device="cpu", dtype="float32").generate(PROMPT, max_new_tokens=8).token_ids
    assert mo.load(parts[0], device="cpu", dtype="float32").generate(PROMPT, max_new_tokens=8).token_ids == want
    with mo.load(parts[0], device="cpu", dtype="float32", cache_per_layer=2) as m:  # experts from several files
        assert m.generate(PROMPT, max_new_tokens=8).token_ids == want
    # a missing part: one line naming it
    parts[-1].rename(tmp_path / "elsewhere.gguf")
    with pytest.raises(CheckpointError) as e:
        mo.load(parts[0], device="cpu")
    assert f"split GGUF set of {len(parts)} parts is missing {parts[-1].name}" in _one_line(e)
    # a part from another set (its split.no disagrees with its name)
    (tmp_path / "elsewhere.gguf").rename(parts[-1])
    parts[1].write_bytes(parts[2].read_bytes())
    with pytest.raises(CheckpointError) as e:
        mo.load(parts[0], device="cpu")
    assert f"{parts[1].name}: GGUF split keys say part 2 of {len(parts)}" in _one_line(e)


# --- the host store is the file's memory map ----------------------------------------------------------------
def write_wide_gguf(path, hidden=256, inter=6144, experts=8, layers=2, qtype="Q8_0", seed=0):
    """A Mixtral-shaped GGUF whose experts dominate (random valid blocks; small float dense tensors):
    2 layers x 8 experts x 5 MB of Q8_0 = 80 MB of experts, about 2 MB of the rest."""
    rng = np.random.default_rng(seed)
    heads, kv, vocab = 4, 2, 320
    w = GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, layers), (w.add_context_length, 128), (w.add_embedding_length, hidden),
                   (w.add_feed_forward_length, inter), (w.add_head_count, heads), (w.add_head_count_kv, kv),
                   (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-5), (w.add_expert_count, experts),
                   (w.add_expert_used_count, 2)):
        add(v)
    tokens, scores, ttypes = spm_vocab(vocab)
    w.add_tokenizer_model("llama"); w.add_token_list(tokens); w.add_token_scores(scores); w.add_token_types(ttypes)
    w.add_bos_token_id(1); w.add_eos_token_id(2)
    f32 = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)  # noqa: E731
    hd = hidden // heads
    w.add_tensor("token_embd.weight", f32(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", f32(vocab, hidden))
    for l in range(layers):
        b = f"blk.{l}."
        w.add_tensor(b + "attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(b + "ffn_norm.weight", np.ones(hidden, np.float32))
        for name, rows in (("attn_q", hidden), ("attn_k", kv * hd), ("attn_v", kv * hd)):
            w.add_tensor(b + name + ".weight", f32(rows, hidden))
        w.add_tensor(b + "attn_output.weight", f32(hidden, hidden))
        w.add_tensor(b + "ffn_gate_inp.weight", f32(experts, hidden))
        for g, (n, k) in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            q = random_blocks(rng, qtype, experts * n, k).reshape(experts, n, -1)
            w.add_tensor(b + f"ffn_{g}_exps.weight", q, raw_dtype=T[qtype])
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def _rss_over_load(tmp_path, qtype="Q8_0"):
    """(model, RSS growth over loading a GGUF whose experts dominate, the file's expert bytes), every import and
    first-use cost paid before."""
    import gc

    import psutil

    small = write_gguf(tmp_path / "small.gguf", tiny_mixtral(64, 96), "llama")
    mo.load(small, device="cpu").generate(PROMPT, max_new_tokens=2)
    f = write_wide_gguf(tmp_path / "wide.gguf", qtype=qtype)
    experts = GgufCheckpoint(f).expert_file_bytes()
    assert 40e6 < experts < 85e6  # Q8_0 80 MB, Q4_0 42 MB
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    m = mo.load(f, device="cpu", dtype="float32")
    grew = proc.memory_info().rss - before
    print(f"RSS +{grew / 1e6:.1f} MB over the load; experts in the file {experts / 1e6:.1f} MB")
    return m, grew, experts


def test_experts_that_do_not_fit_in_ram_are_read_in_place_rss_does_not_grow_by_them(tmp_path, monkeypatch):
    from moe_offload.offload import packed

    monkeypatch.setattr(packed, "available_host_bytes", lambda: 10 << 20)  # no room for a copy
    m, grew, experts = _rss_over_load(tmp_path)
    assert grew < 0.25 * experts  # a copy into RAM would add all of them
    assert m.generate(PROMPT, max_new_tokens=3).token_ids  # it runs, straight from the map
    store = m.model.experts.store
    assert store.mapped and store.host_bytes == experts and not store.pinned
    assert m.generate(PROMPT, max_new_tokens=1).stats["experts_ram_copy_bytes"] == 0


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_experts_that_fit_are_copied_into_ram_once_and_the_map_leaves_the_resident_set(qtype, tmp_path):
    m, grew, experts = _rss_over_load(tmp_path, qtype)
    copied = m.generate(PROMPT, max_new_tokens=1).stats["experts_ram_copy_bytes"]
    store = m.model.experts.store
    assert store.mapped and store.host_bytes == experts  # the store itself is still the file's map
    # the copy holds the file's bytes (Q4_0 as int4: the same 18 bytes per 32 weights, in 64-byte aligned
    # sections; its zero points are one tensor shared by every layer)
    assert experts <= copied <= 1.01 * experts
    assert grew < 1.3 * experts  # not twice: the map's pages read for the copy were dropped
    assert m.generate(PROMPT, max_new_tokens=3).token_ids


def test_a_copy_that_fits_beside_the_store_but_not_the_rest_of_the_model_warns(tmp_path, monkeypatch):
    from moe_offload.offload import packed

    f = write_wide_gguf(tmp_path / "wide.gguf")
    experts = GgufCheckpoint(f).expert_file_bytes()
    # room for the store, not for its copy plus the dense weights and KV cache beside it
    monkeypatch.setattr(packed, "available_host_bytes", lambda: packed.HOST_RAM_MARGIN + experts + (1 << 20))
    with pytest.warns(UserWarning, match="read from the file's memory map, not copied into RAM"):
        m = mo.load(f, device="cpu", dtype="float32")
    assert m.generate(PROMPT, max_new_tokens=1).stats["experts_ram_copy_bytes"] == 0


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_bf16_decode_from_the_copy_equals_decode_from_the_map(qtype, tmp_path, monkeypatch):
    """bfloat16 runs the 8-bit activation kernels: the copy's (Q4_0 as int4, K-quants repacked) against the
    file's (GGUF kernels on the map), each against gguf.quants' values. The first two decode steps' logits
    within bfloat16 rounding (float32 sums in another order, then one rounding to bfloat16: a flipped
    rounding then compounds through the KV cache, so later steps are not compared), the same tokens."""
    from moe_offload.offload import packed
    from test_decode_glue import decode_steps

    f = write_wide_gguf(tmp_path / "w.gguf", hidden=256, inter=512, qtype=qtype)
    copied = mo.load(f, device="cpu", dtype="bfloat16")
    assert copied.generate(PROMPT, max_new_tokens=1).stats["experts_ram_copy_bytes"] > 0
    with monkeypatch.context() as mp:
        mp.setattr(packed, "available_host_bytes", lambda: 0)
        mapped = mo.load(f, device="cpu", dtype="bfloat16")
    assert mapped.generate(PROMPT, max_new_tokens=1).stats["experts_ram_copy_bytes"] == 0
    a, b = decode_steps(copied, PROMPT, steps=2), decode_steps(mapped, PROMPT, steps=2)
    torch.testing.assert_close(a, b, rtol=2 ** -7, atol=2 ** -7 * float(b.abs().max()))
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_file_larger_than_available_ram_warns_naming_the_shortfall(tmp_path, monkeypatch):
    from moe_offload.offload import store as store_mod

    f = write_gguf(tmp_path / "m.gguf", tiny_mixtral(64, 96), "llama")
    experts = GgufCheckpoint(f).expert_file_bytes()
    monkeypatch.setattr(store_mod, "available_host_bytes", lambda: store_mod.HOST_RAM_MARGIN + experts // 4)
    short = (experts - experts // 4) / 1e9
    with pytest.warns(UserWarning, match=rf"exceed the RAM available .* by {short:.2f} GB.*memory map.*"
                                         r"projected disk-bound decode about \S+ tokens/s"):
        m = mo.load(f, device="cpu", dtype="float32")
    assert m.generate(PROMPT, max_new_tokens=2).token_ids  # it still loads and runs
    monkeypatch.setattr(store_mod, "available_host_bytes", lambda: store_mod.HOST_RAM_MARGIN + experts)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mo.load(f, device="cpu", dtype="float32")  # fits: no warning


@pytest.mark.parametrize("types,dense", [(("Q8_0",) * 3, "F32"), (("Q4_0",) * 3, "F32"),  # Q4_0: run as int4
                                         (("Q5_1", "Q5_0", "Q4_0"), "Q8_0"), (("Q4_K", "Q4_K", "Q6_K"), "Q8_0")])
def test_mixtral_gguf_greedy_tokens_equal_transformers_on_the_dequantized_file(types, dense, tmp_path):
    hf = tiny_mixtral(256, 256) if "Q4_K" in types else tiny_mixtral(64, 96)
    f = write_gguf(tmp_path / "m.gguf", hf, "llama", types=types, dense=dense)
    assert_equals_dequantized_oracle(hf, f)


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


def test_qwen2moe_gguf_equals_transformers_gguf_loader(tmp_path):
    """qwen2moe (shared expert with its sigmoid gate, q/k/v biases): transformers' GGUF loader is the oracle.
    It reads neither expert_feed_forward_length nor expert_shared_feed_forward_length, so the model uses
    its defaults (1408, 5632); experts of different types per layer as well."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(2)
    cfg = Qwen2MoeConfig(hidden_size=64, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                         intermediate_size=5632, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_experts=4, num_experts_per_tok=2, vocab_size=320, max_position_embeddings=128,
                         initializer_range=0.1, tie_word_embeddings=False, experts_implementation="eager",
                         bos_token_id=1, eos_token_id=2)
    hf = Qwen2MoeForCausalLM(cfg).eval()
    f = write_gguf(tmp_path / "q.gguf", hf, "qwen2moe", types=[("Q8_0", "Q8_0", "Q5_1"), ("Q8_0",) * 3])
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32,
                                                  experts_implementation="eager").eval()
    assert oracle.config.model_type == "qwen2_moe"
    ours = mo.load(f, device="cpu", dtype="float32")
    assert ours.config.model_type == "qwen2_moe" and ours.config.expert_format == "gguf:Q8_0,Q8_0,Q5_1;Q8_0"
    with torch.no_grad():
        want = oracle(torch.tensor([PROMPT])).logits[0]
    assert torch.allclose(ours.logits(PROMPT), want, atol=1e-4, rtol=1e-4)
    tokens = greedy_hf(oracle)
    assert ours.generate(PROMPT, max_new_tokens=10).token_ids == tokens
    with mo.load(f, device="cpu", dtype="float32", cache_per_layer=2) as off:
        assert off.generate(PROMPT, max_new_tokens=10).token_ids == tokens


def test_tokenizer_from_the_gguf_vocab_equals_transformers(tmp_path):
    from transformers import AutoTokenizer

    from moe_offload.serve.tokens import ServerTokenizer

    f = write_gguf(tmp_path / "m.gguf", tiny_mixtral(64, 96), "llama")
    ours = mo.load(f, device="cpu")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ("In the beginning God created", "the theand  a\u00e9!", "begin"):
        want = theirs.encode(text, add_special_tokens=False)
        assert ours.tokenizer.encode(text, add_special_tokens=False).ids == want
        assert ours.encode(text) == [1] + want  # Mixtral prepends bos
        assert theirs.encode(text) == [1] + want  # transformers' GGUF tokenizer adds it too
        assert ServerTokenizer(ours).encode_prompt(text) == [1] + want  # and so does the server
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
    assert "split GGUF set of 2 parts is missing m-00001-of-00002.gguf, m-00002-of-00002.gguf" in _one_line(e)
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


def test_triton_backend_refuses_the_gguf_types_it_cannot_read_with_a_clear_error():
    from moe_offload.formats import choose_format

    with pytest.raises(MoeOffloadError, match="the gate projection is Q5_1; moe_backend 'triton' runs"):
        choose_format("gguf:Q5_1", 128, torch.float32, "triton")
    assert choose_format("gguf:Q8_0", 128, torch.float32, "triton").name == "gguf:Q8_0"
    assert get_format("gguf:Q4_K,Q4_K,Q6_K").name == "gguf:Q4_K,Q4_K,Q6_K"
    with pytest.raises(ValueError, match="GGUF types"):
        get_format("gguf:IQ2_XS")
    with pytest.raises(NotImplementedError):
        get_format("gguf:Q4_0").pack(torch.zeros(1, 32), torch.zeros(1, 32), torch.zeros(32, 1))


def test_auto_dtype_on_cpu_is_bfloat16_for_a_gguf_where_the_8bit_kernels_run(tmp_path):
    """dtype 'auto' on the CPU: bfloat16 for a GGUF file where the 8-bit activation kernels run (float32
    would dequantize K-quant experts every token), float32 otherwise and for a folder; `info`'s memory plan
    resolves it the same way from the CPU's flags."""
    from moe_offload.info import describe
    from moe_offload.kernels import cpu_gemv
    from moe_offload.runtime import cpu_reports_vnni

    hf = tiny_mixtral(256, 256)
    f = write_gguf(tmp_path / "m.gguf", hf, "llama", types=("Q4_K", "Q4_K", "Q6_K"))
    want = torch.bfloat16 if cpu_gemv.has_vnni() else torch.float32
    assert cpu_reports_vnni() == cpu_gemv.has_vnni()
    with mo.load(f, device="cpu") as m:
        assert m.model.dtype == want
    item = torch.tensor([], dtype=want).element_size()
    plan = describe(f, plan=mo.OffloadConfig(device="cpu"))["memory_plan"]
    assert plan["dense_bytes"] == GgufCheckpoint(f).config.dense_params * item
    hf.save_pretrained(tmp_path / "folder")
    with mo.load(tmp_path / "folder", device="cpu") as m:
        assert m.model.dtype == torch.float32  # float weights: float32, exact against transformers
    with mo.load(f, device="cpu", dtype="float32") as m:
        assert m.model.dtype == torch.float32  # asked for


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
    assert st["file_expert_bytes"] == st["host_bytes"]
    store = HostExpertStore.from_checkpoint(GgufCheckpoint(f), torch.float32, fmt=st["format"])
    assert store.host_bytes == st["host_bytes"]
    assert main(["info", "--model", str(f)]) == 0
    assert "host store" in capsys.readouterr().out
