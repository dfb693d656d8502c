"""The one exception type users catch: every bad input raises MoeOffloadError (or a subclass)."""


class MoeOffloadError(Exception):
    """A problem with the user's input: a file, tensor, flag or number. The message names it."""


class ConfigError(MoeOffloadError):
    """config.json is missing, unreadable, of an unsupported model type, or inconsistent."""


class CheckpointError(MoeOffloadError):
    """Weights are missing, unexpected, misshaped, of a bad dtype, or a shard is truncated/corrupt."""


class NonFiniteError(MoeOffloadError):
    """A weight or the model's output holds NaN or Inf: the checkpoint (or its quantization) is broken."""
