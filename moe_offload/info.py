"""`moe-offload info`: what a checkpoint holds and what its experts weigh, from headers alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import open_checkpoint
from .config import ModelConfig

from .formats import DEFAULT_GROUP_SIZE, expert_bytes as format_bytes
from .offload.store_info import expert_store_info


def shipped_expert_bytes(cfg: ModelConfig) -> int | None:
    """Bytes of one expert in the format its checkpoint is published in (cfg.shipped_format), biases in
    bf16: FP8 e4m3 with a float32 scale per 128 x 128 block (DeepSeek-V3), or MXFP4 (4-bit e2m1 and one
    e8m0 scale byte per 32 inputs, GPT-OSS). None when the checkpoint ships no such format."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    bias = 2 * (2 * i + h) if cfg.expert_bias else 0
    if cfg.shipped_format == "fp8_block128":
        blocks = -(-i // 128) * -(-h // 128)  # per matrix: [I, H] and [H, I] have as many blocks
        return 3 * h * i + 4 * 3 * blocks + bias
    if cfg.shipped_format == "mxfp4":
        return 3 * h * i // 2 + 3 * h * i // 32 + bias
    return None


def expert_bytes(cfg: ModelConfig) -> dict[str, int]:
    """Bytes of one expert per storage format (moe_offload.formats; int4 at the default group size), plus
    its biases where the family has them (in the float dtype; bf16 beside packed weights), plus the
    format the checkpoint ships in."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    bias = (2 * i + h) if cfg.expert_bias else 0
    out = {"float32": format_bytes(h, i, "fp32") + 4 * bias, "bfloat16": format_bytes(h, i, "bf16") + 2 * bias,
           "float16": format_bytes(h, i, "fp16") + 2 * bias, "int8": format_bytes(h, i, "int8") + 2 * bias,
           f"int4_g{DEFAULT_GROUP_SIZE}": format_bytes(h, i, "int4") + 2 * bias}
    shipped = shipped_expert_bytes(cfg)
    if shipped is not None:
        out[f"{cfg.shipped_format} (shipped)"] = shipped
    return out


def describe(path: str | Path | None, config_file: str | Path | None = None,
             plan: Any = None) -> dict[str, Any]:
    """Facts about a model folder (validated, headers only), or about a bare config.json; with `plan`
    (an OffloadConfig) also the memory plan."""
    from .runtime import bundled_model_path

    if config_file is not None:
        cfg, where, dtype = ModelConfig.from_file(config_file), str(config_file), None
    else:
        ckpt = open_checkpoint(path if path is not None else bundled_model_path())  # a folder or a .gguf file
        if not ckpt.config.family.unsupported(ckpt.config):  # a family parsed for projections only is not checked
            ckpt.validate()
        cfg, where, dtype = ckpt.config, str(ckpt.path), ckpt.dtype_name
    dense_load = _dense_load(cfg, None if config_file is not None else ckpt)
    n_experts = cfg.num_moe_layers * cfg.num_local_experts
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype or cfg.torch_dtype]
    expert_total = n_experts * cfg.expert_params
    shipped = shipped_expert_bytes(cfg)
    embed = cfg.vocab_size * cfg.hidden_size
    return {
        "path": where,
        "config": cfg.as_dict(),
        "checkpoint_dtype": dtype or f"{cfg.torch_dtype} (from config.json; no weights read)",
        # active_per_token counts both embedding tables; active_non_embedding leaves out the input
        # embedding (a lookup, not a matmul: OpenAI's count for GPT-OSS)
        "params": {"total": cfg.total_params, "experts": expert_total, "dense": cfg.dense_params,
                   "active_per_token": cfg.active_params, "active_non_embedding": cfg.active_params - embed,
                   "active_without_embeddings_and_head": cfg.active_params - embed
                   - (0 if cfg.tie_word_embeddings else embed)},
        "bytes": {"experts": expert_total * itemsize, "dense": cfg.dense_params * itemsize,
                  "expert_fraction": expert_total / cfg.total_params,
                  **({"experts_shipped": n_experts * shipped} if shipped is not None else {}),
                  "kv_cache_per_token": cfg.kv_elements_per_token * itemsize},
        "experts": n_experts,
        "moe_layers": cfg.num_moe_layers,
        "runnable": cfg.family.unsupported(cfg) or True,
        "one_expert_bytes": expert_bytes(cfg),
        **({"expert_store": expert_store_info(ckpt)} if config_file is None and cfg.expert_format else {}),
        **({"dense_dequantized": dense_load} if dense_load else {}),
        **({"memory_plan": _plan(cfg, dtype or cfg.torch_dtype, plan, None if config_file is not None else ckpt).as_dict()}
           if plan else {}),
        "needs": _needs(cfg),
    }


def _dense_load(cfg: ModelConfig, ckpt: Any) -> dict[str, Any] | None:
    """The dense linears (attention, dense MLPs, shared experts) a checkpoint stores in its experts' hub
    format, which load() dequantizes into the compute dtype one tensor at a time (the routed experts stay
    as stored): {"format", "tensors": their count (None from a bare config.json: an FP8 checkpoint as
    published stores them all so)}, or None where none are."""
    from .formats import hub_format_of

    if cfg.expert_format is None or hub_format_of(cfg.expert_format) is None:
        return None
    if ckpt is None:
        return {"format": cfg.expert_format, "tensors": None} if cfg.expert_format.startswith("fp8:") else None
    names = ckpt.dequantized_linears() if hasattr(ckpt, "dequantized_linears") else []
    return {"format": cfg.expert_format, "tensors": len(names)} if names else None


def _needs(cfg: ModelConfig) -> dict[str, Any]:
    """Host RAM and device memory the shipped formats need (analysis.projections.memory_needs)."""
    from .analysis.projections import memory_needs, shipped_formats
    from .errors import MoeOffloadError

    out = {}
    for name in shipped_formats(cfg):
        try:
            out[name] = memory_needs(cfg, name)
        except (MoeOffloadError, ValueError):  # a shape the format cannot hold
            continue
    return out


def _plan(cfg: ModelConfig, ckpt_dtype: str, config: Any, ckpt: Any = None):
    """The memory plan for an OffloadConfig: device, dtype (as load() resolves it; for a GGUF on the CPU
    from the CPU's flags rather than the built kernels), context, policy, budget and expert storage."""
    from .config import resolve_device, resolve_dtype
    from .offload import CacheBudget, make_policy, plan_memory
    from .options import INT4, check_against_model
    from .errors import MoeOffloadError
    from .formats import loop_only
    from .runtime import DEFAULT_MAX_SEQ_LEN, _expert_storage, cpu_reports_vnni, gguf_bf16

    check_against_model(config, cfg.num_moe_layers, cfg.num_local_experts, cfg.num_experts_per_tok)
    t = config.tuning
    dev = resolve_device(config.device)
    dt = resolve_dtype(config.dtype, dev, ckpt_dtype, gguf_bf16(ckpt, dev, config.dtype, cpu_reports_vnni))
    seq = t.max_seq_len or min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    if seq > cfg.max_position_embeddings:
        raise MoeOffloadError(f"tuning.max_seq_len must be in [1, {cfg.max_position_embeddings}] for this model "
                              f"(its max_position_embeddings), got {seq}")
    budget = CacheBudget(t.cache_experts, config.cache_per_layer, config.cache_gb)
    expert_dtype, group = _expert_storage(config, cfg, "the model")  # as load() would store them
    fmt = expert_dtype if expert_dtype in ("int8",) + INT4 or loop_only(expert_dtype) else None
    return plan_memory(cfg, dev, dt, seq, budget, make_policy(t.policy).per_layer, fmt, group)


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
    k, mla = c.get("first_k_dense_replace", 0), c.get("attention") == "mla"
    attn = (f"MLA (q_lora_rank {c.get('q_lora_rank')}, kv_lora_rank {c.get('kv_lora_rank')}, rope "
            f"{c.get('qk_rope_head_dim')}, v {c.get('v_head_dim')})" if mla else "GQA")
    extras = [f"attention {attn}", f"router {c.get('scoring', 'softmax')}"
              + (f" + correction bias" if c.get("correction_bias") else "")
              + (f", groups {c.get('topk_group')} of {c.get('n_group')}" if c.get("n_group", 1) > 1 else "")
              + (f", scale {c.get('routed_scaling_factor')}" if c.get("routed_scaling_factor", 1.0) != 1.0 else "")]
    if k:
        extras.append(f"{k} dense first layer(s) (MLP width {c.get('dense_intermediate_size')}), "
                      f"{info.get('moe_layers')} MoE layers")
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        extras.append(f"partial rotary {c['partial_rotary_factor']}")
    if c.get("attention_sinks"):
        extras.append("attention sinks, q/k/v/o biases, expert biases")
    if c.get("rope_type", "default") != "default":
        extras.append(f"rope {c['rope_type']}")
    if c.get("mtp_layers"):
        extras.append(f"{c['mtp_layers']} MTP layer(s) shipped: not run, not counted")
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
        f"variant    " + "; ".join(extras),
        f"params     total {p['total']:,}  experts {p['experts']:,}  dense {p['dense']:,}  "
        f"active/token {p['active_per_token']:,} ({p['active_non_embedding']:,} without the input embedding)",
        f"bytes      experts {_size(b['experts'])}  dense {_size(b['dense'])}  "
        f"({100 * b['expert_fraction']:.1f}% of parameters in experts; checkpoint {info['checkpoint_dtype']})",
        "one expert " + "  ".join(f"{k} {_size(v)}" for k, v in info["one_expert_bytes"].items()),
        f"kv cache   {_size(b['kv_cache_per_token'])} per token"
        + (f"; experts as shipped {_size(b['experts_shipped'])}" if "experts_shipped" in b else ""),
    ]
    for name, n in info.get("needs", {}).items():
        lines.append(f"needs      {name:6s} ({n['bits_per_weight']:.2f} bits/weight): host RAM {_size(n['host_ram_bytes'])} "
                     f"(every expert), device at least {_size(n['device_min_bytes'])} (dense {_size(n['dense_bytes'])}, "
                     f"KV {n['kv_tokens']} tokens {_size(n['kv_cache_bytes'])}, top-k slots per layer "
                     f"{_size(n['min_slot_bytes'])}, reserve), all resident {_size(n['device_all_resident_bytes'])}")
    if "dense_dequantized" in info:
        d = info["dense_dequantized"]
        count = f"{d['tensors']} " if d["tensors"] is not None else ""
        lines.append(f"dense      {count}linears stored {d['format']} (attention, dense MLPs, shared experts) are "
                     f"dequantized to the compute dtype at load, one tensor at a time; the routed experts stay "
                     f"{d['format']} as stored")
    if info.get("runnable", True) is not True:
        lines.append(f"runnable   no: {info['runnable']}")
    if "expert_store" in info:
        st = info["expert_store"]
        line = (f"stored     experts {st['format']}: host store {_size(st['host_bytes'])}"
                + (", read in place from the file's memory map" if st.get("mapped") else ""))
        if "file_expert_bytes" in st:
            line += f" (file's expert bytes {_size(st['file_expert_bytes'])})"
            groups = ", ".join(f"{g} {'/'.join(sorted(t))}" for g, t in st["tensor_groups"].items())
            line += f"\ntensors    {groups}"
        lines.append(line)
    if "memory_plan" in info:
        from .offload import MemoryPlan

        lines.append(MemoryPlan(**info["memory_plan"]).format())
    return "\n".join(lines)
