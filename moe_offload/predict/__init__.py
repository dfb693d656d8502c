"""Predict future router choices: next-gate baseline, M2R2 accelerator adapters, oracle."""

from .accelerator import Accelerator, M2R2Predictor, m2r2_lookahead, model_fingerprint
from .predictors import NextGate

__all__ = ["Accelerator", "M2R2Predictor", "m2r2_lookahead", "NextGate", "model_fingerprint"]
