"""The MoE decoder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): embeddings, attention with a static KV cache,
the MoE boundary (plus Qwen2-MoE's resident shared expert), LM head."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint, attention_extra_shapes, expert_name, router_name, shared_expert_names
from ..config import ModelConfig
from .layers import apply_rope, attention, rms_norm, rope_tables
from .moe import ExpertBackend, ResidentExperts, route
from .observers import LayerObserver


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
    """Preallocated keys/values for every layer: [L, B, n_kv, max_seq_len, head_dim] each."""

    def __init__(self, cfg: ModelConfig, batch: int, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len

    def rows(self, start: int, stop: int) -> "KVCache":
        """A KVCache over batch rows start..stop-1 that shares this one's storage."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.max_seq_len = self.k[:, start:stop], self.v[:, start:stop], self.max_seq_len
        return view

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | RowPositions
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv, T, hd] at positions start..start+T-1; return views of 0..start+T-1.
        With RowPositions (T == 1), row b is written at pos[b] and the views cover 0..span-1."""
        if isinstance(start, RowPositions):
            self.k[layer][start.rows, :, start.pos] = k[:, :, 0]  # [B, n_kv, hd] at (b, pos[b])
            self.v[layer][start.rows, :, start.pos] = v[:, :, 0]
            return self.k[layer, :, :, :start.span], self.v[layer, :, :, :start.span]
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class DenseLayer(nn.Module):
    """The non-expert weights of one decoder layer (names follow the checkpoint)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd

        def p(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)

        self.input_layernorm = p(h)
        self.post_attention_layernorm = p(h)
        self.qkv_proj = p(q + 2 * kv, h)  # q, k, v projections fused: one GEMM per layer
        self.o_proj = p(h, q)
        self.gate = p(cfg.num_local_experts, h)
        self.q_size, self.kv_size = q, kv
        norm = {"none": None, "per_head": (hd, hd), "full": (q, kv)}[cfg.qk_norm]
        self.qkv_bias = p(q + 2 * kv) if cfg.qkv_bias else None  # [q + 2 kv], fused as qkv_proj is
        self.q_norm = p(norm[0]) if norm else None
        self.k_norm = p(norm[1]) if norm else None
        si = self.shared_size = cfg.shared_expert_intermediate_size
        # Qwen2-MoE's shared expert runs for every token, so it stays on the device with the dense weights.
        self.shared_w13 = p(2 * si, h) if si else None  # gate then up: [2 Is, H]
        self.shared_w2 = p(h, si) if si else None  # [H, Is]
        self.shared_gate = p(1, h) if si else None  # [1, H], sigmoid gate of the shared expert

    # Views of the fused projection under the checkpoint's names.
    @property
    def q_proj(self) -> torch.Tensor:
        return self.qkv_proj[: self.q_size]

    @property
    def k_proj(self) -> torch.Tensor:
        return self.qkv_proj[self.q_size: self.q_size + self.kv_size]

    @property
    def v_proj(self) -> torch.Tensor:
        return self.qkv_proj[self.q_size + self.kv_size:]

    @property
    def q_bias(self) -> torch.Tensor:
        return self.qkv_bias[: self.q_size]

    @property
    def k_bias(self) -> torch.Tensor:
        return self.qkv_bias[self.q_size: self.q_size + self.kv_size]

    @property
    def v_bias(self) -> torch.Tensor:
        return self.qkv_bias[self.q_size + self.kv_size:]

    @property
    def shared_w1(self) -> torch.Tensor:
        return self.shared_w13[: self.shared_size]

    @property
    def shared_w3(self) -> torch.Tensor:
        return self.shared_w13[self.shared_size:]

    CHECKPOINT_NAMES = {
        "input_layernorm": "input_layernorm.weight",
        "post_attention_layernorm": "post_attention_layernorm.weight",
        "q_proj": "self_attn.q_proj.weight",
        "k_proj": "self_attn.k_proj.weight",
        "v_proj": "self_attn.v_proj.weight",
        "o_proj": "self_attn.o_proj.weight",
        "gate": "block_sparse_moe.gate.weight",
    }

    @staticmethod
    def checkpoint_names(cfg: ModelConfig, layer: int) -> dict[str, str]:
        """attribute (or view) -> full checkpoint name of layer `layer`, in the family's hub layout."""
        p = f"model.layers.{layer}."
        names = {attr: p + suffix for attr, suffix in DenseLayer.CHECKPOINT_NAMES.items() if attr != "gate"}
        names["gate"] = router_name(layer, cfg.model_type)
        attrs = {"self_attn.q_proj.bias": "q_bias", "self_attn.k_proj.bias": "k_bias",
                 "self_attn.v_proj.bias": "v_bias", "self_attn.q_norm.weight": "q_norm",
                 "self_attn.k_norm.weight": "k_norm"}
        names.update({attrs[suffix]: p + suffix for suffix in attention_extra_shapes(cfg)})
        if cfg.has_shared_expert:
            shared = shared_expert_names(layer)
            names.update({"shared_w1": shared["w1"], "shared_w3": shared["w3"], "shared_w2": shared["w2"],
                          "shared_gate": shared["gate"]})
        return names


class MoeModel(nn.Module):
    """A Mixtral decoder whose expert computation is delegated to an `ExpertBackend`.

    `forward(input_ids [B, T], start_pos, cache)` -> logits [B, T, V]. With a KVCache it serves
    prefill (T > 1) and decode (T == 1); without one it attends within the given tokens (training).
    """

    def __init__(self, cfg: ModelConfig, experts: ExpertBackend, *, dtype: torch.dtype,
                 device: torch.device, max_seq_len: int):
        super().__init__()
        self.cfg = cfg
        self.dtype, self.device, self.max_seq_len = dtype, torch.device(device), max_seq_len
        h, v = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = nn.Parameter(torch.empty(v, h, dtype=dtype, device=device), requires_grad=False)
        self.layers = nn.ModuleList(DenseLayer(cfg, dtype, self.device) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.Parameter(torch.empty(h, dtype=dtype, device=device), requires_grad=False)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(
            torch.empty(v, h, dtype=dtype, device=device), requires_grad=False)
        self.experts = experts
        # Everything outside the model that watches or steers a forward pass (see observers.py).
        self.observers: list[LayerObserver] = []
        # The KV cache of the forward pass in progress (None outside one): what observers that peek at
        # a later layer's attention read (M2R2Predictor with attention-peek adapters).
        self.active_cache: KVCache | None = None
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, max_seq_len, dtype, self.device)
        self.register_buffer("rope_cos", cos, persistent=False)  # [P, hd]
        self.register_buffer("rope_sin", sin, persistent=False)

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
        n_expert = cfg.num_hidden_layers * cfg.num_local_experts if isinstance(experts, ResidentExperts) else 0
        with torch.no_grad(), tqdm(total=len(names) + n_expert, desc="loading weights", unit="tensor",
                                   disable=not show_progress) as bar:
            for name, param in names.items():
                param.copy_(ckpt.tensor(name, dtype, device))
                bar.update()
            if n_expert:
                for layer in range(cfg.num_hidden_layers):
                    for e in range(cfg.num_local_experts):
                        load_expert_into(ckpt, layer, e, experts.w13[layer, e], experts.w2[layer, e])
                        bar.update()
        model.source_fingerprint = ckpt.fingerprint()  # checkpoint identity (predict.model_fingerprint)
        ckpt.close()
        return model

    def _dense_names(self) -> dict[str, nn.Parameter]:
        names = {"model.embed_tokens.weight": self.embed_tokens, "model.norm.weight": self.norm}
        if self.lm_head is not None:
            names["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            for attr, name in DenseLayer.checkpoint_names(self.cfg, i).items():
                names[name] = getattr(layer, attr)
        return names

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Every weight under its hub checkpoint name (experts must be resident)."""
        out = {name: p.detach().clone() for name, p in self._dense_names().items()}
        assert isinstance(self.experts, ResidentExperts), "checkpoint_tensors needs resident experts"
        inter, family = self.cfg.intermediate_size, self.cfg.model_type
        for layer in range(self.cfg.num_hidden_layers):
            for e in range(self.cfg.num_local_experts):
                w13 = self.experts.w13[layer, e].detach()
                out[expert_name(layer, e, "w1", family)] = w13[:inter]
                out[expert_name(layer, e, "w3", family)] = w13[inter:]
                out[expert_name(layer, e, "w2", family)] = self.experts.w2[layer, e].detach()
        return out

    # --- compute --------------------------------------------------------------------------------
    def lm_head_weight(self) -> torch.Tensor:
        """The LM head's weight [V, H] (the embedding when tied)."""
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def moe_block(self, h: torch.Tensor, layer: int, start_pos: int = 0) -> torch.Tensor:
        """The expert half of layer `layer`: h [..., H] (post-attention normed) -> [..., H]."""
        return self._moe(h, layer, start_pos)[0]

    def _moe(self, h: torch.Tensor, layer: int, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = h.reshape(-1, h.shape[-1])  # [N, H]
        logits = F.linear(x, self.layers[layer].gate)  # [N, E]
        weights, ids = route(logits, self.cfg.num_experts_per_tok, self.cfg.norm_topk_prob)  # [N, k] each
        for ob in self.observers:
            replaced = ob.on_routing(layer, ids, weights, logits, start_pos)
            if replaced is not None:
                ids, weights = replaced
        y = self.experts(layer, x, ids, weights)  # [N, H]
        if self.cfg.has_shared_expert:
            y = y + self.shared_expert(x, layer)
        return y.reshape(h.shape), logits

    def shared_expert(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Qwen2-MoE's shared expert of layer `layer` times its sigmoid gate: x [N, H] -> [N, H]."""
        w = self.layers[layer]
        gate, up = F.linear(x, w.shared_w13).chunk(2, dim=-1)  # [N, Is] each
        out = F.linear(F.silu(gate) * up, w.shared_w2)  # [N, H]
        return torch.sigmoid(F.linear(x, w.shared_gate)) * out  # [N, 1] * [N, H]

    def _qkv(self, x: torch.Tensor, w: DenseLayer) -> torch.Tensor:
        """x [B, T, H] -> q, k, v heads [B, T, nh + 2 nkv, hd], q/k normed per the family (before RoPE)."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        b, t, _ = x.shape
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        qkv = F.linear(x, w.qkv_proj, w.qkv_bias)  # [B, T, q + 2 kv]
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

    def _project(self, x: torch.Tensor, layer: int, start: int | RowPositions
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] (normed) -> q [B, nh, T, hd], k, v [B, nkv, T, hd], RoPE applied at the positions."""
        cfg = self.cfg
        t, nh, nkv = x.shape[1], cfg.num_attention_heads, cfg.num_key_value_heads
        qkv = self._qkv(x, self.layers[layer])  # [B, T, nh + 2 nkv, hd]
        if isinstance(start, RowPositions):  # batched decode: each row at its own position
            cos, sin = self.rope_cos[start.pos][:, None, None], self.rope_sin[start.pos][:, None, None]  # [B, 1, 1, hd]
        else:
            cos, sin = self.rope_cos[start:start + t, None], self.rope_sin[start:start + t, None]  # [T, 1, hd]
        qk = apply_rope(qkv[:, :, : nh + nkv], cos, sin).transpose(1, 2)  # q and k heads at once: [B, nh+nkv, T, hd]
        return qk[:, :nh], qk[:, nh:], qkv[:, :, nh + nkv:].transpose(1, 2)

    def _attention(self, x: torch.Tensor, layer: int, start: int | RowPositions, cache: KVCache | None
                   ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self._project(x, layer, start)  # [B, nh, T, hd], [B, nkv, T, hd] x2
        if cache is not None:
            k, v = cache.update(layer, k, v, start)  # [B, n_kv, start+T (or span), hd]
        q_start = start.pos if isinstance(start, RowPositions) else start
        o = attention(q, k, v, q_start, self.cfg.sliding_window)  # [B, nh, T, hd]
        return F.linear(o.transpose(1, 2).reshape(b, t, -1), self.layers[layer].o_proj)

    def peek_attention(self, layer: int, x: torch.Tensor, start: int | RowPositions, cache: KVCache | None,
                       real_until: int | None = None) -> torch.Tensor:
        """Layer `layer`'s attention output [B, T, H] for an *estimated* residual x [B, T, H] entering it,
        without touching the cache (the M2R2 predictor's attention peek, see predict/accelerator.py).

        Keys and values at positions before `real_until` (default: start, per row with RowPositions)
        are the cache's real ones for `layer`; the chunk's own positions from there on use x's, causally.
        real_until past the chunk (a cache already holding the chunk's real K/V, as in training) leaves
        each position only its own estimated key besides the real earlier ones: what decode sees."""
        cfg, w = self.cfg, self.layers[layer]
        b, t, _ = x.shape
        nkv, hd, win = cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window
        if real_until is not None and isinstance(start, int) and real_until < start:
            raise ValueError(f"peek_attention: real_until {real_until} is before the chunk's start {start}; "
                             "positions between them would be neither real nor estimated")
        rep = cfg.num_attention_heads // nkv
        q, k, v = self._project(rms_norm(x, w.input_layernorm, cfg.rms_norm_eps), layer, start)
        if isinstance(start, RowPositions):
            qpos = start.pos.view(b, 1)  # [B, T=1]
            limit = qpos if real_until is None else qpos.clamp_max(real_until)
            span = start.span
        else:
            qpos = torch.arange(start, start + t, device=x.device).view(1, t)  # [1, T]
            limit = qpos.clamp_max(start if real_until is None else real_until)
            span = start if real_until is None else max(start, min(real_until, start + t))
        qg = q.reshape(b, nkv, rep * t, hd) / math.sqrt(hd)  # [B, nkv, rep*T, hd]: heads grouped by their kv head
        first = 0  # the first cached position any row can see (the sliding window drops older ones)
        if win is not None and isinstance(start, int):
            first = max(0, min(span, start - win + 1))
        if cache is not None and span > first:
            kh, vh = cache.k[layer, :, :, first:span], cache.v[layer, :, :, first:span]  # [B, nkv, S, hd], cache dtype
        else:
            kh = vh = x.new_zeros(b, nkv, 0, hd, dtype=q.dtype)
        kpos = first + torch.arange(kh.shape[2], device=x.device).view(1, 1, -1)  # [1, 1, S]
        seen = kpos < limit[..., None]  # [B|1, T, S]: real earlier keys
        own_pos = qpos[..., None, :]  # [B|1, 1, T]: the chunk's own key positions
        own = (own_pos <= qpos[..., None]) & (own_pos >= limit[..., None])  # estimated keys not covered by real ones
        if win is not None:
            seen &= kpos > qpos[..., None] - win
            own &= own_pos > qpos[..., None] - win
        s_h = (qg.to(kh.dtype) @ kh.transpose(-1, -2)).float().view(b, nkv, rep, t, -1)  # [B, nkv, rep, T, S]
        s_o = (qg @ k.transpose(-1, -2)).float().view(b, nkv, rep, t, t)  # [B, nkv, rep, T, T]
        s_h = s_h.masked_fill(~seen[:, None, None], float("-inf"))
        s_o = s_o.masked_fill(~own[:, None, None], float("-inf"))
        p = torch.softmax(torch.cat([s_h, s_o], dim=-1), dim=-1)  # [B, nkv, rep, T, S + T]
        S = kh.shape[2]
        o = ((p[..., :S].reshape(b, nkv, rep * t, S).to(vh.dtype) @ vh).float()
             + p[..., S:].reshape(b, nkv, rep * t, t) @ v.float())  # [B, nkv, rep*T, hd] float32
        o = o.view(b, nkv * rep, t, hd).transpose(1, 2).reshape(b, t, -1)  # [B, T, nh*hd]
        return F.linear(o.to(w.o_proj.dtype), w.o_proj)

    def forward(self, input_ids: torch.Tensor, start_pos: int | RowPositions = 0, cache: KVCache | None = None,
                router_logits: list[torch.Tensor] | None = None, return_hidden: bool = False,
                host_ids: Sequence[int] | None = None) -> torch.Tensor:
        """input_ids [B, T] at positions start_pos.. -> logits [B, T, V] (or final hidden [B, T, H]); fewer
        than T rows when a speculative verify rule of the expert backend dropped trailing positions.
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
        # a speculative verify pass (one row, several positions) may drop trailing positions per layer
        verify = input_ids.shape[0] == 1 and input_ids.shape[1] > 1
        kept_rows = getattr(self.experts, "pop_kept_rows", None) if verify else None
        for i, layer in enumerate(self.layers):
            x = x + self._attention(rms_norm(x, layer.input_layernorm, eps), i, start_pos, cache)
            if observers:
                flat = x.reshape(-1, x.shape[-1])  # [N, H]: the residual entering layer i's MoE
                for ob in observers:
                    ob.on_residual(i, flat, start_pos)
            y, logits = self._moe(rms_norm(x, layer.post_attention_layernorm, eps), i, start_pos)
            if router_logits is not None:
                router_logits.append(logits)
            x = x + y
            keep = kept_rows() if kept_rows is not None else None
            if keep is not None:  # a verify pass dropped its trailing positions: causal, so the rest is exact
                x = x[:, :keep]
        x = rms_norm(x, self.norm, eps)
        return x if return_hidden else F.linear(x, self.lm_head_weight())


def empty_resident_experts(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                           moe_backend: str = "loop") -> ResidentExperts:
    L, E, H, I = cfg.num_hidden_layers, cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    return ResidentExperts(torch.empty(L, E, 2 * I, H, dtype=dtype, device=device),
                           torch.empty(L, E, H, I, dtype=dtype, device=device), moe_backend)


def load_expert_into(ckpt: Checkpoint, layer: int, e: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """Copy one expert from the checkpoint into w13 [2I, H] (w1 then w3) and w2 [H, I]."""
    inter, family = ckpt.config.intermediate_size, ckpt.config.model_type
    w13[:inter].copy_(ckpt.tensor(expert_name(layer, e, "w1", family)))
    w13[inter:].copy_(ckpt.tensor(expert_name(layer, e, "w3", family)))
    w2.copy_(ckpt.tensor(expert_name(layer, e, "w2", family)))


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
