"""The family-neutral MoE decoder: embeddings, attention with a static KV cache (grouped-query, or
DeepSeek's multi-head latent attention, model/mla.py, over a latent cache), the router (the
family's router function) and the MoE boundary (plus a resident shared expert where the family has
one), LM head. What differs between families (config keys, tensor names, router function) is their
adapter's (moe_offload.families); this core reads only ModelConfig's fields and asks cfg.family."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..kernels import cpu_gemv, hostmem
from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..errors import ConfigError
from .layers import (apply_rope, attention, linear, rms_norm, rope_tables, step_projection, yarn_attention_factor,
                     yarn_inv_freq)
from .mla import LatentAttention
from .moe import ExpertBackend, ResidentExperts, expert_activation
from .observers import LayerObserver


# the weights a DecodeStep reads, and those of them that may be held as int8 rows
_STEP_WEIGHTS = ("input_layernorm", "post_attention_layernorm", "qkv_proj", "o_proj", "gate", "qkv_bias", "o_bias",
                 "gate_bias", "sinks", "q_norm", "k_norm")
_STEP_INT8 = ("qkv_proj", "o_proj", "gate")


@dataclass(frozen=True)
class DecodeStep:
    """A MoE layer's attention half and router as one compiled call (`attn`, cpu_gemv.attn_plan), and its
    router function and experts as another (`moe`, cpu_gemv.moe_decode; None where the Python step runs
    them), for one token on the CPU. Both hold the weights themselves (edits in place are seen); `ptrs` is
    the storage they were planned on, so a weight given new storage replans."""

    ptrs: tuple[int, ...]
    attn: Any
    moe: Any


@dataclass(frozen=True)
class RowPositions:
    """Batched decode (moe_offload.batch): row b of the batch holds one new token at position pos[b].

    pos, rows: [B] int64 on the device (rows = arange(B)); span = max(pos) + 1, known on the host:
    the keys 0..span-1 that attention reads for every row (each row masks its own future).
    """

    pos: torch.Tensor
    rows: torch.Tensor
    span: int


class KVCache:
    """Preallocated keys/values for every layer: [L, B, n_kv, max_seq_len, head_dim] each.

    Multi-head latent attention (cfg.attention "mla") caches one row per token and layer instead: the
    normed latent and the rotated rope key, k [L, B, 1, max_seq_len, kv_lora_rank + qk_rope_head_dim]
    (one key head shared by all query heads); v is a view of its latent part (no storage of its own)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device):
        if cfg.attention == "mla":
            shape = (cfg.num_hidden_layers, batch, 1, max_seq_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = self.k[..., :cfg.kv_lora_rank]
        else:
            shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len

    def rows(self, start: int, stop: int) -> "KVCache":
        """A KVCache over batch rows start..stop-1 that shares this one's storage."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.max_seq_len = self.k[:, start:stop], self.v[:, start:stop], self.max_seq_len
        return view

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor | None, start: int | RowPositions
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv, T, hd] at positions start..start+T-1; return views of 0..start+T-1.
        With RowPositions (T == 1), row b is written at pos[b] and the views cover 0..span-1.
        v None: k alone is written (MLA: the latent rows, whose view v is)."""
        if isinstance(start, RowPositions):
            self.k[layer][start.rows, :, start.pos] = k[:, :, 0]  # [B, n_kv, hd] at (b, pos[b])
            if v is not None:
                self.v[layer][start.rows, :, start.pos] = v[:, :, 0]
            return self.k[layer, :, :, :start.span], self.v[layer, :, :, :start.span]
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        if v is not None:
            self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class _Rows:
    """A read-only view of rows [lo, hi) of a fused parameter, under a checkpoint tensor's name."""

    def __init__(self, fused: str, bounds):
        self.fused, self.bounds = fused, bounds  # bounds(layer weights) -> (lo, hi)

    def __get__(self, weights, owner=None):
        if weights is None:
            return self
        lo, hi = self.bounds(weights)
        return getattr(weights, self.fused)[lo:hi]


class DenseLayer(nn.Module):
    """The non-expert weights of one decoder layer. Attribute names are the slots of
    families.Family.layer_tensors, which maps each to the family's checkpoint name."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, layer: int = 0):
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        slots = cfg.family.layer_tensors(cfg, layer)
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd

        def p(*shape: int) -> nn.Parameter:
            return nn.Parameter(hostmem.empty(shape, dtype, device), requires_grad=False)

        norm_dtype = torch.float32 if cfg.family.norms_float32 else dtype  # see Family.norms_float32
        self.input_layernorm = nn.Parameter(torch.empty(h, dtype=norm_dtype, device=device), requires_grad=False)
        self.post_attention_layernorm = nn.Parameter(torch.empty(h, dtype=norm_dtype, device=device),
                                                     requires_grad=False)
        if cfg.attention == "mla":  # model/mla.py: the query (or its q-LoRA down-projection) and the latent
            nh, dn, dr, dv, r, ql = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                     cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank)
            q, kv = ql or nh * (dn + dr), r + dr  # the query's width; the latent and the rope key
            self.qkv_proj = p(q + kv, h)  # [q + r + dr, H]
            self.o_proj = p(h, nh * dv)
            self.q_a_layernorm = p(ql) if ql else None
            self.q_b_proj = p(nh * (dn + dr), ql) if ql else None
            self.kv_a_layernorm = p(r)
            self.kv_b_proj = p(nh * (dn + dv), r)  # per head: the key's [dn, r] then the value's [dv, r]
        else:
            self.qkv_proj = p(q + 2 * kv, h)  # q, k, v projections fused: one GEMM per layer
            self.o_proj = p(h, q)
        # a dense first layer (first_k_dense_replace) has its MLP [w1 | w3] and w2 instead of a router
        self.dense = layer < cfg.first_k_dense_replace
        di = self.dense_size = cfg.dense_intermediate_size if self.dense else 0
        self.dense_w13 = p(2 * di, h) if di else None
        self.dense_w2 = p(h, di) if di else None
        self.gate = None if self.dense else p(cfg.num_local_experts, h)
        # the router's correction bias [E] where the family declares one (see MoeModel.route); float32
        # whatever the compute dtype, as the reference keeps it (a bf16 bias would move the choice)
        self.router_bias = None
        if "router_bias" in slots:
            self.router_bias = nn.Parameter(torch.empty(cfg.num_local_experts, dtype=torch.float32, device=device),
                                            requires_grad=False)
        self.q_size, self.kv_size = q, kv
        norm = {"none": None, "per_head": (hd, hd), "full": (q, kv)}[cfg.qk_norm]
        self.qkv_bias = p(q + 2 * kv) if cfg.qkv_bias else None  # [q + 2 kv], fused as qkv_proj is
        self.o_bias = p(h) if "o_bias" in slots else None
        self.sinks = p(cfg.num_attention_heads) if "sinks" in slots else None  # a sink logit per head
        self.gate_bias = p(cfg.num_local_experts) if "gate_bias" in slots else None  # the router's linear bias
        self.q_norm = p(norm[0]) if norm else None
        self.k_norm = p(norm[1]) if norm else None
        si = self.shared_size = 0 if self.dense else cfg.shared_expert_intermediate_size
        # A shared expert runs for every token, so it stays on the device with the dense weights.
        self.shared_w13 = p(2 * si, h) if si else None  # gate then up: [2 Is, H]
        self.shared_w2 = p(h, si) if si else None  # [H, Is]
        gated = "shared_gate" in slots
        self.shared_gate = p(1, h) if gated else None  # [1, H], sigmoid gate of the shared expert

    # Views of the fused projections under the checkpoint's names (rows of the fused parameter).
    q_proj = _Rows("qkv_proj", lambda w: (0, w.q_size))
    k_proj = _Rows("qkv_proj", lambda w: (w.q_size, w.q_size + w.kv_size))
    v_proj = _Rows("qkv_proj", lambda w: (w.q_size + w.kv_size, None))
    q_bias = _Rows("qkv_bias", lambda w: (0, w.q_size))
    k_bias = _Rows("qkv_bias", lambda w: (w.q_size, w.q_size + w.kv_size))
    v_bias = _Rows("qkv_bias", lambda w: (w.q_size + w.kv_size, None))
    shared_w1 = _Rows("shared_w13", lambda w: (0, w.shared_size))
    shared_w3 = _Rows("shared_w13", lambda w: (w.shared_size, None))
    dense_w1 = _Rows("dense_w13", lambda w: (0, w.dense_size))
    dense_w3 = _Rows("dense_w13", lambda w: (w.dense_size, None))
    q_a_proj = _Rows("qkv_proj", lambda w: (0, w.q_size))  # MLA: the query's rows, then the latent's
    kv_a_proj_with_mqa = _Rows("qkv_proj", lambda w: (w.q_size, None))

    @staticmethod
    def checkpoint_names(cfg: ModelConfig, layer: int) -> dict[str, str]:
        """attribute (or view) -> full checkpoint name of layer `layer`, in the family's hub layout."""
        return {slot: name for slot, (name, _) in cfg.family.layer_tensors(cfg, layer).items()}


class MoeModel(nn.Module):
    """A sparse-MoE decoder of any registered family whose expert computation is delegated to an
    `ExpertBackend`.

    `forward(input_ids [B, T], start_pos, cache)` -> logits [B, T, V]. With a KVCache it serves
    prefill (T > 1) and decode (T == 1); without one it attends within the given tokens (training).

    Hooks for what runs outside it: `observers` (see observers.py) see and steer each layer;
    `position_limit`, when set, is called after each layer with its index and returns how many leading
    positions the later layers still compute (None: all). Attention is causal, so the kept positions
    stay exact; the output then has fewer than T rows (a decoding strategy that verifies several
    positions in one pass uses it to stop paying for positions it will not need).
    """

    def __init__(self, cfg: ModelConfig, experts: ExpertBackend, *, dtype: torch.dtype,
                 device: torch.device, max_seq_len: int):
        super().__init__()
        why = cfg.family.unsupported(cfg)
        if why:
            raise ConfigError(why)
        self.cfg = cfg
        self.dtype, self.device, self.max_seq_len = dtype, torch.device(device), max_seq_len
        h, v = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = nn.Parameter(hostmem.empty((v, h), dtype, device), requires_grad=False)
        self.layers = nn.ModuleList(DenseLayer(cfg, dtype, self.device, i) for i in range(cfg.num_hidden_layers))
        # The layers with routed experts (all but the dense first ones): MoE layer m is layers[k + m]. The
        # expert backend, observers, route() and predictors index MoE layers (the offload engine's layers).
        self.first_moe = cfg.first_k_dense_replace
        self.moe_layers = list(self.layers[self.first_moe:])
        self.norm = nn.Parameter(torch.empty(h, dtype=torch.float32 if cfg.family.norms_float32 else dtype,
                                             device=device), requires_grad=False)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(
            hostmem.empty((v, h), dtype, device), requires_grad=False)
        self.experts = experts
        self.routing = cfg.family.routing(cfg)  # the family's router function: logits -> (weights, ids)
        # Everything outside the model that watches or steers a forward pass (see observers.py).
        self.observers: list[LayerObserver] = []
        self.position_limit: Callable[[int], int | None] | None = None
        # The KV cache of the forward pass in progress (None outside one): observers called during the
        # pass read earlier positions' keys and values from it.
        self.active_cache: KVCache | None = None
        # DeepSeek's multi-head latent attention (model/mla.py), or None: grouped-query attention
        self.mla = LatentAttention(cfg) if cfg.attention == "mla" else None
        cos, sin = rope_tables(cfg.rotary_dim, cfg.rope_theta, max_seq_len, self._rope_dtype(dtype), self.device,
                               *rope_scaling(cfg))
        self.register_buffer("rope_cos", cos, persistent=False)  # [P, rotary_dim]
        self.register_buffer("rope_sin", sin, persistent=False)
        # the compiled decode step's plan: (key, experts backend, each layer's DecodeStep or None), see _steps
        self._decode_plan: tuple | None = None

    def _rope_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The RoPE tables' dtype: the compute dtype, or float32 where the family rotates in float32."""
        return torch.float32 if self.mla is not None and self.mla.rope_float32 else dtype

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, *, dtype: torch.dtype, device: torch.device,
                        max_seq_len: int, experts: ExpertBackend | None = None,
                        moe_backend: str = "loop", show_progress: bool = False) -> "MoeModel":
        """Load dense weights (and, unless `experts` is given, all experts) one tensor at a time."""
        cfg = ckpt.config
        ckpt.validate()
        if experts is None:
            experts = empty_resident_experts(cfg, dtype, device, moe_backend)
        model = cls(cfg, experts, dtype=dtype, device=device, max_seq_len=max_seq_len)
        names = model._dense_names()
        n_expert = cfg.num_moe_layers * cfg.num_local_experts if isinstance(experts, ResidentExperts) else 0
        with torch.no_grad(), tqdm(total=len(names) + n_expert, desc="loading weights", unit="tensor",
                                   disable=not show_progress) as bar:
            for name, param in names.items():
                param.copy_(ckpt.tensor(name, param.dtype, device))  # the router bias stays float32
                bar.update()
            if n_expert:
                for m in range(cfg.num_moe_layers):
                    for e in range(cfg.num_local_experts):
                        biases = None if experts.b13 is None else (experts.b13[m, e], experts.b2[m, e])
                        load_expert_into(ckpt, m, e, experts.w13[m, e], experts.w2[m, e], biases)
                        bar.update()
        model.source_fingerprint = ckpt.fingerprint()  # checkpoint identity (predict.model_fingerprint)
        ckpt.close()
        return model

    def _dense_names(self) -> dict[str, nn.Parameter]:
        names = {name: getattr(self, slot) for slot, (name, _) in self.cfg.family.model_tensors(self.cfg).items()}
        for i, layer in enumerate(self.layers):
            for attr, name in DenseLayer.checkpoint_names(self.cfg, i).items():
                names[name] = getattr(layer, attr)
        return names

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Every weight under its hub checkpoint name (experts must be resident)."""
        out = {name: p.detach().clone() for name, p in self._dense_names().items()}
        assert isinstance(self.experts, ResidentExperts), "checkpoint_tensors needs resident experts"
        if self.experts.b13 is not None:
            raise ConfigError(f"{self.cfg.model_type}: writing experts with biases back to a checkpoint is not "
                              "supported")
        inter, family = self.cfg.intermediate_size, self.cfg.family
        for m in range(self.cfg.num_moe_layers):
            layer = self.first_moe + m  # the checkpoint names the model's layer
            for e in range(self.cfg.num_local_experts):
                w13 = self.experts.w13[m, e].detach()
                out[family.expert_name(layer, e, "w1")] = w13[:inter]
                out[family.expert_name(layer, e, "w3")] = w13[inter:]
                out[family.expert_name(layer, e, "w2")] = self.experts.w2[m, e].detach()
        return out

    # --- compute --------------------------------------------------------------------------------
    def dense_int8_weights(self) -> list[torch.nn.Parameter]:
        """The dense weights `dense_dtype='int8'` stores as int8 rows: each layer's fused q/k/v and output
        projections (grouped-query attention; MLA keeps its own) and an untied LM head (a tied one is also
        the embedding table, which stays)."""
        out = [p for w in self.layers for p in (w.qkv_proj, w.o_proj)] if self.mla is None else []
        if self.lm_head is not None:
            out.append(self.lm_head)
        return out

    def lm_head_weight(self) -> torch.Tensor:
        """The LM head's weight [V, H] (the embedding when tied)."""
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def moe_block(self, h: torch.Tensor, layer: int, start_pos: int = 0) -> torch.Tensor:
        """The expert half of MoE layer `layer`: h [..., H] (post-attention normed) -> [..., H]."""
        return self._moe(h, layer, start_pos)[0]

    def router_logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """MoE layer's router on its normed input x [..., H] -> logits [..., E] (plus the router's bias
        where the family has one)."""
        w = self.moe_layers[layer]
        return linear(x, w.gate, w.gate_bias)

    def route(self, layer: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MoE layer's router function on its logits [N, E] -> (weights [N, k] float32, ids [N, k])."""
        return self.routing(logits, self.moe_layers[layer].router_bias)

    def router_scores(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        """MoE layer's router logits [N, E] -> scores [N, E] float32 whose top-k is the routed set
        (softmax, or sigmoid + correction bias with the groups outside the chosen ones at -inf): what
        predictors rank experts by."""
        return self.routing.choice_scores(logits, self.moe_layers[layer].router_bias)

    def dense_mlp(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """A dense first layer's MLP: h [..., H] (post-attention normed) -> [..., H]."""
        w = self.layers[layer]
        gate, up = linear(h, w.dense_w13).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, w.dense_w2)

    def _moe(self, h: torch.Tensor, layer: int, start_pos: int, logits: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        x = h.reshape(-1, h.shape[-1])  # [N, H]
        if logits is None:
            logits = self.router_logits(layer, x)  # [N, E]
        weights, ids = self.route(layer, logits)  # [N, k] each
        for ob in self.observers:
            replaced = ob.on_routing(layer, ids, weights, logits, start_pos)
            if replaced is not None:
                ids, weights = replaced
        y = self.experts(layer, x, ids, weights)  # [N, H]
        if self.cfg.has_shared_expert:
            y = y + self.shared_expert(x, layer)
        return y.reshape(h.shape), logits

    def shared_expert(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """The shared expert of layer `layer` (times its sigmoid gate when it has one): x [N, H] -> [N, H]."""
        w = self.moe_layers[layer]
        gate, up = linear(x, w.shared_w13).chunk(2, dim=-1)  # [N, Is] each
        out = linear(F.silu(gate) * up, w.shared_w2)  # [N, H]
        if w.shared_gate is None:
            return out
        return torch.sigmoid(linear(x, w.shared_gate)) * out  # [N, 1] * [N, H]

    def _qkv(self, x: torch.Tensor, w: DenseLayer) -> torch.Tensor:
        """x [B, T, H] -> q, k, v heads [B, T, nh + 2 nkv, hd], q/k normed per the family (before RoPE)."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        b, t, _ = x.shape
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        qkv = linear(x, w.qkv_proj, w.qkv_bias)  # [B, T, q + 2 kv]
        if cfg.qk_norm == "full":  # OLMoE: RMSNorm over the whole q and k projections
            q, k, v = qkv.split((w.q_size, w.kv_size, w.kv_size), dim=-1)
            qkv = torch.cat((rms_norm(q, w.q_norm, eps), rms_norm(k, w.k_norm, eps), v), dim=-1)
        if cfg.clip_qkv is not None:
            qkv = qkv.clamp(-cfg.clip_qkv, cfg.clip_qkv)
        qkv = qkv.view(b, t, nh + 2 * nkv, cfg.head_dim)
        if cfg.qk_norm == "per_head":  # Qwen3: RMSNorm over head_dim, per head
            q, k, v = qkv.split((nh, nkv, nkv), dim=2)
            qkv = torch.cat((rms_norm(q, w.q_norm, eps), rms_norm(k, w.k_norm, eps), v), dim=2)
        return qkv

    def rope_at(self, start: int | RowPositions, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin rows of positions start..start+T-1, shaped to broadcast against [B, T, heads, rd]:
        [T, 1, rd], or [B, 1, 1, rd] for RowPositions (each row at its own position)."""
        if isinstance(start, RowPositions):  # batched decode: each row at its own position
            return self.rope_cos[start.pos][:, None, None], self.rope_sin[start.pos][:, None, None]
        return self.rope_cos[start:start + t, None], self.rope_sin[start:start + t, None]

    def project(self, x: torch.Tensor, layer: int, start: int | RowPositions
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer `layer`'s query, key and value heads for its normed input x [B, T, H] at positions
        start.. (or RowPositions): q [B, nh, T, hd], k, v [B, nkv, T, hd], RoPE applied; no cache is
        read or written. With the cache's K/V and o_proj, what any attention over other keys builds on.
        Grouped-query attention only (MLA's heads are model/mla.py's)."""
        cfg = self.cfg
        if self.mla is not None:
            raise ConfigError(f"{cfg.model_type}: multi-head latent attention has no grouped-query key/value heads "
                              "to project; what reads them needs a grouped-query attention model")
        t, nh, nkv = x.shape[1], cfg.num_attention_heads, cfg.num_key_value_heads
        qkv = self._qkv(x, self.layers[layer])  # [B, T, nh + 2 nkv, hd]
        cos, sin = self.rope_at(start, t)  # [T, 1, hd] or [B, 1, 1, hd]
        qk = qkv[:, :, : nh + nkv]
        rd = cfg.rotary_dim
        if rd == cfg.head_dim:
            qk = apply_rope(qk, cos, sin)
        else:  # partial rotary: the leading rd dims of each head rotate, the rest pass through
            qk = torch.cat((apply_rope(qk[..., :rd], cos, sin), qk[..., rd:]), dim=-1)
        qk = qk.transpose(1, 2)  # q and k heads at once: [B, nh+nkv, T, hd]
        return qk[:, :nh], qk[:, nh:], qkv[:, :, nh + nkv:].transpose(1, 2)

    def _attention(self, x: torch.Tensor, layer: int, start: int | RowPositions, cache: KVCache | None
                   ) -> torch.Tensor:
        b, t, _ = x.shape
        if self.mla is not None:  # latent attention: absorbed for one query per row (decode), else expanded
            cos, sin = self.rope_at(start, t)
            return self.mla(x, self.layers[layer], layer, start, cache, cos, sin, absorb=t == 1)
        if t == 1 and b == 1 and cache is not None and self._glue_decode(x, start, cache):
            return self._attention_decode(x, layer, start, cache)
        q, k, v = self.project(x, layer, start)  # [B, nh, T, hd], [B, nkv, T, hd] x2
        if cache is not None:
            k, v = cache.update(layer, k, v, start)  # [B, n_kv, start+T (or span), hd]
        q_start = start.pos if isinstance(start, RowPositions) else start
        w = self.layers[layer]
        o = attention(q, k, v, q_start, self.cfg.window(layer), sinks=w.sinks)  # [B, nh, T, hd]
        return linear(o.transpose(1, 2).reshape(b, t, -1), w.o_proj, w.o_bias)

    def _glue_decode(self, x: torch.Tensor, start: int | RowPositions, cache: KVCache) -> bool:
        """Whether one token's grouped-query attention runs as one compiled call (cpu_gemv.attn_decode)."""
        return (isinstance(start, int) and start < cache.max_seq_len and cache.k.dtype == x.dtype
                and self.rope_cos.dtype == x.dtype and cpu_gemv.glue_runs(x))

    def _attention_decode(self, x: torch.Tensor, layer: int, start: int, cache: KVCache) -> torch.Tensor:
        """project + cache.update + attention + o_proj for one token x [1, 1, H] at position start, the
        rotation, cache write and attention in one compiled call; same values (attention's float32 sums
        excepted)."""
        cfg, w = self.cfg, self.layers[layer]
        qkv = self._qkv(x, w)  # [1, 1, nh + 2 nkv, hd]
        o = cpu_gemv.attn_decode(qkv, self.rope_cos[start], self.rope_sin[start], cache.k[layer, 0], cache.v[layer, 0],
                                 start, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rotary_dim,
                                 cfg.window(layer), cfg.head_dim ** -0.5, w.sinks)  # [1, nh * hd]
        return linear(o.view(1, 1, -1), w.o_proj, w.o_bias)

    def _steps(self, x: torch.Tensor, start: int | RowPositions, cache: KVCache | None
               ) -> list[DecodeStep | None] | None:
        """Each layer's DecodeStep for one token x [1, 1, H] (None for a layer that takes the Python step),
        or None when no layer can: not one token on the CPU with the decode glue, gradients wanted, latent
        attention, whole-projection q/k norms or clipping (their ops are the Python step's only), a position
        limit."""
        cfg = self.cfg
        if (x.shape[0] != 1 or x.shape[1] != 1 or cache is None or self.mla is not None or cfg.qk_norm == "full"
                or cfg.clip_qkv is not None or torch.is_grad_enabled() or self.position_limit is not None
                or not self._glue_decode(x, start, cache)):
            return None
        key = (x.dtype, cpu_gemv.activations(), self._experts_ptrs())
        plan = self._decode_plan
        if (plan is None or plan[0] != key or plan[1] is not self.experts
                or any(st is not None and st.ptrs != self._step_ptrs(i) for i, st in enumerate(plan[2]))):
            plan = self._decode_plan = (key, self.experts, [self._plan_step(x, i) for i in range(len(self.layers))])
        return plan[2]

    def _experts_ptrs(self) -> tuple[int, ...]:
        """The storage of resident experts held as parameters (a backend that is an nn.Module)."""
        params = self.experts.parameters() if isinstance(self.experts, nn.Module) else ()
        return tuple(p.data_ptr() for p in params)

    def _step_ptrs(self, i: int) -> tuple[int, ...]:
        """The storage of every weight layer i's DecodeStep reads (read from the parameter table: this runs
        for every layer of every decode token)."""
        params = self.layers[i]._parameters
        weights = [params.get(name) for name in _STEP_WEIGHTS]
        weights += [getattr(params.get(name), "int8_rows", (None,))[0] for name in _STEP_INT8]
        return tuple(0 if t is None else t.data_ptr() for t in weights)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        return {**state, "_decode_plan": None}  # compiled objects: planned again on the first decode

    def _plan_step(self, x: torch.Tensor, i: int) -> DecodeStep | None:
        """Layer i's DecodeStep, or None where it takes the Python step (a dense layer, a norm or
        projection the compiled step would not run the Python step's way)."""
        cfg, w = self.cfg, self.layers[i]
        if i < self.first_moe:
            return None
        h = x.reshape(1, -1)  # [1, H]
        ln1, ln2 = w.input_layernorm, w.post_attention_layernorm
        qk = (w.q_norm, w.k_norm) if cfg.qk_norm == "per_head" else None
        head = h.new_empty(1, cfg.head_dim)
        if not all(n.shape == like.shape[-1:] and n.dtype in (h.dtype, torch.float32) and n.is_contiguous()
                   and cpu_gemv.glue_runs(like, n) for n, like in ((ln1, h), (ln2, h), *((q, head) for q in qk or ()))):
            return None
        o = h.new_empty(1, cfg.num_attention_heads * cfg.head_dim)  # the attention output's shape and dtype
        projections = (step_projection(h, w.qkv_proj, w.qkv_bias), step_projection(o, w.o_proj, w.o_bias),
                       step_projection(h, w.gate, w.gate_bias))
        if any(p is None for p in projections):
            return None
        attn = cpu_gemv.attn_plan(ln1, ln2, cfg.rms_norm_eps, projections, cfg.num_attention_heads,
                                  cfg.num_key_value_heads, cfg.rotary_dim, cfg.window(i), cfg.head_dim ** -0.5,
                                  w.sinks, *(qk or ()))
        return DecodeStep(self._step_ptrs(i), attn, self._plan_moe(h, i))

    def _plan_moe(self, h: torch.Tensor, i: int) -> Any:
        """Layer i's router function and experts as one compiled call for one token h [1, H], or None: a
        router with groups or a correction bias, or experts the compiled step does not run as moe_loop."""
        r = self.routing
        plan = getattr(self.experts, "one_token_experts", None)
        if (plan is None or r.scoring not in ("softmax", "topk_softmax") or r.n_group != 1
                or self.layers[i].router_bias is not None):
            return None
        experts = plan(i - self.first_moe, h)
        if experts is None:
            return None
        return cpu_gemv.moe_decode(r.scoring, r.renormalize, r.scale, r.top_k, *experts)

    def _decode_layer(self, x: torch.Tensor, i: int, step: DecodeStep, start: int, cache: KVCache, steered: bool,
                      router_logits: list[torch.Tensor] | None) -> torch.Tensor:
        """MoE layer i for one token x [1, 1, H] -> [1, 1, H] by its DecodeStep: attention and router in one
        compiled call, the router function and experts in another (the Python step's where the step has
        none or an observer may steer the routing; observers are told of the routing after the experts)."""
        moe_layer = i - self.first_moe
        x, h, logits = cpu_gemv.attn_block_decode(step.attn, x.view(1, -1), self.rope_cos, self.rope_sin, cache.k,
                                                  cache.v, i, start)  # [1, H], [1, H], [1, E]
        for ob in self.observers:
            ob.on_residual(moe_layer, x, start)
        if step.moe is None or steered:
            y, logits = self._moe(h, moe_layer, start, logits)
        else:
            y, ids, weights = step.moe.run(h, logits)  # [1, H], [1, k], [1, k]
            for ob in self.observers:
                ob.on_routing(moe_layer, ids, weights, logits, start)
            if self.cfg.has_shared_expert:
                y = y + self.shared_expert(h, moe_layer)
        if router_logits is not None:
            router_logits.append(logits)
        return (x + y).view(1, 1, -1)

    def forward(self, input_ids: torch.Tensor, start_pos: int | RowPositions = 0, cache: KVCache | None = None,
                router_logits: list[torch.Tensor] | None = None, return_hidden: bool = False,
                host_ids: Sequence[int] | None = None) -> torch.Tensor:
        """input_ids [B, T] at positions start_pos.. -> logits [B, T, V] (or final hidden [B, T, H]); fewer
        than T rows when `position_limit` dropped trailing positions.
        start_pos may be RowPositions (batched decode, T == 1: row b at its own position).
        host_ids: the same ids on the host when the caller has them (decode), for observers."""
        self.active_cache = cache
        try:
            return self._forward(input_ids, start_pos, cache, router_logits, return_hidden, host_ids)
        finally:
            self.active_cache = None

    def _forward(self, input_ids: torch.Tensor, start_pos: int | RowPositions, cache: KVCache | None,
                 router_logits: list[torch.Tensor] | None, return_hidden: bool, host_ids: Sequence[int] | None
                 ) -> torch.Tensor:
        eps = self.cfg.rms_norm_eps
        observers = self.observers
        for ob in observers:
            ob.on_step(input_ids, start_pos, host_ids)
        x = F.embedding(input_ids, self.embed_tokens)  # [B, T, H]
        limit, k = self.position_limit, self.first_moe
        steps = self._steps(x, start_pos, cache)
        steered = any(getattr(ob, "steers_routing", True) for ob in observers)
        for i, layer in enumerate(self.layers):
            step = steps[i] if steps is not None else None
            if step is not None:  # one token on the CPU: the compiled step
                x = self._decode_layer(x, i, step, start_pos, cache, steered, router_logits)
                continue
            x = x + self._attention(rms_norm(x, layer.input_layernorm, eps), i, start_pos, cache)
            if i < k:  # a dense first layer: no router, no experts, nothing for the observers
                x = x + self.dense_mlp(rms_norm(x, layer.post_attention_layernorm, eps), i)
            else:
                if observers:
                    flat = x.reshape(-1, x.shape[-1])  # [N, H]: the residual entering MoE layer i - k
                    for ob in observers:
                        ob.on_residual(i - k, flat, start_pos)
                y, logits = self._moe(rms_norm(x, layer.post_attention_layernorm, eps), i - k, start_pos)
                if router_logits is not None:
                    router_logits.append(logits)
                x = x + y
            keep = limit(i) if limit is not None else None
            if keep is not None:  # later layers compute only the leading positions: causal, so they stay exact
                x = x[:, :keep]
        x = rms_norm(x, self.norm, eps)
        return x if return_hidden else linear(x, self.lm_head_weight())


def rope_scaling(cfg: ModelConfig) -> tuple[torch.Tensor | None, float]:
    """The RoPE frequencies [rotary_dim/2] float32 and the tables' magnitude: (None, 1.0) for plain
    RoPE; yarn's frequencies and attention factor (ModelConfig's rope_* fields) for rope_type 'yarn'."""
    if cfg.rope_type != "yarn":
        return None, 1.0
    inv_freq = yarn_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_position,
                             cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_truncate)
    return inv_freq, yarn_attention_factor(cfg.rope_factor, cfg.rope_mscale, cfg.rope_mscale_all_dim,
                                           cfg.rope_attention_factor)


def empty_resident_experts(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                           moe_backend: str = "loop") -> ResidentExperts:
    """Uninitialised resident experts for cfg (with their biases [L, E, 2I] and [L, E, H] where
    cfg.expert_bias, and the experts' activation)."""
    L, E, H, I = cfg.num_moe_layers, cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    biases = {}
    if cfg.expert_bias:
        biases = dict(b13=torch.empty(L, E, 2 * I, dtype=dtype, device=device),
                      b2=torch.empty(L, E, H, dtype=dtype, device=device))
    try:
        return ResidentExperts(hostmem.empty((L, E, 2 * I, H), dtype, device),
                               hostmem.empty((L, E, H, I), dtype, device), moe_backend,
                               act=expert_activation(cfg), **biases)
    except ValueError as exc:
        raise ConfigError(f"{cfg.model_type}: {exc}") from None


def load_expert_into(ckpt: Checkpoint, moe_layer: int, e: int, w13: torch.Tensor, w2: torch.Tensor,
                     biases: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Copy expert e of MoE layer `moe_layer` (the model's layer first_k_dense_replace + moe_layer) from
    the checkpoint (as its family stores it: Family.read_expert) into w13 [2I, H] (w1 then w3), w2 [H, I]
    and, where the experts have biases, biases = (b13 [2I], b2 [H])."""
    cfg = ckpt.config
    inter = cfg.intermediate_size
    w1, w3, w2_, bias = cfg.family.read_expert(ckpt, cfg, cfg.first_k_dense_replace + moe_layer, e)
    w13[:inter].copy_(w1)
    w13[inter:].copy_(w3)
    w2.copy_(w2_)
    if (biases is None) != (bias is None):
        raise ConfigError(f"{cfg.model_type}: the checkpoint's experts {'have' if bias is not None else 'lack'} "
                          "biases the model's experts do not hold")
    if biases is not None:
        biases[0].copy_(bias[0])
        biases[1].copy_(bias[1])


def init_random_(model: MoeModel, seed: int, std: float = 0.02) -> None:
    """Initialise weights for training: normal(std), residual outputs scaled by 1/sqrt(2L), norms 1."""
    g = torch.Generator().manual_seed(seed)
    out_std = std / math.sqrt(2 * model.cfg.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            s = out_std if name.endswith(("o_proj", "w2")) else std
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(s).to(p.dtype))


MixtralTransformer = MoeModel  # the name before other families were supported (an alias for one release)
