"""Expert storage formats: their byte sizes (one formula for info, the memory plan and the simulator)."""

from .formats import DEFAULT_GROUP_SIZE, EXPERT_FORMATS, expert_bytes

__all__ = ["DEFAULT_GROUP_SIZE", "EXPERT_FORMATS", "expert_bytes"]
