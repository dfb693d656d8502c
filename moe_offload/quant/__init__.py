"""Expert storage formats: byte layout and sizes (formats.py, one formula for info, the memory plan
and the simulator) and quantize / pack (pack.py)."""

from .formats import (DEFAULT_GROUP_SIZE, EXPERT_FORMATS, GROUP_SIZES, QUANT_FORMATS, expert_bytes,
                      expert_layout)

__all__ = ["DEFAULT_GROUP_SIZE", "EXPERT_FORMATS", "GROUP_SIZES", "QUANT_FORMATS", "expert_bytes", "expert_layout"]
