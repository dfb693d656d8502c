"""FP8 e4m3 experts with block scales, as DeepSeek-V3 and Qwen3-*-FP8 ship them (quantization_config
quant_method "fp8", fmt "e4m3", weight_block_size [128, 128], activation_scheme "dynamic").

One matrix [N, K] in the file: `weight` float8_e4m3fn [N, K] and `weight_scale_inv` [ceil(N/bn),
ceil(K/bk)] (float32 in DeepSeek-V3; bf16 where a checkpoint ships it so: the format name then says
',bf16'). Dequantization: w[n, k] = float(q[n, k]) * scale_inv[n // bn, k // bk] in float32 (the
"inverse" is the name's: the stored value multiplies). Activations are quantized by the serving kernels
of those checkpoints; here the weights are dequantized and the activations stay in the compute dtype
(weight-only, as transformers' dequantize=True load does).

Name: 'fp8:128x128' (block rows x block columns), e.g. 'fp8:128x128,bf16'.
"""

from __future__ import annotations

import torch

from .hub import HubFormat, parse_tokens, scale_token

PREFIX = "fp8:"


def dequant_fp8_block(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """q float8_e4m3fn [N, K], s [ceil(N/bn), ceil(K/bk)] -> float32 [N, K]."""
    n, k = q.shape
    bn, bk = block
    rows = torch.arange(n, device=q.device) // bn
    cols = torch.arange(k, device=q.device) // bk
    return q.float() * s.float()[rows][:, cols]


class Fp8BlockFormat(HubFormat):
    """float8_e4m3fn weights with one scale per block of bn x bk (see the module docstring)."""

    PREFIX = PREFIX
    default_scale_dtype = torch.float32

    def __init__(self, block: tuple[int, int] = (128, 128), scale_dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype | None = None, group_size: int = 128):
        super().__init__(compute_dtype, group_size)
        if len(block) != 2 or any(not isinstance(b, int) or b <= 0 for b in block):
            raise ValueError(f"FP8 weight_block_size must be two positive integers, got {list(block)}")
        self.block, self.scale_dtype = tuple(block), scale_dtype
        self.name = f"{PREFIX}{block[0]}x{block[1]}" + ("" if scale_dtype == torch.float32 else
                                                        "," + {torch.bfloat16: "bf16", torch.float16: "fp16"}[scale_dtype])

    @classmethod
    def from_name(cls, name, compute_dtype=None, group_size=128):
        sdt, rest = scale_token(parse_tokens(name, PREFIX), torch.float32, name)
        try:
            (blk,) = rest
            bn, bk = (int(x) for x in blk.split("x"))
        except ValueError:
            raise ValueError(f"expert format {name!r}: expected 'fp8:<rows>x<cols>[,bf16]', e.g. 'fp8:128x128'") from None
        return cls((bn, bk), sdt, compute_dtype, group_size)

    def scale_shape(self, n: int, k: int) -> tuple[int, int]:
        return -(-n // self.block[0]), -(-k // self.block[1])

    def matrix_specs(self, n, k):
        return [("weight", torch.float8_e4m3fn, (n, k)), ("weight_scale_inv", self.scale_dtype, self.scale_shape(n, k))]

    def row_slices(self, n, k):
        # weight by row, weight_scale_inv by block row (bn output rows a scale row)
        return {"weight": (0, 1), "weight_scale_inv": (0, self.block[0])}

    def dequant_matrix(self, t, n, k):
        return dequant_fp8_block(t["weight"], t["weight_scale_inv"], self.block)

    def check_matrix(self, t, n, k):
        s = t["weight_scale_inv"].float()
        if not bool(torch.isfinite(s).all()):
            return "weight_scale_inv holds NaN/Inf"
        if bool(((t["weight"].view(torch.uint8) & 0x7F) == 0x7F).any()):
            return "weight holds float8 NaN values"
        return None
