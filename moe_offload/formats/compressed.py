"""compressed-tensors "pack-quantized" experts as llm-compressor writes them, kept as stored: integer
weights of 2, 4 or 8 bits (the unpacking reads any width; others are untested, so refused), symmetric or asymmetric, strategy "group" (any group size) or "channel".

One matrix [N out, K in] in the file, b bits, G = ceil(K / group_size) (group) or 1 (channel):
  weight_packed      int32 [N, ceil(K * b / 32)]  a dense little-endian bit stream per row: value k
                                                  occupies bits b*k .. b*k + b - 1 (words may split a
                                                  value when 32 % b != 0), stored unsigned: the
                                                  signed value plus 2**(b-1)
  weight_scale       [N, G] in the checkpoint's float dtype (bf16 from llm-compressor, fp16, fp32)
  weight_zero_point  int32 [ceil(N * b / 32), G]  asymmetric only: the signed zero points, packed the
                                                  same way along N (dim 0)
  weight_g_idx       int32 [K]                    actorder "group" only: the group of each input column
                                                  (GPTQ's activation order); read whole for any rows
  weight_shape       [2] = (N, K)                 metadata: checked at load, not stored in the row
Dequantization: w = (q - zp) * scale per group (q, zp signed; the offsets cancel), zp = 0 when
symmetric; column k takes group k // group_size, or weight_g_idx[k] with activation ordering (as
compressed-tensors' dequantize does: columns sorted by group, the i-th group taking scale column i). This is the format for every pack-quantized variant; the int4 / int8 formats keep reading
the variants `moe-offload quantize` writes (fp16 scales, groups 32/64/128) into their own rows, for
the Triton kernel and the CPU weight-only ops.

Name: 'ct:4,g128,sym' / 'ct:8,ch,asym' (+ ',act' with weight_g_idx; + ',bf16' / ',fp32' for the scale
dtype; fp16 by default).
"""

from __future__ import annotations

import torch

from .hub import HubFormat, parse_tokens, scale_token

PREFIX = "ct:"


def unpack_dense(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """int32 [R, C] holding a little-endian bit stream per row -> int32 [R, length] of b-bit values."""
    r = words.shape[0]
    if not words.is_contiguous() or words.stride(-1) != 1:  # e.g. [G, 1] of a transposed slice: strides (1, G)
        words = words.clone(memory_format=torch.contiguous_format)
    by = words.view(torch.uint8).view(r, -1)  # little-endian bytes of each word
    bit = (by[..., None] >> torch.arange(8, dtype=torch.uint8, device=words.device)) & 1  # [R, 4C, 8]
    bit = bit.reshape(r, -1)[:, : length * bits].reshape(r, length, bits).to(torch.int32)
    return (bit << torch.arange(bits, dtype=torch.int32, device=words.device)).sum(-1, dtype=torch.int32)


class CompressedFormat(HubFormat):
    """compressed-tensors pack-quantized (see the module docstring)."""

    PREFIX = PREFIX

    def __init__(self, bits: int = 4, group: int | None = 128, sym: bool = True,
                 scale_dtype: torch.dtype = torch.float16, compute_dtype: torch.dtype | None = None,
                 group_size: int = 128, act_order: bool = False):
        super().__init__(compute_dtype, group_size)
        if bits not in (2, 4, 8):
            raise ValueError(f"pack-quantized num_bits {bits!r}: this runtime reads 2, 4 or 8 bits")
        if group is not None and (not isinstance(group, int) or group <= 0):
            raise ValueError(f"pack-quantized group_size must be a positive integer, got {group!r}")
        if act_order and group is None:
            raise ValueError("pack-quantized activation ordering (weight_g_idx) needs strategy 'group'")
        self.bits, self.group, self.sym, self.scale_dtype = bits, group, sym, scale_dtype
        self.act_order = act_order
        tokens = [str(bits), "ch" if group is None else f"g{group}", "sym" if sym else "asym"]
        tokens += ["act"] if act_order else []
        tokens += [] if scale_dtype == torch.float16 else [{torch.bfloat16: "bf16", torch.float32: "fp32"}[scale_dtype]]
        self.name = PREFIX + ",".join(tokens)

    @classmethod
    def from_name(cls, name, compute_dtype=None, group_size=128):
        sdt, t = scale_token(parse_tokens(name, PREFIX), torch.float16, name)
        try:
            if (len(t) not in (3, 4) or t[2] not in ("sym", "asym") or not (t[1] == "ch" or t[1].startswith("g"))
                    or t[3:] not in ([], ["act"])):
                raise ValueError
            group = None if t[1] == "ch" else int(t[1][1:])
            bits = int(t[0])
        except ValueError:
            raise ValueError(f"expert format {name!r}: expected 'ct:<bits>,g<group>|ch,sym|asym[,act]'") from None
        return cls(bits, group, t[2] == "sym", sdt, compute_dtype, group_size, act_order=t[3:] == ["act"])

    def groups(self, k: int) -> int:
        return 1 if self.group is None else -(-k // self.group)

    def matrix_specs(self, n, k):
        b, g = self.bits, self.groups(k)
        out = [("weight_packed", torch.int32, (n, -(-k * b // 32))), ("weight_scale", self.scale_dtype, (n, g))]
        if not self.sym:
            out.append(("weight_zero_point", torch.int32, (-(-n * b // 32), g)))
        if self.act_order:
            out.append(("weight_g_idx", torch.int32, (k,)))
        return out

    def meta_specs(self, n, k):
        return [("weight_shape", ("I32", "I64"), (2,), [n, k])]

    def row_slices(self, n, k):
        # weight_packed and weight_scale by row; the zero points by packed row (32 / bits rows a word row:
        # bits divides 32, so a value never straddles two words there); weight_g_idx is read whole
        out = {"weight_packed": (0, 1), "weight_scale": (0, 1)}
        if not self.sym:
            out["weight_zero_point"] = (0, 32 // self.bits)
        return out

    def dequant_matrix(self, t, n, k):
        b = self.bits
        q = unpack_dense(t["weight_packed"], b, k)  # [N, K] unsigned
        if self.act_order:
            gi = t["weight_g_idx"].long()  # [K]: each column's group
        else:
            gi = torch.arange(k, device=q.device) // (k if self.group is None else self.group)
        s = t["weight_scale"].float()[:, gi]
        if self.sym:
            return (q - (1 << (b - 1))).float() * s
        zp = unpack_dense(t["weight_zero_point"].t().contiguous(), b, n).t()  # [N, G] unsigned
        return (q - zp[:, gi]).float() * s

    def check_matrix(self, t, n, k):
        if not self.act_order:
            return None
        g, groups = t["weight_g_idx"], self.groups(k)
        lo, hi = int(g.min()), int(g.max())
        if lo < 0 or hi >= groups:
            return f"weight_g_idx holds group {lo if lo < 0 else hi}, outside [0, {groups}) groups"
        return None
