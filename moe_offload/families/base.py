"""A model family's adapter: what its config.json and checkpoint call things, and its router function.

The model core (moe_offload.model) is one family-neutral decoder: embeddings, grouped-query attention
(with the optional q/k norm, qkv bias and qkv clip of config.ModelConfig), a router, the routed experts
behind an ExpertBackend, an optional resident shared expert, norms and the LM head. A `Family` maps a
Hugging Face config.json onto ModelConfig's fields (`fields`), refuses the options the core does not
implement (`check`), writes the config back (`hf_dict`), names every tensor of its checkpoint
(`model_tensors`, `layer_tensors`, `expert_name`) and declares its router function (`routing`).

A new family is a subclass in one file of this package, registered there with `registry.register`
(and imported by the package's __init__). Class attributes hold the plain facts; override a method
only where the family differs from the Hugging Face layout the base class writes.

`cfg` below is a config.ModelConfig (not imported: config imports this package).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from ..errors import ConfigError
from .routing import Routing

# The three weights of an expert, as the model core calls them (Mixtral's names): w1 gate [I, H],
# w3 up [I, H], w2 down [H, I].
EXPERT_WEIGHTS = ("w1", "w3", "w2")


class Family:
    """The Hugging Face layout shared by Qwen2-MoE, Qwen3-MoE and OLMoE; subclasses set their facts."""

    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""  # transformers' class name, config.json "architectures"
    # config.json keys of the routed experts' count and width (ModelConfig's num_local_experts and
    # intermediate_size), and further keys without which the model cannot be built
    experts_key: ClassVar[str] = "num_experts"
    width_key: ClassVar[str] = "moe_intermediate_size"
    required_keys: ClassVar[tuple[str, ...]] = ()
    hidden_act: ClassVar[str] = "silu"
    # Hugging Face's defaults where config.json leaves a key out
    defaults: ClassVar[Mapping[str, Any]] = dict(rms_norm_eps=1e-6, rope_theta=1e4, bos_token_id=None,
                                                 eos_token_id=None, norm_topk_prob=False)
    prepends_bos: ClassVar[bool] = False  # whether the family's tokenizer starts a prompt with bos
    # attention variant: q/k RMSNorm "none" / "per_head" (over head_dim) / "full" (over the projection)
    qk_norm: ClassVar[str] = "none"
    # tensor names inside "model.layers.N.": the MoE block, its router and routed experts
    moe_prefix: ClassVar[str] = "mlp"
    router: ClassVar[str] = "gate"
    expert_weights: ClassVar[Mapping[str, str]] = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    # the shared expert (when ModelConfig.shared_expert_intermediate_size > 0) and its sigmoid gate
    # [1, H] (None: an ungated shared expert), inside the MoE block
    shared_expert: ClassVar[str] = "shared_expert"
    shared_expert_gate: ClassVar[str | None] = "shared_expert_gate"
    lm_head: ClassVar[str] = "lm_head.weight"  # also ignored in a tied checkpoint that carries it
    # RoPE types config.json may name (ModelConfig.rope_type); others are refused when parsed
    rope_types: ClassVar[tuple[str, ...]] = ("default",)
    # the dense first layers' MLP (ModelConfig.first_k_dense_replace), inside "model.layers.N."
    dense_mlp: ClassVar[str] = "mlp"
    # the RMSNorm weights stay float32 under a half-precision compute dtype, scaling in float32 before the
    # cast (transformers' _keep_in_fp32_modules for the family: GPT-OSS)
    norms_float32: ClassVar[bool] = False
    # the router's correction bias (ModelConfig.correction_bias), inside the MoE block
    correction_bias: ClassVar[str] = "gate.e_score_correction_bias"

    # --- config.json -> ModelConfig ---------------------------------------------------------------
    def count_keys(self, raw: Mapping[str, Any]) -> tuple[str, str]:
        """The keys of the routed experts' count and width in this config.json."""
        if self.experts_key not in raw and "num_local_experts" in raw:
            return "num_local_experts", self.width_key  # transformers' attribute_map spelling
        return self.experts_key, self.width_key

    def check(self, raw: Mapping[str, Any], source: str) -> None:
        """Refuse, in one line, the family's options that the model core does not implement."""
        if raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported for {self.model_type} "
                              "(only Mixtral's sliding_window is implemented); set it to false")
        if raw.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported for {self.model_type} (the hub "
                              "checkpoints have none); expected false")
        check_every_layer_sparse(raw, source)

    def fields(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """ModelConfig's family fields read from config.json (the shared ones are read by ModelConfig)."""
        return dict(sliding_window=None, norm_topk_prob=bool(raw.get("norm_topk_prob", self.defaults["norm_topk_prob"])),
                    shared_expert_intermediate_size=0, qk_norm=self.qk_norm, qkv_bias=False, clip_qkv=None)

    def hf_dict(self, cfg: Any) -> dict[str, Any]:
        """A config.json in the layout Hugging Face writes for this family (loadable by transformers)."""
        eos = list(cfg.eos_token_ids)
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            self.experts_key: cfg.num_local_experts, self.width_key: cfg.intermediate_size,
            "num_experts_per_tok": cfg.num_experts_per_tok, "norm_topk_prob": cfg.norm_topk_prob,
            "hidden_act": self.hidden_act, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "torch_dtype": cfg.torch_dtype,
            "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        }

    def unsupported(self, cfg: Any) -> str | None:
        """Why this parsed config cannot run (one line naming what is missing), or None: a family whose
        configs are read for `info` and `simulate` but whose model is not implemented says so here, and
        load() refuses it before reading a weight."""
        return None

    # whether a checkpoint in shipped_format() loads through quant.ckpt.parse_quantization_config (its
    # experts kept as stored, e.g. DeepSeek-V3's FP8) rather than the family setting expert_format itself
    shipped_loads: ClassVar[bool] = False

    def shipped_format(self, raw: Mapping[str, Any]) -> str | None:
        """The experts' format named by a quantization_config this family ships with, as `info` and the
        simulator size it ("fp8_block128", "mxfp4"), or None: the quantization_config is read as a hub or
        moe-offload one (quant.ckpt.parse_quantization_config). A family that names one sets expert_format
        in fields() itself where its checkpoints load as stored (DeepSeek-V3's FP8, GPT-OSS's MXFP4)."""
        return None

    def ignores(self, cfg: Any, name: str) -> bool:
        """Whether a checkpoint tensor the model does not use is skipped (e.g. shipped MTP layers)."""
        return False

    # --- the router function ------------------------------------------------------------------------
    def routing(self, cfg: Any) -> Routing:
        """Softmax over the experts, top-k, renormalised when norm_topk_prob (ModelConfig's router fields:
        scoring, groups and scale for the families that set them)."""
        return Routing(top_k=cfg.num_experts_per_tok, scoring=cfg.scoring, renormalize=cfg.norm_topk_prob,
                       n_group=cfg.n_group, topk_group=cfg.topk_group, scale=cfg.routed_scaling_factor)

    # --- checkpoint tensor names ----------------------------------------------------------------------
    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."

    def router_name(self, layer: int) -> str:
        """The router (gate) weight [E, H] of one layer."""
        return f"{self.layer_prefix(layer)}{self.moe_prefix}.{self.router}.weight"

    def expert_name(self, layer: int, expert: int, w: str) -> str:
        """Routed expert `expert` of `layer`, weight w in w1 (gate) / w3 (up) / w2 (down)."""
        return f"{self.layer_prefix(layer)}{self.moe_prefix}.experts.{expert}.{self.expert_weights[w]}.weight"

    def expert_tensors(self, cfg: Any, layer: int) -> dict[str, tuple[int, ...]]:
        """The checkpoint tensors that hold `layer`'s routed float experts, name -> shape: one tensor per
        expert and weight (expert_name). A family whose checkpoint fuses a layer's experts overrides this
        and read_expert."""
        i, h = cfg.intermediate_size, cfg.hidden_size
        return {self.expert_name(layer, e, w): shape for e in range(cfg.num_local_experts)
                for w, shape in (("w1", (i, h)), ("w2", (h, i)), ("w3", (i, h)))}

    def read_expert(self, ckpt: Any, cfg: Any, layer: int, e: int
                    ) -> tuple[Any, Any, Any, tuple[Any, Any] | None]:
        """Float expert e of `layer` from checkpoint `ckpt` (its tensor(name) and tensor_row(name, i)):
        (w1 [I, H], w3 [I, H], w2 [H, I], biases (b13 [2I], b2 [H]) or None), in the core's layout."""
        return (ckpt.tensor(self.expert_name(layer, e, "w1")), ckpt.tensor(self.expert_name(layer, e, "w3")),
                ckpt.tensor(self.expert_name(layer, e, "w2")), None)

    def model_tensors(self, cfg: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The tensors outside the layers: slot (a MoeModel attribute: embed_tokens, norm, lm_head) ->
        (checkpoint name, shape). A tied LM head has none of its own."""
        h = cfg.hidden_size
        out = {"embed_tokens": ("model.embed_tokens.weight", (cfg.vocab_size, h)), "norm": ("model.norm.weight", (h,))}
        if not cfg.tie_word_embeddings:
            out["lm_head"] = (self.lm_head, (cfg.vocab_size, h))
        return out

    def layer_tensors(self, cfg: Any, layer: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every dense tensor of one layer (not the routed experts): slot -> (checkpoint name, shape).

        The slots are the model core's names for them (attributes of model.transformer.DenseLayer):
        input_layernorm, post_attention_layernorm, q_proj, k_proj, v_proj, o_proj, q_bias, k_bias,
        v_bias, o_bias (cfg.o_bias), sinks (a learned sink logit per head, cfg.attention_sinks), q_norm,
        k_norm, gate (the router), gate_bias (its linear layer's bias, cfg.router_logit_bias), router_bias (a
        correction bias [E] that the router function adds for the choice, where cfg.correction_bias),
        shared_w1, shared_w3, shared_w2, shared_gate; a dense first layer (layer < first_k_dense_replace) has
        dense_w1, dense_w3, dense_w2 instead of the router and shared expert."""
        h, hd = cfg.hidden_size, cfg.head_dim
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        p, a = self.layer_prefix(layer), self.layer_prefix(layer) + "self_attn."
        out = {"input_layernorm": (p + "input_layernorm.weight", (h,)),
               "post_attention_layernorm": (p + "post_attention_layernorm.weight", (h,)),
               "q_proj": (a + "q_proj.weight", (q, h)), "k_proj": (a + "k_proj.weight", (kv, h)),
               "v_proj": (a + "v_proj.weight", (kv, h)), "o_proj": (a + "o_proj.weight", (h, q))}
        if cfg.qkv_bias:
            out.update(q_bias=(a + "q_proj.bias", (q,)), k_bias=(a + "k_proj.bias", (kv,)),
                       v_bias=(a + "v_proj.bias", (kv,)))
        if cfg.o_bias:
            out["o_bias"] = (a + "o_proj.bias", (h,))
        if cfg.attention_sinks:
            out["sinks"] = (a + "sinks", (cfg.num_attention_heads,))
        norm = {"none": None, "per_head": (hd, hd), "full": (q, kv)}[cfg.qk_norm]
        if norm:
            out.update(q_norm=(a + "q_norm.weight", (norm[0],)), k_norm=(a + "k_norm.weight", (norm[1],)))
        if layer < cfg.first_k_dense_replace:  # a dense first layer: its MLP, no router or experts
            di, m = cfg.dense_intermediate_size, f"{p}{self.dense_mlp}."
            out.update(dense_w1=(m + self.expert_weights["w1"] + ".weight", (di, h)),
                       dense_w3=(m + self.expert_weights["w3"] + ".weight", (di, h)),
                       dense_w2=(m + self.expert_weights["w2"] + ".weight", (h, di)))
            return out
        out["gate"] = (self.router_name(layer), (cfg.num_local_experts, h))
        if cfg.router_logit_bias:
            out["gate_bias"] = (self.router_name(layer).removesuffix(".weight") + ".bias", (cfg.num_local_experts,))
        if cfg.correction_bias:
            out["router_bias"] = (f"{p}{self.moe_prefix}.{self.correction_bias}", (cfg.num_local_experts,))
        si = cfg.shared_expert_intermediate_size
        if si:
            s = f"{p}{self.moe_prefix}.{self.shared_expert}."
            out.update(shared_w1=(s + self.expert_weights["w1"] + ".weight", (si, h)),
                       shared_w3=(s + self.expert_weights["w3"] + ".weight", (si, h)),
                       shared_w2=(s + self.expert_weights["w2"] + ".weight", (h, si)))
            if self.shared_expert_gate:
                out["shared_gate"] = (f"{p}{self.moe_prefix}.{self.shared_expert_gate}.weight", (1, h))
        return out

    def __repr__(self) -> str:
        return f"<family {self.model_type}>"


def is_mtp_layer(cfg: Any, name: str) -> bool:
    """A tensor of the multi-token-prediction layers shipped after the last layer (model.layers.L.*,
    L >= num_hidden_layers: DeepSeek-V3, GLM-4.5), which the model does not run."""
    if not name.startswith("model.layers."):
        return False
    index = name.split(".")[2]
    return index.isdigit() and int(index) >= cfg.num_hidden_layers


def rope_type(raw: Mapping[str, Any]) -> str:
    """The RoPE type of a config.json (rope_parameters / rope_scaling; 'default' when it names none)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling")
    if isinstance(params, dict):
        return str(params.get("rope_type", params.get("type", "default")))
    return "default"


def check_every_layer_sparse(raw: Mapping[str, Any], source: str) -> None:
    """Refuse dense MLP layers between the sparse ones (the Qwen families' mlp_only_layers and
    decoder_sparse_step): the model core runs an MoE block in every layer."""
    if raw.get("mlp_only_layers"):
        raise ConfigError(f"{source}: mlp_only_layers {raw['mlp_only_layers']} (dense MLP layers) is not "
                          "supported; every layer must be a sparse MoE layer (mlp_only_layers: [])")
    step = raw.get("decoder_sparse_step", 1)
    if step != 1:
        raise ConfigError(f"{source}: decoder_sparse_step {step!r} (dense MLP layers in between) is not "
                          "supported; expected 1 (every layer sparse)")
