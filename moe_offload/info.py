"""`moe-offload info`: what a checkpoint holds and what its experts weigh, from headers alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import open_checkpoint
from .config import ModelConfig

from .formats import DEFAULT_GROUP_SIZE, expert_bytes as format_bytes


def expert_bytes(cfg: ModelConfig) -> dict[str, int]:
    """Bytes of one expert per storage format (moe_offload.formats; int4 at the default group size)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"float32": format_bytes(h, i, "fp32"), "bfloat16": format_bytes(h, i, "bf16"),
            "float16": format_bytes(h, i, "fp16"), "int8": format_bytes(h, i, "int8"),
            f"int4_g{DEFAULT_GROUP_SIZE}": format_bytes(h, i, "int4")}


def describe(path: str | Path | None, config_file: str | Path | None = None,
             plan: Any = None) -> dict[str, Any]:
    """Facts about a model folder (validated, headers only), or about a bare config.json; with `plan`
    (an OffloadConfig) also the memory plan."""
    from .runtime import bundled_model_path

    if config_file is not None:
        cfg, where, dtype = ModelConfig.from_file(config_file), str(config_file), None
    else:
        ckpt = open_checkpoint(path if path is not None else bundled_model_path())  # a folder or a .gguf file
        ckpt.validate()
        cfg, where, dtype = ckpt.config, str(ckpt.path), ckpt.dtype_name
    n_experts = cfg.num_hidden_layers * cfg.num_local_experts
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype or cfg.torch_dtype]
    expert_total = n_experts * cfg.expert_params
    return {
        "path": where,
        "config": cfg.as_dict(),
        "checkpoint_dtype": dtype or f"{cfg.torch_dtype} (from config.json; no weights read)",
        "params": {"total": cfg.total_params, "experts": expert_total, "dense": cfg.dense_params,
                   "active_per_token": cfg.dense_params + cfg.num_hidden_layers * cfg.num_experts_per_tok
                   * cfg.expert_params},
        "bytes": {"experts": expert_total * itemsize, "dense": cfg.dense_params * itemsize,
                  "expert_fraction": expert_total / cfg.total_params},
        "experts": n_experts,
        "one_expert_bytes": expert_bytes(cfg),
        **({"expert_store": _expert_store(cfg, ckpt)} if config_file is None and cfg.expert_format else {}),
        **({"memory_plan": _plan(cfg, dtype or cfg.torch_dtype, plan).as_dict()} if plan else {}),
    }


def _expert_store(cfg: ModelConfig, ckpt: Any) -> dict[str, Any]:
    """Experts stored packed as the checkpoint has them: their format, the host store's bytes and, for a
    GGUF file, the file's expert bytes and the GGML types of every tensor group."""
    from .formats import get_format

    fmt = get_format(cfg.expert_format, cfg.expert_group_size)
    n = cfg.num_hidden_layers * cfg.num_local_experts
    out: dict[str, Any] = {"format": fmt.name, "one_expert_bytes": fmt.expert_bytes(cfg.hidden_size, cfg.intermediate_size),
                           "host_bytes": n * fmt.expert_bytes(cfg.hidden_size, cfg.intermediate_size)}
    if hasattr(ckpt, "tensor_groups"):  # GGUF
        out["file_expert_bytes"] = ckpt.expert_file_bytes()
        out["tensor_groups"] = ckpt.tensor_groups()
    return out


def _plan(cfg: ModelConfig, ckpt_dtype: str, config: Any):
    """The memory plan for an OffloadConfig: device, dtype, context, policy, budget and expert storage."""
    from .config import resolve_device, resolve_dtype
    from .offload import CacheBudget, make_policy, plan_memory
    from .options import INT4, check_against_model
    from .runtime import DEFAULT_MAX_SEQ_LEN

    check_against_model(config, cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok)
    t = config.tuning
    dev = resolve_device(config.device)
    dt = resolve_dtype(config.dtype, dev, ckpt_dtype)
    seq = t.max_seq_len or min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    budget = CacheBudget(t.cache_experts, config.cache_per_layer, config.cache_gb)
    fmt = config.expert_dtype if config.expert_dtype in ("int8",) + INT4 else cfg.expert_format
    return plan_memory(cfg, dev, dt, seq, budget, make_policy(t.policy).per_layer, fmt, config.group_size)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _shared(width: int) -> str:
    return f"width {width} (resident on the device)" if width else "none"


def format_info(info: dict[str, Any]) -> str:
    c, p, b = info["config"], info["params"], info["bytes"]
    lines = [
        f"model      {info['path']}",
        f"family     {c.get('model_type', 'mixtral')}: router top-k "
        f"{'renormalised' if c.get('norm_topk_prob', True) else 'not renormalised'}, q/k norm "
        f"{c.get('qk_norm', 'none')}, qkv bias {c.get('qkv_bias', False)}, clip_qkv {c.get('clip_qkv')}, "
        f"shared expert {_shared(c.get('shared_expert_intermediate_size', 0))}",
        f"shape      {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, expert width "
        f"{c['intermediate_size']}, heads {c['num_attention_heads']} (kv {c['num_key_value_heads']}, "
        f"head_dim {c['head_dim']}), vocab {c['vocab_size']}",
        f"experts    {c['num_local_experts']} per layer, top-{c['num_experts_per_tok']}, "
        f"{info['experts']} in all",
        f"context    max_position_embeddings {c['max_position_embeddings']}, sliding_window "
        f"{c['sliding_window']}, rope_theta {c['rope_theta']:g}",
        f"params     total {p['total']:,}  experts {p['experts']:,}  dense {p['dense']:,}  "
        f"active/token {p['active_per_token']:,}",
        f"bytes      experts {_size(b['experts'])}  dense {_size(b['dense'])}  "
        f"({100 * b['expert_fraction']:.1f}% of parameters in experts; checkpoint {info['checkpoint_dtype']})",
        "one expert " + "  ".join(f"{k} {_size(v)}" for k, v in info["one_expert_bytes"].items()),
    ]
    if "expert_store" in info:
        st = info["expert_store"]
        line = f"stored     experts {st['format']}: host store {_size(st['host_bytes'])}"
        if "file_expert_bytes" in st:
            line += f" (file's expert bytes {_size(st['file_expert_bytes'])})"
            groups = ", ".join(f"{g} {'/'.join(sorted(t))}" for g, t in st["tensor_groups"].items())
            line += f"\ntensors    {groups}"
        lines.append(line)
    if "memory_plan" in info:
        from .offload import MemoryPlan

        lines.append(MemoryPlan(**info["memory_plan"]).format())
    return "\n".join(lines)
