"""Quantized checkpoints on disk (compressed-tensors pack-quantized: ckpt.py) and `moe-offload quantize`
(export.py). The expert formats themselves are moe_offload.formats."""
