#!/usr/bin/env python
"""Tune fused_moe tile configs on this GPU and write moe_offload/kernels/tile_configs/<device>.json.

For each token count M, times every config of a small grid with triton.testing.do_bench and keeps
the fastest one that is also correct. The runtime then looks configs up by nearest M.

    python benchmarks/tune_fused_moe.py [--tokens 1,4,16,64,256,1024] [--out FILE]   # GPU, a few minutes
    TRITON_INTERPRET=1 python benchmarks/tune_fused_moe.py --smoke --out t.json  # checks the script
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from moe_offload.kernels import TileConfig, fused_moe, fused_moe_reference
from moe_offload.kernels.configs import TABLE_DIR, device_key
from moe_offload.results import result_metadata, write_json_atomic

GRID = dict(block_m=[16, 32, 64, 128], block_n=[32, 64, 128], block_k=[32, 64, 128], num_warps=[4, 8],
            num_stages=[2, 3, 4])
SMOKE_GRID = dict(block_m=[16, 32], block_n=[32], block_k=[32], num_warps=[1], num_stages=[1])


def time_config(cfg: TileConfig, args: tuple, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(lambda: fused_moe(*args, config=cfg), warmup=5, rep=25,
                                       return_mode="median")
    t0 = time.perf_counter()
    fused_moe(*args, config=cfg)
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,4,16,64,256,1024")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and grid, CPU under TRITON_INTERPRET=1")
    ap.add_argument("--out", default=None, help="default: moe_offload/kernels/tile_configs/<device>.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grid = SMOKE_GRID if args.smoke else GRID
    if args.smoke:
        args.hidden, args.inter, args.tokens = 64, 64, "1,16"
    elif device.type != "cuda":
        raise SystemExit("tune_fused_moe.py needs a GPU (or --smoke with TRITON_INTERPRET=1)")
    dtype = torch.bfloat16
    h, i, e, k = args.hidden, args.inter, args.experts, args.top_k
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5).to(dtype).to(device)
    w2 = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(dtype).to(device)
    slot_of = torch.arange(e, dtype=torch.int32, device=device)
    best: dict[str, dict] = {}
    for m in [int(v) for v in args.tokens.split(",")]:
        hidden = torch.randn(m, h, generator=g).to(dtype).to(device)
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)]).to(device)
        w = torch.softmax(torch.randn(m, k, generator=g), -1).to(device)
        call = (hidden, ids, w, w13, w2, slot_of)
        ref = fused_moe_reference(*call).float()
        timed = []
        for values in itertools.product(*grid.values()):
            cfg = TileConfig(**dict(zip(grid, values)))
            try:
                err = ((fused_moe(*call, config=cfg).float() - ref).abs().max() / ref.abs().max()).item()
                if err > 3e-2:
                    continue
                timed.append((time_config(cfg, call, device), cfg))
            except Exception as exc:  # out of shared memory etc.: skip that config
                print(f"M={m} {cfg}: skipped ({type(exc).__name__})")
        ms, cfg = min(timed, key=lambda x: x[0])
        best[str(m)] = cfg.as_dict()
        print(f"M={m:5d}  best {ms:.3f} ms  {cfg}", flush=True)
    out = args.out or TABLE_DIR / f"{device_key(device)}.json"
    table = {**result_metadata(device), "source": "benchmarks/tune_fused_moe.py",
             "shapes": {"hidden": h, "inter": i, "experts": e, "top_k": k}, "configs": best}
    print(f"wrote {write_json_atomic(out, table)}")


if __name__ == "__main__":
    main()
