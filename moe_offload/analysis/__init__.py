"""Offline analysis: routing traces (record/replay), the cache benchmark and the decode timeline
simulator. They drive the offload engine through the same public interfaces the model uses."""
