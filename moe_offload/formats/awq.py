"""AWQ experts as AutoAWQ writes them (quantization_config quant_method "awq", version "gemm", 4 bits,
zero_point true): the layout of every published *-AWQ checkpoint.

One matrix [N out, K in] in the file, G = ceil(K / group_size):
  qweight  int32 [K, N / 8]   packed along the OUTPUT: word qweight[k, c] holds columns 8c .. 8c+7 in
                              AWQ's nibble order: bits 4i hold column 8c + ORDER[i], ORDER = [0, 2, 4, 6,
                              1, 3, 5, 7]
  qzeros   int32 [G, N / 8]   the zero points, packed the same way
  scales   fp16  [G, N]
Dequantization: w[n, k] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n] (no zero offset).
Other versions ('gemv', 'exllama', 'marlin', ...) store other layouts and are refused by name.

Name: 'awq:4,g128'.
"""

from __future__ import annotations

import torch

from .gptq import unpack_cols
from .hub import HubFormat, gather_cols, parse_tokens, scale_token

PREFIX = "awq:"
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column ORDER[i] of its 8
REVERSE = tuple(ORDER.index(j) for j in range(8))  # column j sits in nibble REVERSE[j]


def unpack_awq(words: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [R, N/8] in AWQ's order -> int32 [R, n] in column order."""
    v = unpack_cols(words, 4, 8 * words.shape[1]).view(words.shape[0], -1, 8)  # [R, N/8, nibble]
    rev = torch.tensor(REVERSE, device=words.device)
    return v[..., rev].reshape(words.shape[0], -1)[:, :n]


class AwqFormat(HubFormat):
    """AWQ GEMM int4 (see the module docstring)."""

    PREFIX = PREFIX

    def __init__(self, bits: int = 4, group: int = 128, scale_dtype: torch.dtype = torch.float16,
                 compute_dtype: torch.dtype | None = None, group_size: int = 128):
        super().__init__(compute_dtype, group_size)
        if bits != 4:
            raise ValueError(f"AWQ bits {bits}: this runtime reads AWQ GEMM with bits 4")
        if not isinstance(group, int) or group <= 0:
            raise ValueError(f"AWQ group_size must be a positive integer, got {group!r}")
        self.bits, self.group, self.scale_dtype = bits, group, scale_dtype
        self.name = f"{PREFIX}{bits},g{group}" + ("" if scale_dtype == torch.float16 else
                                                   "," + {torch.bfloat16: "bf16", torch.float32: "fp32"}[scale_dtype])

    @classmethod
    def from_name(cls, name, compute_dtype=None, group_size=128):
        sdt, t = scale_token(parse_tokens(name, PREFIX), torch.float16, name)
        try:
            if len(t) != 2 or not t[1].startswith("g"):
                raise ValueError
            return cls(int(t[0]), int(t[1][1:]), sdt, compute_dtype, group_size)
        except ValueError as exc:
            if "AWQ" in str(exc):
                raise
            raise ValueError(f"expert format {name!r}: expected 'awq:4,g<group>'") from None

    def matrix_specs(self, n, k):
        g = -(-k // self.group)
        return [("qweight", torch.int32, (k, -(-n // 8))), ("qzeros", torch.int32, (g, -(-n // 8))),
                ("scales", self.scale_dtype, (g, n))]

    def row_slices(self, n, k):
        # a word holds 8 output columns (in AWQ's nibble order): qweight and qzeros by word, scales by column
        return {"qweight": (1, 8), "qzeros": (1, 8), "scales": (1, 1)}

    def dequant_matrix(self, t, n, k):
        q = unpack_awq(t["qweight"], n)  # [K, N]
        z = unpack_awq(t["qzeros"], n)  # [G, N]
        g = torch.arange(k, device=q.device) // self.group
        return (q.t() - gather_cols(z, g)).float() * gather_cols(t["scales"].float(), g)
