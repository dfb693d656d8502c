"""Predict future router choices: next-gate baseline, M2R2 accelerator adapters, oracle."""

from .accelerator import Accelerator, M2R2Predictor, model_fingerprint
from .predictors import NextGate, OraclePredictor

__all__ = ["Accelerator", "M2R2Predictor", "NextGate", "OraclePredictor", "model_fingerprint"]
