"""GGUF files (llama.cpp's format) as checkpoints: `load("model-Q4_K_M.gguf")`.

Read with the `gguf` package (PyPI, maintained with llama.cpp; `pip install moe_offload[gguf]`):
  architecture   general.architecture: 'llama' with experts (Mixtral), 'qwen2moe', 'qwen3moe', 'glm4moe'
                 (GLM-4.5 / 4.5-Air), 'deepseek2' (DeepSeek-V3 / R1, Kimi-K2; sigmoid-routed only), 'gpt-oss'
                 (GPT-OSS-20B / 120B)
  config         hyper-parameters from '{arch}.*' metadata, mapped onto the family's config.json keys;
                 glm4moe: leading_dense_block_count dense layers (ffn_gate/up/down), sigmoid routing
                 (expert_gating_func) with the correction bias exp_probs_b, groups, expert_weights_scale,
                 shared experts (ffn_*_shexp), partial rotary from rope.dimension_count; block_count
                 includes the nextn_predict_layers NextN layers, whose tensors are not read;
                 deepseek2: the same routing and layers, latent attention (attention.q_lora_rank,
                 kv_lora_rank, key_length_mla / value_length_mla, rope.dimension_count), yarn RoPE from
                 rope.scaling.* (yarn_log_multiplier = 0.1 * mscale_all_dim); kv_b_proj rebuilt from the
                 converter's split attn_k_b / attn_v_b (or read whole from an older file's attn_kv_b);
                 gpt-oss: expert_feed_forward_length, attention.sliding_window and the layers it applies to
                 (attention.sliding_window_pattern, llama.cpp's default period 2: even layers slide), yarn
                 RoPE from rope.scaling.* (untruncated, as the published model), attention sinks
                 (attn_sinks), q/k/v/o and router biases, the clamped SwiGLU llama.cpp hard-codes (7.0, 1.702)
  tokenizer      tokenizer.ggml.* (SentencePiece 'llama' or byte-level BPE 'gpt2' vocabularies), built with
                 the tokenizers library the way transformers' GGUF loader builds it
  experts        ffn_{gate,up,down}_exps [E, rows, blocks] stay in their block types (formats/gguf.py), each
                 layer its own (a Q4_K_M file gives some layers Q6_K down projections): the host store
                 reads them in place from the file's memory map (expert_tensors), never a copy in RAM;
                 gpt-oss's expert biases ffn_{gate,up,down}_exps.bias [E, N] (F32 / F16 / BF16) too, as the
                 bias sections of formats/gguf.py GgufBiasedFormat's rows (expert_format())
  dense tensors  dequantized at load (F32 / F16 / BF16 as they are; block types with our codecs, other
                 types with gguf.quants.dequantize); 'llama' stores attn_q / attn_k rows permuted for its
                 interleaved RoPE (convert_hf_to_gguf.py's permute), undone here

The checkpoint object answers what runtime.load() asks of checkpoint.Checkpoint (config, validate,
tensor by Hugging Face name, fingerprint, dtype_name, close) plus expert_tensors() for the host store and
tokenizer(). Refused in one line naming the file (and tensor): a truncated file, a tensor whose bytes do
not fit its type and shape, an expert block type without a codec, a missing tokenizer key, a split set
(-00001-of-0000N.gguf, read whole: metadata from its first part, tensors from every part) with a missing
part or whose split.no / split.count / split.tensors.count disagree, other architectures.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .formats.gguf import BLOCK_TYPES, BY_GGML_TYPE, gguf_layers_name

ARCHS = {"llama": "mixtral", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "glm4moe": "glm4_moe",
         "deepseek2": "deepseek_v3", "gpt-oss": "gpt_oss"}
FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGML F32, F16, BF16
SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
# llama.cpp's tensor names per slot of families.Family.layer_tensors / model_tensors
LAYER_NAMES = {"input_layernorm": "attn_norm.weight", "post_attention_layernorm": "ffn_norm.weight",
               "q_proj": "attn_q.weight", "k_proj": "attn_k.weight", "v_proj": "attn_v.weight",
               "o_proj": "attn_output.weight", "q_bias": "attn_q.bias", "k_bias": "attn_k.bias",
               "v_bias": "attn_v.bias", "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
               "gate": "ffn_gate_inp.weight", "shared_w1": "ffn_gate_shexp.weight",
               "shared_w3": "ffn_up_shexp.weight", "shared_w2": "ffn_down_shexp.weight",
               "shared_gate": "ffn_gate_inp_shexp.weight", "router_bias": "exp_probs_b.bias",
               "dense_w1": "ffn_gate.weight", "dense_w3": "ffn_up.weight", "dense_w2": "ffn_down.weight"}
# where an architecture names a slot otherwise (GLM-4.5's post-attention norm is llama.cpp's ATTN_POST_NORM)
# DeepSeek's latent attention (llama.cpp's deepseek2): a tuple names the tensors one slot is rebuilt from
# (kv_b_proj from the converter's split attn_k_b / attn_v_b; files of older converters hold attn_kv_b whole)
MLA_NAMES = {"q_a_proj": "attn_q_a.weight", "q_a_layernorm": "attn_q_a_norm.weight", "q_b_proj": "attn_q_b.weight",
             "q_proj": "attn_q.weight", "kv_a_proj_with_mqa": "attn_kv_a_mqa.weight",
             "kv_a_layernorm": "attn_kv_a_norm.weight", "kv_b_proj": ("attn_k_b.weight", "attn_v_b.weight"),
             "o_proj": "attn_output.weight"}
WHOLE_NAMES = {"kv_b_proj": "attn_kv_b.weight"}
# GPT-OSS (llama.cpp's gpt-oss): the output projection's bias, a sink logit per head, the router's bias
GPT_OSS_NAMES = {"post_attention_layernorm": "post_attention_norm.weight", "o_bias": "attn_output.bias",
                 "sinks": "attn_sinks.weight", "gate_bias": "ffn_gate_inp.bias"}
ARCH_LAYER_NAMES = {"glm4moe": {**LAYER_NAMES, "post_attention_layernorm": "post_attention_norm.weight"},
                    "deepseek2": {**LAYER_NAMES, **MLA_NAMES}, "gpt-oss": {**LAYER_NAMES, **GPT_OSS_NAMES}}
SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID ({arch}.expert_gating_func)
MODEL_NAMES = {"embed_tokens": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}
EXPERT_NAMES = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}
# the experts' biases (GPT-OSS), [E, N] in torch order, by the biased format's row sections
EXPERT_BIAS_NAMES = {"b1": "ffn_gate_exps.bias", "b3": "ffn_up_exps.bias", "b2": "ffn_down_exps.bias"}
# llama.cpp's graph hard-codes the clamped SwiGLU of its gpt-oss experts (LLM_FFN_SWIGLU_OAI_MOE): no keys
OAI_SWIGLU_ALPHA, OAI_SWIGLU_LIMIT = 1.702, 7.0


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading .gguf files needs the `gguf` package: pip install 'moe_offload[gguf]' "
                              "(or pip install gguf)") from None
    return gguf


def split_parts(path: Path) -> list[Path]:
    """[path] for one file; every part of a split set (llama.cpp's gguf-split names, 'name-00001-of-00003.gguf')
    given any of its parts. CheckpointError naming a missing file or part."""
    m = SPLIT.search(path.name)
    if m is None:
        if not path.is_file():
            raise CheckpointError(f"{path}: GGUF file does not exist")
        return [path]
    n = int(m.group(2))
    if not 1 <= int(m.group(1)) <= n:
        raise CheckpointError(f"{path}: not a part of a split GGUF set (part {int(m.group(1))} of {n})")
    stem = path.name[: m.start()]
    parts = [path.with_name(f"{stem}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise CheckpointError(f"{path}: split GGUF set of {n} parts is missing {', '.join(missing)} (in {path.parent})")
    return parts


class GgufCheckpoint:
    """One .gguf file, or a split set (any of its parts given; see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        gguf = _import_gguf()
        self.parts = split_parts(self.path)  # the file itself, or every part of its split set
        self.readers = []
        for part in self.parts:
            try:
                self.readers.append(gguf.GGUFReader(str(part), "r"))
            except Exception as exc:  # the reader raises ValueError / struct errors / numpy errors on bad files
                raise CheckpointError(f"{part}: not a readable GGUF file (truncated or corrupt?): "
                                      f"{type(exc).__name__}: {exc}") from None
        self.reader = self.readers[0]  # the metadata (a split set's first part holds it)
        if len(self.parts) > 1:
            self._check_split()
        self.tensors = {t.name: t for r in self.readers for t in r.tensors}
        for part, r in zip(self.parts, self.readers):
            self._check_bytes(part, r)
        self.arch = self._str("general.architecture")
        if self.arch not in ARCHS:
            raise ConfigError(f"{self.path}: GGUF architecture {self.arch!r} is not supported; supported: "
                              f"{sorted(ARCHS)} (with experts)")
        self.config = self._config()
        self.layer_types = self._expert_types()  # (gate, up, down) type names per layer
        self.config = replace(self.config, expert_format=gguf_layers_name(self.layer_types))
        self.bias_dtype = self._expert_bias_dtype() if self.config.expert_bias else None  # GPT-OSS's experts
        self._name_map: dict[str, tuple[str, tuple[int, ...], str]] | None = None

    # --- metadata -------------------------------------------------------------------------------------
    def meta(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _str(self, key: str) -> str:
        v = self.meta(key)
        if v is None:
            raise ConfigError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return v

    def _need(self, key: str) -> Any:
        v = self.meta(key)
        if v is None:
            raise ConfigError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return v

    def _config(self) -> ModelConfig:
        a = self.arch
        experts = self.meta(f"{a}.expert_count", 0)
        if not experts:
            raise ConfigError(f"{self.path}: GGUF {a} model without experts ({a}.expert_count missing or 0); only MoE "
                              "models are supported")
        if f"blk.0.{EXPERT_NAMES['w1']}" not in self.tensors and "blk.0.ffn_gate.0.weight" in self.tensors:
            raise CheckpointError(f"{self.path}: old GGUF layout with one tensor per expert (blk.N.ffn_gate.E.weight); "
                                  "reconvert it with a current llama.cpp convert_hf_to_gguf.py")
        scaling = self.meta(f"{a}.rope.scaling.type")
        allowed = (None, "none", "yarn") if a in ("deepseek2", "gpt-oss") else (None, "none")
        if scaling not in allowed:
            raise ConfigError(f"{self.path}: {a}.rope.scaling.type {scaling!r} is not supported; expected "
                              f"{' or '.join(str(x) for x in allowed[1:])}")
        hidden, heads = self._need(f"{a}.embedding_length"), self._need(f"{a}.attention.head_count")
        tokens = self.meta("tokenizer.ggml.tokens")
        embd = self.tensors.get("token_embd.weight")
        vocab = self.meta(f"{a}.vocab_size") or (len(tokens) if tokens else None) or (
            int(embd.shape[1]) if embd is not None else None)
        # block_count counts the NextN / MTP layers a converter appends after the model's own layers
        nextn = int(self.meta(f"{a}.nextn_predict_layers", 0) or 0)
        raw: dict[str, Any] = {
            "model_type": ARCHS[a], "vocab_size": vocab, "hidden_size": hidden,
            "num_hidden_layers": self._need(f"{a}.block_count") - nextn, "num_attention_heads": heads,
            "num_key_value_heads": self.meta(f"{a}.attention.head_count_kv", heads),
            "head_dim": self.meta(f"{a}.attention.key_length") or hidden // heads,
            "num_experts_per_tok": self._need(f"{a}.expert_used_count"),
            "rms_norm_eps": self._need(f"{a}.attention.layer_norm_rms_epsilon"),
            "max_position_embeddings": self.meta(f"{a}.context_length", 4096),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "bos_token_id": self.meta("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.meta("tokenizer.ggml.eos_token_id"),
            "torch_dtype": self.dtype_name,
        }
        if self.meta(f"{a}.rope.freq_base") is not None:
            raw["rope_theta"] = self.meta(f"{a}.rope.freq_base")
        if a == "glm4moe":
            raw.update(self._glm4moe_fields(raw["head_dim"], experts, nextn))
        elif a == "deepseek2":
            raw.update(self._deepseek2_fields(experts, nextn, heads, scaling == "yarn"))
        elif a == "gpt-oss":
            raw.update(self._gpt_oss_fields(experts, scaling == "yarn"))
        elif a == "llama":
            raw.update(num_local_experts=experts, intermediate_size=self._need(f"{a}.feed_forward_length"),
                       sliding_window=None)
        else:
            width = self.meta(f"{a}.expert_feed_forward_length") or self._need(f"{a}.feed_forward_length")
            raw.update(num_experts=experts, moe_intermediate_size=width,
                       norm_topk_prob=bool(self.meta(f"{a}.expert_weights_norm", a == "qwen3moe")))
            if a == "qwen2moe":
                raw.update(shared_expert_intermediate_size=self.meta(f"{a}.expert_shared_feed_forward_length")
                           or self._need(f"{a}.feed_forward_length"),
                           qkv_bias="blk.0.attn_q.bias" in self.tensors)
        return ModelConfig.from_dict(raw, source=str(self.path))

    def _glm4moe_fields(self, head_dim: int, experts: int, nextn: int) -> dict[str, Any]:
        """GLM-4.5's config.json keys from glm4moe.* metadata (what llama.cpp's converter writes): dense
        leading layers, shared experts, sigmoid routing with groups and scale, partial rotary (the rope
        dimension count), q/k norms and q/k/v biases by the presence of layer 0's tensors."""
        a = self.arch
        gating = self.meta(f"{a}.expert_gating_func")
        if gating not in (None, SIGMOID_GATING):
            raise ConfigError(f"{self.path}: {a}.expert_gating_func is {gating}; GLM-4.5 routes with sigmoid "
                              f"({SIGMOID_GATING})")
        dense = int(self.meta(f"{a}.leading_dense_block_count", 0) or 0)
        rope_dim = self.meta(f"{a}.rope.dimension_count") or head_dim
        return {"n_routed_experts": experts, "moe_intermediate_size": self._need(f"{a}.expert_feed_forward_length"),
                "intermediate_size": self._need(f"{a}.feed_forward_length") if dense else 0,
                "n_shared_experts": self._need(f"{a}.expert_shared_count"), "first_k_dense_replace": dense,
                "attention_bias": "blk.0.attn_q.bias" in self.tensors,
                "use_qk_norm": "blk.0.attn_q_norm.weight" in self.tensors,
                "partial_rotary_factor": rope_dim / head_dim,
                "n_group": self.meta(f"{a}.expert_group_count", 1) or 1,
                "topk_group": self.meta(f"{a}.expert_group_used_count", 1) or 1,
                "routed_scaling_factor": float(self.meta(f"{a}.expert_weights_scale", 1.0) or 1.0),
                "norm_topk_prob": bool(self.meta(f"{a}.expert_weights_norm", False)),
                "num_nextn_predict_layers": nextn}

    def _deepseek2_fields(self, experts: int, nextn: int, heads: int, yarn: bool) -> dict[str, Any]:
        """DeepSeek-V3 / R1 / Kimi-K2's config.json keys from deepseek2.* metadata (what llama.cpp's converter
        writes): the latent attention's ranks and head dims (key_length_mla = qk_nope + qk_rope, the rope
        part rope.dimension_count), dense
        leading layers, shared experts, sigmoid routing with groups, scale and the correction bias
        exp_probs_b where layer tensors hold it, and yarn RoPE from rope.scaling.*."""
        a = self.arch
        gating = self.meta(f"{a}.expert_gating_func")
        if gating is None:  # llama.cpp then routes with softmax, as DeepSeek-V2 files of older converters
            raise ConfigError(f"{self.path}: GGUF metadata key '{a}.expert_gating_func' is missing (a softmax-routed "
                              "DeepSeek-V2 file?); only sigmoid-routed DeepSeek-V3 / R1 / Kimi-K2 files are supported")
        if gating != SIGMOID_GATING:
            raise ConfigError(f"{self.path}: {a}.expert_gating_func is {gating}; DeepSeek-V3 routes with sigmoid "
                              f"({SIGMOID_GATING}); softmax-routed DeepSeek-V2 GGUFs are not supported")
        dense = int(self.meta(f"{a}.leading_dense_block_count", 0) or 0)
        rope_dim = self._need(f"{a}.rope.dimension_count")
        # key_length / value_length are the latent MQA's (r + dr, r); files of older converters (kv_b_proj
        # whole) have no _mla keys and per-head lengths there instead
        old = f"blk.0.{WHOLE_NAMES['kv_b_proj']}" in self.tensors
        suffix = "" if old else "_mla"
        k_len, v_len = (self.meta(f"{a}.attention.{k}_mla") or self._need(f"{a}.attention.{k}{suffix}")
                        for k in ("key_length", "value_length"))
        out = {"n_routed_experts": experts, "moe_intermediate_size": self._need(f"{a}.expert_feed_forward_length"),
               "intermediate_size": self._need(f"{a}.feed_forward_length") if dense else 0,
               "n_shared_experts": self._need(f"{a}.expert_shared_count"), "first_k_dense_replace": dense,
               "num_key_value_heads": heads,  # the converter writes 1 (MLA as one shared KV head)
               "q_lora_rank": self.meta(f"{a}.attention.q_lora_rank") or None,
               "kv_lora_rank": self._need(f"{a}.attention.kv_lora_rank"),
               "qk_nope_head_dim": k_len - rope_dim, "qk_rope_head_dim": rope_dim, "v_head_dim": v_len,
               "n_group": self.meta(f"{a}.expert_group_count", 1) or 1,
               "topk_group": self.meta(f"{a}.expert_group_used_count", 1) or 1,
               "routed_scaling_factor": float(self.meta(f"{a}.expert_weights_scale", 1.0) or 1.0),
               "norm_topk_prob": bool(self.meta(f"{a}.expert_weights_norm", False)), "scoring_func": "sigmoid",
               "topk_method": "noaux_tc" if f"blk.{dense}.exp_probs_b.bias" in self.tensors else "greedy",
               "rope_interleave": True,  # llama.cpp rotates deepseek2 in pairs (0, 1), (2, 3), ... as the hub's
               "num_nextn_predict_layers": nextn}
        if yarn:
            out["rope_scaling"] = self._yarn_scaling()
        return out

    def _gpt_oss_fields(self, experts: int, yarn: bool) -> dict[str, Any]:
        """GPT-OSS's config.json keys from gpt-oss.* metadata (what llama.cpp's converter writes): expert
        width, the sliding window and which layers use it (llama.cpp's rule: attention.sliding_window_pattern,
        an array of booleans or a period n whose last layer of each n is full; default 2, so even layers
        slide), yarn RoPE without truncation (the model as published; llama.cpp rounds the yarn band),
        q/k/v/o biases by the presence of layer 0's, and the clamped SwiGLU llama.cpp hard-codes."""
        a = self.arch
        n = int(self._need(f"{a}.block_count"))
        pattern = self.meta(f"{a}.attention.sliding_window_pattern", 2)
        if isinstance(pattern, (list, tuple)):
            if len(pattern) != n:
                raise ConfigError(f"{self.path}: {a}.attention.sliding_window_pattern has {len(pattern)} entries, "
                                  f"block_count is {n}")
            sliding = [bool(x) for x in pattern]
        else:
            sliding = [int(pattern) > 0 and i % int(pattern) < int(pattern) - 1 for i in range(n)]
        out: dict[str, Any] = {
            "num_local_experts": experts, "intermediate_size": self._need(f"{a}.expert_feed_forward_length"),
            "sliding_window": self._need(f"{a}.attention.sliding_window"),
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "attention_bias": "blk.0.attn_q.bias" in self.tensors,
            "swiglu_limit": OAI_SWIGLU_LIMIT, "swiglu_alpha": OAI_SWIGLU_ALPHA}
        if yarn:
            y = self._yarn_scaling()
            out["rope_scaling"] = {k: v for k, v in y.items() if k not in ("type", "mscale", "mscale_all_dim")}
            out["rope_scaling"]["truncate"] = False
        else:
            out["rope_scaling"] = {"rope_type": "default"}
        return out

    def _yarn_scaling(self) -> dict[str, Any]:
        """A config.json rope_scaling dict from {arch}.rope.scaling.* (yarn). The converter writes DeepSeek's
        mscale_all_dim as yarn_log_multiplier = 0.1 * mscale_all_dim and not mscale, which llama.cpp takes
        equal to mscale_all_dim (both 1.0 in the V3 / R1 / K2 configs): the same here."""
        a = self.arch
        orig = int(self._need(f"{a}.rope.scaling.original_context_length"))
        factor = float(self._need(f"{a}.rope.scaling.factor"))
        out: dict[str, Any] = {"type": "yarn", "rope_type": "yarn", "factor": factor,
                               "original_max_position_embeddings": orig}
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                          ("yarn_attn_factor", "attention_factor")):
            if self.meta(f"{a}.rope.scaling.{key}") is not None:
                out[name] = float(self.meta(f"{a}.rope.scaling.{key}"))
        log_mul = self.meta(f"{a}.rope.scaling.yarn_log_multiplier")
        if log_mul is not None:
            out["mscale"] = out["mscale_all_dim"] = round(float(log_mul) / 0.1, 6)  # undo float32 rounding
        return out

    # --- tensors --------------------------------------------------------------------------------------
    def _check_split(self) -> None:
        """Every part of a split set says which part it is, of how many; the set holds split.tensors.count."""
        n = len(self.parts)
        for i, (part, r) in enumerate(zip(self.parts, self.readers)):
            no, count = (r.fields.get(k) for k in ("split.no", "split.count"))
            no, count = (None if f is None else int(f.contents()) for f in (no, count))
            if (no, count) != (i, n):
                raise CheckpointError(f"{part}: GGUF split keys say part {no} of {count} (split.no, split.count), its "
                                      f"name part {i} of {n} (split.no counts from 0)")
        total = self.meta("split.tensors.count")
        have = sum(len(r.tensors) for r in self.readers)
        if total is not None and int(total) != have:
            raise CheckpointError(f"{self.parts[0]}: split set holds {have} tensors in {n} parts, split.tensors.count "
                                  f"says {int(total)}")

    def _check_bytes(self, path: Path, reader: Any) -> None:
        """Every tensor's bytes fit its type and shape, lie inside its file and overlap no other tensor."""
        size = path.stat().st_size
        spans = []
        for t in reader.tensors:
            ggml = int(t.tensor_type)
            bt = BY_GGML_TYPE.get(ggml)
            ne0 = int(t.shape[0]) if len(t.shape) else 1
            if bt is not None and ne0 % bt.block:
                raise CheckpointError(f"{path}: tensor {t.name} of type {bt.name} has rows of {ne0} weights, not a "
                                      f"multiple of its block size {bt.block}")
            if bt is not None:
                want = bt.row_bytes(ne0) * (int(t.n_elements) // max(ne0, 1))
            elif ggml in FLOAT_TYPES:
                want = int(t.n_elements) * torch.tensor([], dtype=FLOAT_TYPES[ggml]).element_size()
            else:
                want = int(t.n_bytes)
            if int(t.n_bytes) != want or int(t.data.nbytes) != want:
                raise CheckpointError(f"{path}: tensor {t.name} has {int(t.data.nbytes)} bytes, its shape "
                                      f"{[int(d) for d in t.shape]} x {t.tensor_type.name} needs {want}")
            if int(t.data_offset) + want > size:
                raise CheckpointError(f"{path}: truncated: tensor {t.name} ends at byte "
                                      f"{int(t.data_offset) + want}, the file has {size}")
            spans.append((int(t.data_offset), int(t.data_offset) + want, t.name))
        spans.sort()
        for (_, end, name), (start, _, nxt) in zip(spans, spans[1:]):
            if start < end:
                raise CheckpointError(f"{path}: tensor {name} overlaps tensor {nxt} (byte {start} < {end}): "
                                      "its byte size does not match its type and shape")

    def _tensor(self, gname: str) -> Any:
        t = self.tensors.get(gname)
        if t is None:
            raise CheckpointError(f"{self.path}: missing tensor {gname}")
        return t

    def _moe_block(self, moe_layer: int) -> int:
        """The file's block index of MoE layer `moe_layer` (after the dense leading blocks)."""
        return self.config.first_k_dense_replace + moe_layer

    def _expert_types(self) -> list[tuple[str, str, str]]:
        """(gate, up, down) block type names of each MoE layer's experts (they may differ between layers)."""
        cfg = self.config
        out = []
        for layer in (self._moe_block(m) for m in range(cfg.num_moe_layers)):
            types = []
            for w, gname in EXPERT_NAMES.items():
                t = self._tensor(f"blk.{layer}.{gname}")
                ggml = int(t.tensor_type)
                bt = BY_GGML_TYPE.get(ggml)
                name = t.tensor_type.name if bt is None else bt.name
                if bt is None:
                    raise CheckpointError(f"{self.path}: tensor {t.name} has type {name}; expert tensors are supported "
                                          f"in {list(BLOCK_TYPES)}")
                k, n = (cfg.hidden_size, cfg.intermediate_size) if w != "w2" else (cfg.intermediate_size, cfg.hidden_size)
                want = [k, n, cfg.num_local_experts]
                if [int(d) for d in t.shape] != want:
                    raise CheckpointError(f"{self.path}: tensor {t.name} has shape {[int(d) for d in t.shape]}, "
                                          f"expected {want} (ggml order)")
                types.append(name)
            out.append(tuple(types))
        return out  # type: ignore[return-value]

    def _expert_bias_dtype(self) -> torch.dtype:
        """The dtype of the experts' bias tensors (ffn_{gate,up,down}_exps.bias, ggml shape [N, E]), checked:
        present in every MoE layer, one float type, their shapes."""
        cfg = self.config
        dtypes = set()
        for layer in (self._moe_block(m) for m in range(cfg.num_moe_layers)):
            for w, gname in EXPERT_BIAS_NAMES.items():
                t = self._tensor(f"blk.{layer}.{gname}")
                if int(t.tensor_type) not in FLOAT_TYPES:
                    raise CheckpointError(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}; expert biases "
                                          "are read as F32, F16 or BF16")
                want = [cfg.hidden_size if w == "b2" else cfg.intermediate_size, cfg.num_local_experts]
                if [int(d) for d in t.shape] != want:
                    raise CheckpointError(f"{self.path}: tensor {t.name} has shape {[int(d) for d in t.shape]}, "
                                          f"expected {want} (ggml order)")
                dtypes.add(FLOAT_TYPES[int(t.tensor_type)])
        if len(dtypes) > 1:
            raise CheckpointError(f"{self.path}: the experts' bias tensors mix types {sorted(map(str, dtypes))}; "
                                  "they must share one")
        return dtypes.pop()

    def expert_format(self) -> Any:
        """The experts' ExpertFormat as the file stores them (GPT-OSS's with their bias sections)."""
        from .formats import get_format

        fmt = get_format(self.config.expert_format, self.config.expert_group_size)
        return fmt if self.bias_dtype is None else fmt.with_bias(self.bias_dtype)

    def _names(self) -> dict[str, tuple[str, tuple[int, ...], str]]:
        """Hugging Face name -> (GGUF name, expected HF shape, slot) of every dense tensor."""
        cfg, fam = self.config, self.config.family
        names = ARCH_LAYER_NAMES.get(self.arch, LAYER_NAMES)
        out = {hf: (MODEL_NAMES[slot], shape, slot) for slot, (hf, shape) in fam.model_tensors(cfg).items()}
        for layer in range(cfg.num_hidden_layers):
            for slot, (hf, shape) in fam.layer_tensors(cfg, layer).items():
                gname = names[slot]
                if isinstance(gname, tuple):
                    whole = f"blk.{layer}.{WHOLE_NAMES[slot]}"
                    gname = whole if whole in self.tensors else tuple(f"blk.{layer}.{g}" for g in gname)
                else:
                    gname = f"blk.{layer}.{gname}"
                out[hf] = (gname, shape, slot)
        return out

    def validate(self) -> None:
        """Every dense tensor present with the element count of its shape; raise listing ALL problems."""
        problems = []
        for hf, (gname, shape, _) in self._names().items():
            if isinstance(gname, tuple):  # one tensor rebuilt from several (see MLA_NAMES)
                missing = [g for g in gname if g not in self.tensors]
                for g in missing:
                    problems.append(f"missing tensor {g} (for {hf}, shape {list(shape)})")
                n = sum(int(self.tensors[g].n_elements) for g in gname if g in self.tensors)
                if not missing and n != int(np.prod(shape)):
                    problems.append(f"tensors {' + '.join(gname)} hold {n} weights, {hf} of shape {list(shape)} "
                                    f"needs {int(np.prod(shape))}")
                continue
            t = self.tensors.get(gname)
            if t is None:
                problems.append(f"missing tensor {gname} (for {hf}, shape {list(shape)})")
            elif int(t.n_elements) != int(np.prod(shape)):
                problems.append(f"tensor {gname} has shape {[int(d) for d in t.shape]}, expected {list(shape[::-1])} "
                                "(ggml order)")
        if len(problems) == 1:
            raise CheckpointError(f"{self.path}: GGUF file does not match its metadata: {problems[0]}")
        if problems:
            raise CheckpointError(f"{self.path}: GGUF file does not match its metadata ({len(problems)} problem(s)):\n  "
                                  + "\n  ".join(problems))

    def tensor(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """A dense tensor by its Hugging Face name, dequantized to float32 (then dtype/device)."""
        if self._name_map is None:
            self._name_map = self._names()
        entry = self._name_map.get(name)
        if entry is None:
            raise CheckpointError(f"{self.path}: no dense tensor for {name}")
        gname, shape, slot = entry
        if isinstance(gname, tuple):
            w = self._kv_b(*gname).reshape(shape)
            return w.to(device=device, dtype=dtype or w.dtype)
        w = self._dequantize(self._tensor(gname)).reshape(shape)
        if self.arch == "llama" and slot in ("q_proj", "k_proj"):
            heads = self.config.num_attention_heads if slot == "q_proj" else self.config.num_key_value_heads
            w = unpermute_rope(w, heads)
        return w.to(device=device, dtype=dtype or w.dtype)

    def _kv_b(self, k_name: str, v_name: str) -> torch.Tensor:
        """kv_b_proj [nh (dn + dv), r] from the converter's split halves: attn_k_b holds each head's key
        up-projection transposed (torch [nh, r, dn]), attn_v_b its value up-projection ([nh, dv, r])."""
        cfg = self.config
        nh, r, dn, dv = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
        k = self._dequantize(self._tensor(k_name)).reshape(nh, r, dn).transpose(1, 2)
        v = self._dequantize(self._tensor(v_name)).reshape(nh, dv, r)
        return torch.cat((k, v), dim=1).reshape(nh * (dn + dv), r)

    def _dequantize(self, t: Any) -> torch.Tensor:
        ggml = int(t.tensor_type)
        data = np.asarray(t.data)
        if ggml in FLOAT_TYPES:
            return torch.from_numpy(data.copy().view(np.uint8)).view(FLOAT_TYPES[ggml]).float()
        bt = BY_GGML_TYPE.get(ggml)
        if bt is not None:
            ne0 = int(t.shape[0])
            q = torch.from_numpy(data.copy().view(np.uint8)).reshape(-1, bt.row_bytes(ne0))
            return bt.dequantize(q, ne0)
        from gguf.quants import dequantize

        try:
            return torch.from_numpy(np.ascontiguousarray(dequantize(data, t.tensor_type)))
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be "
                                  "dequantized here") from None

    def expert_tensors(self, layer: int) -> tuple[torch.Tensor, ...]:
        """MoE layer `layer`'s expert tensors as the file stores them, views of its read-only memory map
        (nothing is read or copied): gate, up uint8 [E, I, rb(H)], down uint8 [E, H, rb(I)]. Never written to.
        With expert biases (GPT-OSS), first the biases gate, up [E, I] and down [E, H] in the file's float
        dtype: the biased format's row order (formats/gguf.py GgufBiasedFormat)."""
        out = []
        if self.bias_dtype is not None:
            for gname in EXPERT_BIAS_NAMES.values():
                t = self._tensor(f"blk.{self._moe_block(layer)}.{gname}")
                data = np.asarray(t.data).view(np.uint8).reshape(int(t.shape[1]), -1)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    out.append(torch.from_numpy(data).view(self.bias_dtype))
        for gname in EXPERT_NAMES.values():
            t = self._tensor(f"blk.{self._moe_block(layer)}.{gname}")
            data = np.asarray(t.data).view(np.uint8).reshape(int(t.shape[2]), int(t.shape[1]), -1)
            with warnings.catch_warnings():  # torch warns that the (read-only) map is not writable
                warnings.simplefilter("ignore", UserWarning)
                out.append(torch.from_numpy(data))
        return tuple(out)  # type: ignore[return-value]

    def expert_file_bytes(self) -> int:
        """Bytes of every routed expert tensor in the file (their biases included)."""
        names = [*EXPERT_NAMES.values(), *(EXPERT_BIAS_NAMES.values() if self.bias_dtype is not None else ())]
        return sum(int(self._tensor(f"blk.{self._moe_block(m)}.{g}").n_bytes)
                   for m in range(self.config.num_moe_layers) for g in names)

    def tensor_groups(self) -> dict[str, dict[str, int]]:
        """GGML type -> tensor count per group (experts gate/up/down, attention, router, embeddings, ...)."""
        groups: dict[str, dict[str, int]] = {}
        for t in (t for r in self.readers for t in r.tensors):
            base = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
            g = base.removesuffix(".weight").removesuffix(".bias")
            groups.setdefault(g, {})
            groups[g][t.tensor_type.name] = groups[g].get(t.tensor_type.name, 0) + 1
        return groups

    @property
    def dtype_name(self) -> str:
        t = self.tensors.get("token_embd.weight")
        return {0: "float32", 1: "float16", 30: "bfloat16"}.get(int(t.tensor_type), "bfloat16") if t else "bfloat16"

    def fingerprint(self) -> str:
        """sha256 over the parsed config and every router and post-attention norm tensor as stored."""
        h = hashlib.sha256(json.dumps(self.config.as_dict(), sort_keys=True, default=str).encode())
        norm = ARCH_LAYER_NAMES.get(self.arch, LAYER_NAMES)["post_attention_layernorm"]
        for layer in (self._moe_block(m) for m in range(self.config.num_moe_layers)):
            for g in ("ffn_gate_inp.weight", norm):
                t = self._tensor(f"blk.{layer}.{g}")
                h.update(f"{t.name}:{t.tensor_type.name}".encode())
                h.update(np.asarray(t.data).tobytes())
        return h.hexdigest()[:32]

    def iter_names(self):
        return iter(self._names())

    def close(self) -> None:
        pass

    # --- tokenizer ------------------------------------------------------------------------------------
    def tokenizer(self) -> Any:
        """A tokenizers.Tokenizer from tokenizer.ggml.* (CheckpointError naming a missing key)."""
        return build_tokenizer(self.meta, str(self.path))

    @property
    def chat_template(self) -> str | None:
        return self.meta("tokenizer.chat_template")


def unpermute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's permute of llama q/k rows (w [heads * hd, H] -> the HF order)."""
    hd = w.shape[0] // heads
    return w.reshape(heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def build_tokenizer(meta: Any, where: str) -> Any:
    """tokenizer.ggml.* -> tokenizers.Tokenizer: 'llama' (SentencePiece as BPE with byte fallback, merges from
    the file or recovered from the scores) or 'gpt2' (byte-level BPE, Qwen2 split for pre 'qwen2');
    control tokens (type 3) special, user-defined ones (type 4) added whole."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    def need(key: str) -> Any:
        v = meta(key)
        if v is None:
            raise CheckpointError(f"{where}: GGUF tokenizer key {key!r} is missing")
        return v

    kind = need("tokenizer.ggml.model")
    tokens = list(need("tokenizer.ggml.tokens"))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = meta("tokenizer.ggml.merges")
    types = meta("tokenizer.ggml.token_type") or []
    if kind == "llama":
        if merges is None:
            scores = need("tokenizer.ggml.scores")
            merges = _generate_merges(vocab, dict(zip(tokens, scores)))
        else:
            merges = [tuple(m.split(" ")) for m in merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    elif kind == "gpt2":
        if merges is None:
            raise CheckpointError(f"{where}: GGUF tokenizer key 'tokenizer.ggml.merges' is missing (a gpt2 vocabulary "
                                  "needs its merges)")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], fuse_unk=False))
        if meta("tokenizer.ggml.pre") in ("qwen2", "deepseek-r1-qwen"):
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        raise CheckpointError(f"{where}: GGUF tokenizer.ggml.model {kind!r} is not supported; supported: llama, gpt2")
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4]
    if user:
        tok.add_tokens(user)
    return tok


def _generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece merges recovered from the vocabulary: every split of a piece into two pieces, best
    merged score first (what transformers' GGUF loader and tokenizers' SentencePiece converter do)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
