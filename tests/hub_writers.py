"""Writers of published quantized checkpoint layouts (GPTQ, AWQ, FP8 block, MXFP4), written here from the
formats' published descriptions with numpy bit operations, independently of moe_offload's readers: each
returns the packed tensors as the file stores them AND the integer codes, zeros and scales it packed, so a
test can dequantize from the codes by the format's formula without going through any unpacking code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column AWQ_ORDER[i] (AutoAWQ's pack order)


def _words(vals: np.ndarray, bits: int) -> np.ndarray:
    """uint32 [..., W] values (W = 32 / bits) -> uint32 [...]: value i in bits [bits*i, bits*i + bits)."""
    out = np.zeros(vals.shape[:-1], dtype=np.uint32)
    for i in range(vals.shape[-1]):
        out |= vals[..., i].astype(np.uint32) << np.uint32(bits * i)
    return out


def _i32(u: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(u).view(np.int32).copy())


def gptq_matrix(w: torch.Tensor, bits: int, group: int, sym: bool, act_order: bool, seed: int = 0, v2: bool = False):
    """w [N, K] -> (file tensors {qweight, qzeros, scales, g_idx}, codes q [N, K], zeros [G, N], scales [G, N] f32,
    g_idx [K]) in AutoGPTQ's layout ("gptq": stored zeros are zero - 1)."""
    w = w.double().numpy()
    n, k = w.shape
    per, maxq = 32 // bits, (1 << bits) - 1
    gsz = k if group == -1 else group
    G = -(-k // gsz)
    rng = np.random.default_rng(seed)
    order = rng.permutation(k) if act_order else np.arange(k)
    g_idx = np.empty(k, dtype=np.int64)
    g_idx[order] = np.arange(k) // gsz  # activation order: the i-th column visited belongs to group i // gsz
    scales = np.zeros((G, n), dtype=np.float16)
    zeros = np.zeros((G, n), dtype=np.int64)
    for g in range(G):
        wg = w[:, g_idx == g]
        if sym:
            s = np.maximum(np.abs(wg).max(1), 1e-8) * 2 / maxq
            z = np.full(n, (maxq + 1) // 2)
        else:
            lo, hi = np.minimum(wg.min(1), 0), np.maximum(wg.max(1), 0)
            s = np.maximum(hi - lo, 1e-8) / maxq
            z = np.clip(np.round(-lo / s), 1, maxq)  # >= 1: v1's "zero - 1" then stays in range
        scales[g], zeros[g] = s.astype(np.float16), z
    s_full = scales.astype(np.float64)[g_idx].T  # [N, K]
    q = np.clip(np.round(w / s_full) + zeros[g_idx].T, 0, maxq).astype(np.int64)  # [N, K]
    qt = np.pad(q.T, ((0, (-k) % per), (0, 0)))  # [K', N]
    qweight = _words(qt.reshape(-1, per, n).transpose(0, 2, 1), bits)  # [K/W, N]
    stored = zeros if v2 else (zeros - 1) & maxq
    zp = np.pad(stored, ((0, 0), (0, (-n) % per)))
    qzeros = _words(zp.reshape(G, -1, per), bits)  # [G, N/W]
    tensors = {"qweight": _i32(qweight), "qzeros": _i32(qzeros), "scales": torch.from_numpy(scales),
               "g_idx": torch.from_numpy(g_idx.astype(np.int32))}
    return tensors, q, zeros, scales.astype(np.float32), g_idx


def gptq_reference(q, zeros, scales, g_idx) -> torch.Tensor:
    """w[n, k] = (q[n, k] - zero[g_idx[k], n]) * scale[g_idx[k], n], float32."""
    return torch.from_numpy(((q - zeros[g_idx].T).astype(np.float32) * scales[g_idx].T).astype(np.float32))


def awq_matrix(w: torch.Tensor, group: int):
    """w [N, K] -> ({qweight [K, N/8], qzeros [G, N/8], scales [G, N]}, codes q [N, K], zeros [G, N], scales f32)."""
    w = w.double().numpy()
    n, k = w.shape
    G = -(-k // group)
    wg = w.reshape(n, G, group)
    lo, hi = np.minimum(wg.min(-1), 0), np.maximum(wg.max(-1), 0)
    s = (np.maximum(hi - lo, 1e-8) / 15).astype(np.float16)  # [N, G]
    z = np.clip(np.round(-lo / s.astype(np.float64)), 0, 15).astype(np.int64)
    q = np.clip(np.round(wg / s.astype(np.float64)[..., None]) + z[..., None], 0, 15).astype(np.int64).reshape(n, k)

    def pack(v: np.ndarray) -> np.ndarray:  # [R, N] -> [R, N/8] in AWQ's order
        r = v.shape[0]
        cols = v.reshape(r, n // 8, 8)[..., AWQ_ORDER]  # nibble i <- column AWQ_ORDER[i]
        return _words(cols, 4)

    tensors = {"qweight": _i32(pack(q.T)), "qzeros": _i32(pack(z.T)), "scales": torch.from_numpy(s.T.copy())}
    return tensors, q, z.T, s.T.astype(np.float32)


def awq_reference(q, zeros, scales, group) -> torch.Tensor:
    g = np.arange(q.shape[1]) // group
    return torch.from_numpy(((q - zeros[g].T).astype(np.float32) * scales[g].T).astype(np.float32))


def fp8_matrix(w: torch.Tensor, block=(128, 128), scale_dtype=torch.float32):
    """w [N, K] -> {weight float8_e4m3fn [N, K], weight_scale_inv [ceil(N/bn), ceil(K/bk)]}."""
    n, k = w.shape
    bn, bk = block
    gn, gk = -(-n // bn), -(-k // bk)
    s = torch.zeros(gn, gk, dtype=torch.float64)
    for i in range(gn):
        for j in range(gk):
            s[i, j] = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().max() / 448
    s = s.to(scale_dtype)
    full = s.double().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return {"weight": (w.double() / full).to(torch.float8_e4m3fn), "weight_scale_inv": s}


# e2m1 as the OCP MX spec defines it: sign, 2 exponent bits (bias 1), 1 mantissa bit
def e2m1_value(code: int) -> float:
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return sign * (m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1))


def mxfp4_matrix(n: int, k: int, seed: int = 0):
    """Random MXFP4 matrix [N, K]: ({blocks [N, K/32, 16], scales [N, K/32]}, float64 reference [N, K])."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, size=(n, k))
    scales = rng.integers(100, 150, size=(n, k // 32)).astype(np.uint8)
    pairs = codes.reshape(n, k // 32, 16, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)  # element 2j low nibble, 2j+1 high
    lut = np.array([e2m1_value(c) for c in range(16)])
    ref = lut[codes] * np.ldexp(1.0, scales.astype(np.int64) - 127).repeat(32, axis=1)
    return {"blocks": torch.from_numpy(blocks), "scales": torch.from_numpy(scales)}, ref


# --- whole checkpoints from a float folder --------------------------------------------------------------
def _quantizable(name: str, t: torch.Tensor) -> bool:
    """The linears published checkpoints quantize: attention and expert projections (not the router gate,
    embeddings, lm_head or norms)."""
    return (t.dim() == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name
            and not name.endswith(("gate.weight", "norm.weight")))


def convert_folder(src: Path, dst: Path, method: str, **kw) -> dict[str, torch.Tensor]:
    """A float Mixtral folder saved by transformers -> the same model in `method` ('gptq', 'awq', 'fp8'),
    every quantizable linear packed as the publishers do; returns the file's tensors."""
    sd = load_file(src / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    spec = dict(sd)  # the float model the spec says the file holds
    for i, (name, t) in enumerate(sorted(sd.items())):
        if not _quantizable(name, t):
            out[name] = t
            continue
        base = name.removesuffix(".weight")
        if method == "gptq":
            tensors, q, z, s, g = gptq_matrix(t, kw["bits"], kw["group"], kw["sym"], kw["desc_act"], seed=i)
            spec[name] = gptq_reference(q, z, s, g)
        elif method == "awq":
            tensors, q, z, s = awq_matrix(t, kw["group"])
            spec[name] = awq_reference(q, z, s, kw["group"])
        else:
            block = tuple(kw.get("block", (128, 128)))
            tensors = fp8_matrix(t, block, kw.get("scale_dtype", torch.float32))
            sc = tensors["weight_scale_inv"].double()
            full = sc.repeat_interleave(block[0], 0)[: t.shape[0]].repeat_interleave(block[1], 1)[:, : t.shape[1]]
            spec[name] = (tensors["weight"].double() * full).float()
        out.update({f"{base}.{sfx}": v for sfx, v in tensors.items()})
    if kw.get("spec_folder") is not None:  # the spec's float model, as a folder transformers loads
        f = Path(kw["spec_folder"])
        f.mkdir(parents=True, exist_ok=True)
        save_file(spec, str(f / "model.safetensors"), metadata={"format": "pt"})
        for g in src.iterdir():
            if g.name != "model.safetensors":
                (f / g.name).write_bytes(g.read_bytes())
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": kw["bits"], "group_size": kw["group"], "desc_act": kw["desc_act"],
              "sym": kw["sym"], "checkpoint_format": "gptq", "damp_percent": 0.1, "true_sequential": True}
    elif method == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": kw["group"], "version": "gemm", "zero_point": True,
              "modules_to_not_convert": ["gate"]}
    else:
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
              "weight_block_size": list(kw.get("block", (128, 128))), "modules_to_not_convert": ["gate", "lm_head"]}
    cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (dst / f.name).write_bytes(f.read_bytes())
    return out


def expert_file_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for n, t in tensors.items() if ".experts." in n)


def total(shape) -> int:
    return math.prod(shape)


# --- FP8 checkpoints as DeepSeek-V3 / Kimi-K2 / Qwen3-*-FP8 publish them ----------------------------------
def fp8_reference(t: dict[str, torch.Tensor], block) -> torch.Tensor:
    """The float32 matrix an fp8_matrix output stands for: each code times its block's scale (the blocks
    at the right and bottom edges cut short where the shape is not a multiple of the block)."""
    q, s = t["weight"], t["weight_scale_inv"]
    n, k = q.shape
    full = s.double().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return (q.double() * full).float()


def publish_fp8_folder(src: Path, dst: Path, hub_config: dict, block=(128, 128), scale_dtype=torch.float32,
                       shards: int = 2, spec_folder: Path | None = None) -> dict[str, torch.Tensor]:
    """A float folder saved by transformers -> that model as the FP8 checkpoints are published: every linear
    weight (attention, dense MLPs, shared and routed experts) float8_e4m3fn with a `weight_scale_inv` per
    block of `block` (amax / 448, fp8_matrix), the embeddings, norms, router gate, its correction bias,
    lm_head and the modules hub_config's quantization_config.modules_to_not_convert names (full module
    names) as saved; `shards` files with a model.safetensors.index.json; config.json is `hub_config` (the
    hub's spelling) with the quantization_config the publishers write. spec_folder: also the float32 model
    the file stands for (fp8_reference of each FP8 linear), as a folder transformers loads. Returns the
    file's tensors."""
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(f))
    out: dict[str, torch.Tensor] = {}
    spec = dict(sd)
    skip = set((hub_config.get("quantization_config") or {}).get("modules_to_not_convert") or [])
    for name, t in sorted(sd.items()):
        if not _quantizable(name, t) or name.removesuffix(".weight") in skip:
            out[name] = t
            continue
        base = name.removesuffix(".weight")
        packed = fp8_matrix(t.float(), tuple(block), scale_dtype)
        spec[name] = fp8_reference(packed, block)
        out.update({f"{base}.{sfx}": v for sfx, v in packed.items()})
    if spec_folder is not None:
        spec_folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.float().contiguous() for k, v in spec.items()}, str(spec_folder / "model.safetensors"),
                  metadata={"format": "pt"})
        for f in src.iterdir():
            if not f.name.startswith("model"):
                (spec_folder / f.name).write_bytes(f.read_bytes())
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted(out)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: out[n].contiguous() for n in names[i * per:(i + 1) * per]}
        save_file(part, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in out.values())},
             "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = dict(hub_config)
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": list(block), **cfg.get("quantization_config", {})}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name != "config.json" and not f.name.startswith("model"):
            (dst / f.name).write_bytes(f.read_bytes())
    return out


# --- compressed-tensors pack-quantized with activation ordering (actorder "group": weight_g_idx) --------------
def ct_actorder_matrix(w: torch.Tensor, bits: int, group: int, sym: bool, seed: int = 0,
                       scale_dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """w [N, K] -> the file tensors compressed-tensors (<= 0.9, actorder "group") writes: columns visited in a
    random order, the i-th visited in group i // group (weight_g_idx [K] int32), each group's scale / zero
    point from compressed-tensors' calculate_qparams, codes by its quantize, packed by its pack_to_int32."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    n, k = w.shape
    order = torch.from_numpy(np.random.default_rng(seed).permutation(k))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group).to(torch.int32)
    perm = torch.argsort(g_idx, stable=True)  # columns sorted by group
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group)
    wp = w.to(scale_dtype)[:, perm]
    wg = wp.reshape(n, -1, group)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
    scale = scale.to(scale_dtype)
    q_sorted = quantize(wp, scale, zp, args, dtype=torch.int8)  # [N, K] in sorted column order
    q = torch.empty_like(q_sorted)
    q[:, perm] = q_sorted
    out = {"weight_packed": pack_to_int32(q, bits), "weight_scale": scale, "weight_g_idx": g_idx,
           "weight_shape": torch.tensor([n, k])}
    if not sym:
        out["weight_zero_point"] = pack_to_int32(zp.to(torch.int8), bits, packed_dim=0)
    return out


def ct_actorder_reference(t: dict[str, torch.Tensor], bits: int, group: int, sym: bool) -> torch.Tensor:
    """compressed-tensors' decompression of ct_actorder_matrix's tensors, its own algorithm for a weight_g_idx
    (<= 0.9's dequantize: columns sorted by group, the i-th group dequantized with scale column i, then put
    back) run with the installed version's unpack_from_int32 and dequantize; in the scales' dtype."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    n, k = (int(v) for v in t["weight_shape"])
    scale = t["weight_scale"]
    q = unpack_from_int32(t["weight_packed"], bits, torch.Size([n, k]))
    zp = None if sym else unpack_from_int32(t["weight_zero_point"], bits, torch.Size([n, scale.shape[1]]), 0)
    perm = torch.argsort(t["weight_g_idx"], stable=True)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group)
    w_sorted = dequantize(q[:, perm], scale, zp, args)
    w = torch.empty_like(w_sorted)
    w[:, perm] = w_sorted
    return w
