"""GPTQ experts as AutoGPTQ / GPTQModel / optimum write them (quantization_config quant_method "gptq",
checkpoint_format "gptq", the published layout; "gptq_v2" without the zero offset also reads).

One matrix [N out, K in] in the file, bits b in {4, 8}, W = 32 / b values per int32 word, G groups:
  qweight  int32 [K / W, N]   packed along the input: value k of column n is bits b * (k % W) of word
                              qweight[k // W, n]
  qzeros   int32 [G, N / W]   packed along the output the same way: zero of (group g, column n) is bits
                              b * (n % W) of word qzeros[g, n // W]; "gptq" stores zero - 1 (mod 2**b)
  scales   fp16  [G, N]
  g_idx    int32 [K]          the group of each input k: k // group_size, or a permutation's groups when
                              the checkpoint was quantized in activation order (desc_act)
  bias     float [N]         optional (old AutoGPTQ wrote one for every quantized linear, zeros where
                              the layer has no bias): read and checked all zero at load, not stored
G = ceil(K / group_size), or 1 when group_size is -1 (one group per column).
Dequantization: w[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n] with z = stored + 1 (mod 2**b)
for "gptq" (AutoGPTQ's reference unpacks zeros this way), stored as is for "gptq_v2". Symmetric
checkpoints store z = 2**(b-1) like any other; `sym` and `desc_act` only name the checkpoint.

Name: 'gptq:4,g128,sym' (+ ',act' for desc_act, ',v2' for gptq_v2, 'gch' for group_size -1).
"""

from __future__ import annotations

import torch

from .hub import HubFormat, gather_cols, parse_tokens, scale_token

PREFIX = "gptq:"
BITS = (4, 8)


def unpack_rows(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """int32 [R, C] packed along dim 0 (W values per word, first in the low bits) -> int32 [length, C]."""
    per = 32 // bits
    shifts = (torch.arange(per, dtype=torch.int32, device=words.device) * bits).view(1, per, 1)
    v = (words[:, None, :] >> shifts) & ((1 << bits) - 1)  # [R, W, C]; the sign bits are masked off
    return v.reshape(-1, words.shape[1])[:length]


def unpack_cols(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """int32 [R, C] packed along dim 1 -> int32 [R, length]."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=words.device) * bits
    v = (words[..., None] >> shifts) & ((1 << bits) - 1)  # [R, C, W]
    return v.reshape(words.shape[0], -1)[:, :length]


class GptqFormat(HubFormat):
    """GPTQ int4 / int8 (see the module docstring)."""

    PREFIX = PREFIX

    def __init__(self, bits: int = 4, group: int = 128, sym: bool = True, act_order: bool = False, v2: bool = False,
                 scale_dtype: torch.dtype = torch.float16, compute_dtype: torch.dtype | None = None,
                 group_size: int = 128):
        super().__init__(compute_dtype, group_size)
        if bits not in BITS:
            raise ValueError(f"GPTQ bits {bits}: this runtime reads GPTQ with bits {' or '.join(map(str, BITS))}")
        if group != -1 and (not isinstance(group, int) or group <= 0):
            raise ValueError(f"GPTQ group_size must be positive or -1, got {group!r}")
        self.bits, self.group, self.sym, self.act_order, self.v2 = bits, group, sym, act_order, v2
        self.scale_dtype = scale_dtype
        tokens = [str(bits), "gch" if group == -1 else f"g{group}", "sym" if sym else "asym"]
        tokens += (["act"] if act_order else []) + (["v2"] if v2 else [])
        tokens += [] if scale_dtype == torch.float16 else [{torch.bfloat16: "bf16", torch.float32: "fp32"}[scale_dtype]]
        self.name = PREFIX + ",".join(tokens)

    @classmethod
    def from_name(cls, name, compute_dtype=None, group_size=128):
        sdt, t = scale_token(parse_tokens(name, PREFIX), torch.float16, name)
        try:
            bits, g = int(t[0]), t[1]
            group = -1 if g == "gch" else int(g.removeprefix("g"))
            if not g.startswith("g") or t[2] not in ("sym", "asym") or set(t[3:]) - {"act", "v2"}:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"expert format {name!r}: expected 'gptq:<bits>,g<group>|gch,sym|asym[,act][,v2]'") from None
        return cls(bits, group, t[2] == "sym", "act" in t[3:], "v2" in t[3:], sdt, compute_dtype, group_size)

    def groups(self, k: int) -> int:
        return 1 if self.group == -1 else -(-k // self.group)

    def matrix_specs(self, n, k):
        per, g = 32 // self.bits, self.groups(k)
        return [("qweight", torch.int32, (-(-k // per), n)), ("qzeros", torch.int32, (g, -(-n // per))),
                ("scales", self.scale_dtype, (g, n)), ("g_idx", torch.int32, (k,))]

    def row_slices(self, n, k):
        # qweight and scales by column; qzeros by packed column (32 / bits output columns a word); g_idx whole
        return {"qweight": (1, 1), "qzeros": (1, 32 // self.bits), "scales": (1, 1)}

    def dequant_matrix(self, t, n, k):
        b = self.bits
        q = unpack_rows(t["qweight"], b, k)  # [K, N]
        z = unpack_cols(t["qzeros"], b, n)  # [G, N]
        if not self.v2:
            z = (z + 1) & ((1 << b) - 1)
        g = t["g_idx"]
        return (q.t() - gather_cols(z, g)).float() * gather_cols(t["scales"].float(), g)

    def zero_specs(self, n, k):
        return [("bias", (n,))]

    def check_matrix(self, t, n, k):
        g = t["g_idx"]
        lo, hi = int(g.min()), int(g.max())
        if lo < 0 or hi >= self.groups(k):
            return f"g_idx holds group {lo if lo < 0 else hi}, outside [0, {self.groups(k)}) groups"
        return None
