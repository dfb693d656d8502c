"""Model config parsed from a Hugging Face config.json (any registered family: moe_offload.families),
and the validated runtime config."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import families
from .errors import ConfigError, MoeOffloadError
from .families import Family
from .families.base import rope_type
from .validate import json_object

# Keys without which a model cannot be built (besides the family's expert count and width); everything
# else has Hugging Face's default (the family's `defaults`).
_COMMON_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts_per_tok")
QK_NORMS = ("none", "per_head", "full")
# Fields added for the non-Mixtral families, with the value a Mixtral has; as_dict() leaves them out
# at these values so a Mixtral's dict (and the checkpoint fingerprint built on it) is unchanged.
_FAMILY_FIELDS = {"model_type": "mixtral", "norm_topk_prob": True, "shared_expert_intermediate_size": 0,
                  "qk_norm": "none", "qkv_bias": False, "clip_qkv": None,
                  # a quantized checkpoint (quant/ckpt.py); not part of the model's identity
                  "expert_format": None, "expert_group_size": 128, "expert_symmetric": False,
                  # the 2026 families (families/glm4_moe.py, deepseek_v3.py, gpt_oss.py)
                  "first_k_dense_replace": 0, "dense_intermediate_size": 0, "o_bias": False,
                  "partial_rotary_factor": 1.0, "scoring": "softmax", "n_group": 1, "topk_group": 1,
                  "routed_scaling_factor": 1.0, "correction_bias": False, "router_logit_bias": False,
                  "attention": "gqa", "q_lora_rank": 0, "kv_lora_rank": 0, "qk_nope_head_dim": 0,
                  "qk_rope_head_dim": 0, "v_head_dim": 0, "attention_sinks": False, "expert_bias": False,
                  "rope_type": "default", "sliding_window_layers": 0, "mtp_layers": 0, "shipped_format": None,
                  # yarn RoPE and DeepSeek's rope layout (families/deepseek_v3.py, deepseek_v2.py)
                  "rope_interleave": False, "rope_factor": 1.0, "rope_original_max_position": 0,
                  "rope_beta_fast": 32.0, "rope_beta_slow": 1.0, "rope_mscale": 0.0, "rope_mscale_all_dim": 0.0,
                  "rope_attention_factor": None, "rope_truncate": True,
                  # GPT-OSS (families/gpt_oss.py): per-layer attention kinds, the experts' clamped SwiGLU
                  "layer_types": (), "swiglu_limit": None, "swiglu_alpha": 1.702}
ATTENTIONS = ("gqa", "mla")
LAYER_TYPES = ("sliding_attention", "full_attention")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a sparse-MoE decoder, as read from config.json (hub and transformers-5 spellings).

    One description for every registered family (`family`: its adapter). `num_local_experts` and `intermediate_size` are
    always the ROUTED experts' count and width (Qwen's num_experts / moe_intermediate_size); a shared
    expert (Qwen2-MoE) has its own width and a sigmoid gate. qk_norm: 'per_head' RMSNorm over head_dim
    (Qwen3), 'full' over the whole q / k projection (OLMoE). norm_topk_prob: renormalise the top-k
    router probabilities (Mixtral always does).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    head_dim: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096 * 32
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    torch_dtype: str = "bfloat16"
    model_type: str = "mixtral"
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    qk_norm: str = "none"
    qkv_bias: bool = False
    clip_qkv: float | None = None
    expert_format: str | None = None  # 'int8' / 'int4' when the checkpoint stores packed experts
    expert_group_size: int = 128
    expert_symmetric: bool = False
    # Dense first layers (DeepSeek-V3, GLM-4.5 first_k_dense_replace): layers 0..k-1 run a dense MLP of
    # width dense_intermediate_size; the routed experts live in layers k..L-1 only, which the offload
    # engine indexes compactly as MoE layers 0..num_moe_layers-1.
    first_k_dense_replace: int = 0
    dense_intermediate_size: int = 0
    o_bias: bool = False  # a bias on o_proj (GPT-OSS)
    partial_rotary_factor: float = 1.0  # RoPE on the first head_dim * factor dims of each head (GLM-4.5)
    # the router function (families.Routing): scoring, groups, the weights' scale; correction_bias: a
    # per-expert bias [E] added for the choice only (e_score_correction_bias); router_logit_bias: a bias
    # of the router's linear layer (GPT-OSS)
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False
    router_logit_bias: bool = False
    # attention variant: "gqa" (grouped-query) or "mla" (DeepSeek's multi-head latent attention,
    # model/mla.py: head_dim = qk_nope_head_dim + qk_rope_head_dim); q_lora_rank 0 = no q-LoRA
    attention: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    attention_sinks: bool = False  # a learned sink logit per head (GPT-OSS)
    expert_bias: bool = False  # biases on the experts' gate/up [2I] and down [H] projections (GPT-OSS)
    rope_type: str = "default"  # or "yarn" (the rope_* fields below) where the family accepts it
    sliding_window_layers: int = 0  # layers with a sliding window when only some have one (GPT-OSS)
    mtp_layers: int = 0  # multi-token-prediction layers shipped after the last layer: not run (ignored)
    shipped_format: str | None = None  # the experts' format as published ("fp8_block128", "mxfp4"), for `info`
    # MLA's rope key and query dims pair up as (0, 1), (2, 3), ... (DeepSeek's layout; False: the two halves)
    rope_interleave: bool = False
    # yarn RoPE (rope_type "yarn", arXiv 2309.00071; model/layers.yarn_inv_freq): the context's stretch
    # factor, the pretraining context and the ramp's ends in turns (beta_fast / beta_slow, rounded outwards
    # when rope_truncate); the cos/sin tables' magnitude (rope_attention_factor, else
    # yarn_mscale(factor, rope_mscale) / yarn_mscale(factor, rope_mscale_all_dim) where both are set, else
    # yarn_mscale(factor)); MLA's softmax scale also takes yarn_mscale(factor, rope_mscale_all_dim) ** 2
    rope_factor: float = 1.0
    rope_original_max_position: int = 0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 0.0  # 0: not set
    rope_mscale_all_dim: float = 0.0
    rope_attention_factor: float | None = None
    rope_truncate: bool = True
    # Per-layer attention kinds ("sliding_attention" / "full_attention", config.json's layer_types); empty:
    # every layer attends alike (sliding_window, when set, applies to all). See window().
    layer_types: tuple[str, ...] = ()
    # The experts' activation: None is SwiGLU, silu(gate) * up; a limit is GPT-OSS's clamped SwiGLU, gate
    # clamped above at the limit and up to [-limit, limit], then gate * sigmoid(swiglu_alpha gate) * (up + 1)
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "num_local_experts",
                     "num_experts_per_tok", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})")
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ConfigError("config.json: rope_theta and rms_norm_eps must be positive")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"config.json: sliding_window must be positive or null, got {self.sliding_window}")
        if self.torch_dtype not in DTYPES:
            raise ConfigError(f"config.json: dtype {self.torch_dtype!r} is not one of {sorted(DTYPES)}")
        self._check_family()

    def _check_family(self) -> None:
        if families.find(self.model_type) is None:
            raise ConfigError(f"config.json: model_type {self.model_type!r} is not supported; "
                              f"use one of {families.supported()}")
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"config.json: qk_norm {self.qk_norm!r} is not one of {list(QK_NORMS)}")
        s = self.shared_expert_intermediate_size
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError(f"config.json: shared_expert_intermediate_size must be an integer >= 0, got {s!r}")
        if not isinstance(self.first_k_dense_replace, int) or not 0 <= self.first_k_dense_replace < self.num_hidden_layers:
            raise ConfigError(f"config.json: first_k_dense_replace must be in [0, {self.num_hidden_layers - 1}] "
                              f"(at least one MoE layer), got {self.first_k_dense_replace!r}")
        if self.first_k_dense_replace and not self.dense_intermediate_size > 0:
            raise ConfigError("config.json: intermediate_size (the dense layers' MLP width) must be a positive "
                              f"integer with first_k_dense_replace {self.first_k_dense_replace}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"config.json: attention {self.attention!r} is not one of {list(ATTENTIONS)}")
        if not 0 < self.partial_rotary_factor <= 1 or int(self.head_dim * self.partial_rotary_factor) % 2:
            raise ConfigError(f"config.json: partial_rotary_factor must be in (0, 1] with an even rotary width, "
                              f"got {self.partial_rotary_factor!r} (head_dim {self.head_dim})")
        if self.n_group < 1 or self.num_local_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"config.json: n_group {self.n_group} must divide the {self.num_local_experts} routed "
                              f"experts and topk_group {self.topk_group} be in [1, n_group]")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ConfigError(f"config.json: clip_qkv must be positive or null, got {self.clip_qkv!r}")
        if self.attention == "mla":
            dims = dict(kv_lora_rank=self.kv_lora_rank, qk_rope_head_dim=self.qk_rope_head_dim,
                        v_head_dim=self.v_head_dim)
            bad = [f"{k} {v!r}" for k, v in dims.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
            if bad or self.qk_rope_head_dim % 2 or self.q_lora_rank < 0 or self.qk_nope_head_dim < 0:
                raise ConfigError(f"config.json: multi-head latent attention needs positive kv_lora_rank, v_head_dim "
                                  f"and an even qk_rope_head_dim, q_lora_rank and qk_nope_head_dim >= 0; got "
                                  f"{', '.join(bad) or dims}")
        if self.layer_types and (len(self.layer_types) != self.num_hidden_layers
                                 or not set(self.layer_types) <= set(LAYER_TYPES)):
            raise ConfigError(f"config.json: layer_types must name {self.num_hidden_layers} layers, each one of "
                              f"{list(LAYER_TYPES)}; got {list(self.layer_types)}")
        if self.swiglu_limit is not None and not self.swiglu_limit > 0:
            raise ConfigError(f"config.json: swiglu_limit must be positive, got {self.swiglu_limit!r}")
        if self.rope_type == "yarn" and not (self.rope_factor > 0 and self.rope_original_max_position > 0):
            raise ConfigError(f"config.json: yarn RoPE needs a positive factor and original_max_position_embeddings, "
                              f"got {self.rope_factor!r} and {self.rope_original_max_position!r}")

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        """Layers with routed experts (all but the first_k_dense_replace dense ones): the offload engine's
        layer count; its layer m is the model's layer first_k_dense_replace + m."""
        return self.num_hidden_layers - self.first_k_dense_replace

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`'s attention (None: it sees every earlier key): sliding_window,
        for every layer or (layer_types) for the sliding_attention ones."""
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each q/k head that RoPE rotates (head_dim * partial_rotary_factor); MLA
        rotates its rope part only (qk_rope_head_dim: the trailing dims of a query head and the shared
        rope key)."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def expert_params(self) -> int:
        """Parameters of one expert (w1, w3: [I, H]; w2: [H, I]; plus biases [2I] and [H] where it has them)."""
        h, i = self.hidden_size, self.intermediate_size
        return 3 * h * i + (2 * i + h if self.expert_bias else 0)

    @property
    def attention_params(self) -> int:
        """Parameters of one layer's attention (projections, biases, q/k norms, sinks; MLA's LoRA factors)."""
        h, hd, nh, nkv = self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads
        if self.attention == "mla":
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nh * qk) if self.q_lora_rank else h * nh * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv += self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv + nh * self.v_head_dim * h
        q, kv = nh * hd, nkv * hd
        attn = h * hd * (2 * nh + 2 * nkv) + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        attn += {"none": 0, "per_head": 2 * hd, "full": q + kv}[self.qk_norm]
        return attn + nh * self.attention_sinks

    @property
    def kv_elements_per_token(self) -> int:
        """KV-cache elements per token over all layers (times the dtype size for bytes): K and V heads,
        or for MLA the compressed latent plus the rope key (what an absorbed MLA cache holds)."""
        if self.attention == "mla":
            return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim)
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    @property
    def dense_params(self) -> int:
        """Every parameter that is not inside a routed expert (attention, norms, routers, dense MLPs of the
        first layers, shared experts, embeddings)."""
        h = self.hidden_size
        si = self.shared_expert_intermediate_size
        shared = (3 * h * si + (h if self.family.shared_expert_gate else 0)) if si else 0
        E = self.num_local_experts
        router = E * h + E * self.router_logit_bias + E * self.correction_bias
        per_layer = self.attention_params + 2 * h
        dense_mlp = self.first_k_dense_replace * 3 * h * self.dense_intermediate_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return (self.num_hidden_layers * per_layer + self.num_moe_layers * (router + shared) + dense_mlp
                + self.vocab_size * h + h + head)

    @property
    def total_params(self) -> int:
        return self.dense_params + self.num_moe_layers * self.num_local_experts * self.expert_params

    @property
    def active_params(self) -> int:
        """Parameters a token uses: the dense ones (both embedding tables counted) plus top-k routed experts."""
        return self.dense_params + self.num_moe_layers * self.num_experts_per_tok * self.expert_params

    # --- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        family = families.find(model_type)
        if family is None:
            raise ConfigError(f"{source}: model_type is {model_type!r}; supported: {families.supported()}")
        experts_key, width_key = family.count_keys(raw)
        missing = [k for k in _COMMON_KEYS + (experts_key, width_key) + family.required_keys if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required key(s): {', '.join(missing)}")
        quant = (None, 128, False)
        shipped = family.shipped_format(raw)  # a format the family ships in (sized for projections)
        if raw.get("quantization_config") and (shipped is None or family.shipped_loads):
            from .quant.ckpt import parse_quantization_config

            quant = parse_quantization_config(raw["quantization_config"], source)
        act = raw.get("hidden_act", family.hidden_act)
        if act != family.hidden_act:
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported ({model_type} uses {family.hidden_act!r})")
        family.check(raw, source)
        d = family.defaults
        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or (raw["hidden_size"] // heads if heads else 0)
        eos = raw.get("eos_token_id", d["eos_token_id"])
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        try:
            kwargs = dict(
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                intermediate_size=raw[width_key],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads") or heads,
                num_local_experts=raw[experts_key],
                num_experts_per_tok=raw["num_experts_per_tok"],
                head_dim=head_dim,
                rope_theta=float(_rope_theta(raw, source, d["rope_theta"], family.rope_types)),
                rms_norm_eps=float(raw.get("rms_norm_eps", d["rms_norm_eps"])),
                max_position_embeddings=raw.get("max_position_embeddings", 4096 * 32),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                bos_token_id=raw.get("bos_token_id", d["bos_token_id"]),
                eos_token_ids=eos_ids,
                torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
                model_type=model_type,
                expert_format=quant[0], expert_group_size=quant[1], expert_symmetric=quant[2],
                shipped_format=shipped,
            )
            kwargs.update(family.fields(raw))  # sliding_window, norm_topk_prob, shared expert, q/k norm, ... (may set head_dim)
            if kwargs.get("rope_type") == "yarn":
                kwargs.update(_yarn_fields(raw, kwargs["max_position_embeddings"]))
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("config.json", source, 1)) from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: malformed value: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        raw = json_object(path, "file not found (a Hugging Face MoE model folder has a config.json)", ConfigError)
        return cls.from_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json in the layout Hugging Face writes for this family (loadable by transformers)."""
        return self.family.hf_dict(self)

    @property
    def family(self) -> Family:
        """This model's family adapter (tensor names, router function, config.json layout)."""
        return families.get(self.model_type)

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    @property
    def prepends_bos(self) -> bool:
        """Whether prompts start with bos_token_id: Mixtral's tokenizer adds it; the Qwen and OLMoE
        tokenizers add none (their config.json's bos_token_id is <|endoftext|>)."""
        return self.family.prepends_bos

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name, mixtral_value in _FAMILY_FIELDS.items():
            if out[name] == mixtral_value:
                del out[name]  # a Mixtral's dict is unchanged by the family fields
        return out


MixtralConfig = ModelConfig  # the name before other families were supported (an alias for one release)


def _rope_theta(raw: dict[str, Any], source: str, default: float = 1e6, parsed: tuple[str, ...] = ("default",)) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling")
    if isinstance(params, dict):
        if rope_type(raw) not in parsed:
            raise ConfigError(f"{source}: rope type {rope_type(raw)!r} is not supported "
                              f"(supported: {', '.join(parsed)})")
        if "rope_theta" in params:
            return params["rope_theta"]
    return raw.get("rope_theta", default)


def _yarn_fields(raw: dict[str, Any], max_position_embeddings: int) -> dict[str, Any]:
    """ModelConfig's rope_* fields from a yarn rope_scaling / rope_parameters (hub and transformers-5
    spellings; Hugging Face's defaults where a key is left out: factor from the two context lengths)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    original = params.get("original_max_position_embeddings") or max_position_embeddings
    factor = params.get("factor") or max_position_embeddings / original
    af = params.get("attention_factor")
    return dict(rope_factor=float(factor), rope_original_max_position=int(original),
                rope_beta_fast=float(params.get("beta_fast") or 32), rope_beta_slow=float(params.get("beta_slow") or 1),
                rope_mscale=float(params.get("mscale") or 0),
                rope_mscale_all_dim=float(params.get("mscale_all_dim") or 0),
                rope_attention_factor=None if af is None else float(af),
                rope_truncate=bool(params.get("truncate", True)))


@dataclass(frozen=True)
class RuntimeConfig:
    """How a model runs: resolved device and dtype, context length, MoE backend."""

    device: torch.device
    dtype: torch.dtype
    max_seq_len: int
    moe_backend: str = "loop"
    show_progress: bool = False
    expert_format: str | None = None  # "int8" / "int4": quantized expert store; None: the compute dtype

    def __post_init__(self) -> None:
        if not isinstance(self.max_seq_len, int) or self.max_seq_len <= 0:
            raise MoeOffloadError(f"max_seq_len must be a positive integer, got {self.max_seq_len!r}")


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; a named device must exist."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise MoeOffloadError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MoeOffloadError(f"device {device!r} is not valid; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MoeOffloadError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MoeOffloadError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise MoeOffloadError(f"device {device!r} is not supported; use 'auto', 'cpu' or 'cuda[:N]'")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, checkpoint_dtype: str,
                  quantized_file_bf16: bool = False) -> torch.dtype:
    """'auto' -> float32 on cpu, or bfloat16 there for a quantized file where the caller says the CPU runs
    its experts on 8-bit activation kernels (`quantized_file_bf16`: a GGUF on a CPU with AVX512-VNNI;
    float32 compute would take the exact-activation paths, and K-quants / MXFP4 have none but
    dequantize-then-matmul: a Q4_K_M 734M model decodes 1.4 tok/s in float32, 85 in bfloat16); on cuda
    the checkpoint's half dtype (bfloat16 where supported)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise MoeOffloadError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if quantized_file_bf16 else torch.float32
        if checkpoint_dtype == "float16":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise MoeOffloadError(f"dtype {dtype!r} is not supported; use 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[dtype]
