"""Model config parsed from a Hugging Face config.json (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), and the
validated runtime config."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, MoeOffloadError
from .validate import json_object

# Keys without which a model cannot be built; everything else has Hugging Face's default.
_COMMON_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts_per_tok")
# model_type -> (routed-expert count key, routed-expert width key, extra required keys)
FAMILY_KEYS = {
    "mixtral": ("num_local_experts", "intermediate_size", ()),
    "qwen2_moe": ("num_experts", "moe_intermediate_size", ("shared_expert_intermediate_size",)),
    "qwen3_moe": ("num_experts", "moe_intermediate_size", ()),
    "olmoe": ("num_experts", "intermediate_size", ()),
}
_REQUIRED_KEYS = _COMMON_KEYS + ("intermediate_size", "num_local_experts")  # Mixtral's (kept for callers)
QK_NORMS = ("none", "per_head", "full")
# Hugging Face's defaults where a family's config.json leaves a key out.
_FAMILY_DEFAULTS = {
    "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1e6, bos=1, eos=2, norm_topk_prob=True),
    "qwen2_moe": dict(rms_norm_eps=1e-6, rope_theta=1e4, bos=None, eos=None, norm_topk_prob=False),
    "qwen3_moe": dict(rms_norm_eps=1e-6, rope_theta=1e4, bos=None, eos=None, norm_topk_prob=False),
    "olmoe": dict(rms_norm_eps=1e-5, rope_theta=1e4, bos=None, eos=50279, norm_topk_prob=False),
}
_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
# Fields added for the non-Mixtral families, with the value a Mixtral has; as_dict() leaves them out
# at these values so a Mixtral's dict (and the checkpoint fingerprint built on it) is unchanged.
_FAMILY_FIELDS = {"model_type": "mixtral", "norm_topk_prob": True, "shared_expert_intermediate_size": 0,
                  "qk_norm": "none", "qkv_bias": False, "clip_qkv": None,
                  # a quantized checkpoint (quant/ckpt.py); not part of the model's identity
                  "expert_format": None, "expert_group_size": 128, "expert_symmetric": False}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a sparse-MoE decoder, as read from config.json (hub and transformers-5 spellings).

    One description for the families in FAMILY_KEYS. `num_local_experts` and `intermediate_size` are
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
        if self.model_type not in FAMILY_KEYS:
            raise ConfigError(f"config.json: model_type {self.model_type!r} is not supported; "
                              f"use one of {sorted(FAMILY_KEYS)}")
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"config.json: qk_norm {self.qk_norm!r} is not one of {list(QK_NORMS)}")
        s = self.shared_expert_intermediate_size
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ConfigError(f"config.json: shared_expert_intermediate_size must be an integer >= 0, got {s!r}")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ConfigError(f"config.json: clip_qkv must be positive or null, got {self.clip_qkv!r}")

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def expert_params(self) -> int:
        """Parameters of one expert (w1, w3: [I, H]; w2: [H, I])."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def dense_params(self) -> int:
        """Every parameter that is not inside an expert (attention, norms, routers, embeddings)."""
        h, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = h * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        attn += (q + 2 * kv) * self.qkv_bias + {"none": 0, "per_head": 2 * hd, "full": q + kv}[self.qk_norm]
        shared = (3 * h * self.shared_expert_intermediate_size + h) if self.shared_expert_intermediate_size else 0
        per_layer = attn + 2 * h + self.num_local_experts * h + shared
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_hidden_layers * per_layer + self.vocab_size * h + h + head

    @property
    def total_params(self) -> int:
        return self.dense_params + self.num_hidden_layers * self.num_local_experts * self.expert_params

    # --- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in FAMILY_KEYS:
            raise ConfigError(f"{source}: model_type is {model_type!r}; supported: {sorted(FAMILY_KEYS)}")
        experts_key, width_key, extra = FAMILY_KEYS[model_type]
        if experts_key not in raw and "num_local_experts" in raw:
            experts_key = "num_local_experts"  # transformers' attribute_map spelling
        missing = [k for k in _COMMON_KEYS + (experts_key, width_key) + extra if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required key(s): {', '.join(missing)}")
        quant = (None, 128, False)
        if raw.get("quantization_config"):
            from .quant.ckpt import parse_quantization_config

            quant = parse_quantization_config(raw["quantization_config"], source)
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (these MoE families use 'silu')")
        _refuse_unsupported(raw, model_type, source)
        d = _FAMILY_DEFAULTS[model_type]
        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or (raw["hidden_size"] // heads if heads else 0)
        eos = raw.get("eos_token_id", d["eos"])
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        mixtral = model_type == "mixtral"
        try:
            return cls(
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                intermediate_size=raw[width_key],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads") or heads,
                num_local_experts=raw[experts_key],
                num_experts_per_tok=raw["num_experts_per_tok"],
                head_dim=head_dim,
                rope_theta=float(_rope_theta(raw, source, d["rope_theta"])),
                rms_norm_eps=float(raw.get("rms_norm_eps", d["rms_norm_eps"])),
                max_position_embeddings=raw.get("max_position_embeddings", 4096 * 32),
                sliding_window=raw.get("sliding_window") if mixtral else None,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                bos_token_id=raw.get("bos_token_id", d["bos"]),
                eos_token_ids=eos_ids,
                torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
                model_type=model_type,
                norm_topk_prob=True if mixtral else bool(raw.get("norm_topk_prob", d["norm_topk_prob"])),
                shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size", 0),
                qk_norm={"qwen3_moe": "per_head", "olmoe": "full"}.get(model_type, "none"),
                qkv_bias=bool(raw.get("qkv_bias", True)) if model_type == "qwen2_moe" else False,
                clip_qkv=raw.get("clip_qkv") if model_type == "olmoe" else None,
                expert_format=quant[0], expert_group_size=quant[1], expert_symmetric=quant[2],
            )
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
        if self.model_type != "mixtral":
            return self._family_hf_dict()
        eos = list(self.eos_token_ids)
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "torch_dtype": self.torch_dtype,
            "router_aux_loss_coef": 0.02,
            "output_router_logits": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }

    def _family_hf_dict(self) -> dict[str, Any]:
        eos = list(self.eos_token_ids)
        experts_key, width_key, _ = FAMILY_KEYS[self.model_type]
        out = {
            "architectures": [_ARCHITECTURES[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            experts_key: self.num_local_experts, width_key: self.intermediate_size,
            "num_experts_per_tok": self.num_experts_per_tok, "norm_topk_prob": self.norm_topk_prob,
            "hidden_act": "silu", "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "torch_dtype": self.torch_dtype,
            "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        }
        if self.model_type == "olmoe":
            out["clip_qkv"] = self.clip_qkv
        else:  # the Qwen families: every layer sparse, no sliding window
            out.update(decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False)
        if self.model_type == "qwen2_moe":
            out.update(shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                       qkv_bias=self.qkv_bias, intermediate_size=self.shared_expert_intermediate_size)
        return out

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    @property
    def prepends_bos(self) -> bool:
        """Whether prompts start with bos_token_id: Mixtral's tokenizer adds it; the Qwen and OLMoE
        tokenizers add none (their config.json's bos_token_id is <|endoftext|>)."""
        return self.model_type == "mixtral"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name, mixtral_value in _FAMILY_FIELDS.items():
            if out[name] == mixtral_value:
                del out[name]  # a Mixtral's dict is unchanged by the family fields
        return out


MixtralConfig = ModelConfig  # the name before other families were supported (an alias for one release)


def _refuse_unsupported(raw: dict[str, Any], model_type: str, source: str) -> None:
    """One-line errors for options of these families that this runtime does not implement."""
    if raw.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported for {model_type} "
                          "(only Mixtral's sliding_window is implemented); set it to false")
    if raw.get("attention_bias") and model_type != "mixtral":
        raise ConfigError(f"{source}: attention_bias=true is not supported for {model_type} (the hub "
                          "checkpoints have none); expected false")
    if raw.get("mlp_only_layers"):
        raise ConfigError(f"{source}: mlp_only_layers {raw['mlp_only_layers']} (dense MLP layers) is not "
                          "supported; every layer must be a sparse MoE layer (mlp_only_layers: [])")
    step = raw.get("decoder_sparse_step", 1)
    if step != 1:
        raise ConfigError(f"{source}: decoder_sparse_step {step!r} (dense MLP layers in between) is not "
                          "supported; expected 1 (every layer sparse)")
    if model_type == "qwen2_moe" and not raw.get("shared_expert_intermediate_size"):
        raise ConfigError(f"{source}: shared_expert_intermediate_size must be a positive integer for "
                          f"qwen2_moe, got {raw.get('shared_expert_intermediate_size')!r}")


def _rope_theta(raw: dict[str, Any], source: str, default: float = 1e6) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling")
    if isinstance(params, dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (only 'default')")
        if "rope_theta" in params:
            return params["rope_theta"]
    return raw.get("rope_theta", default)


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


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    """'auto' -> float32 on cpu; on cuda the checkpoint's half dtype (bfloat16 where supported)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise MoeOffloadError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        if checkpoint_dtype == "float16":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise MoeOffloadError(f"dtype {dtype!r} is not supported; use 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[dtype]
