"""Quantization: schemes, QuantLinear, block-streamed calibration, and checkpoint conversion."""
from .api import quantize_, quantized_skeleton
from .calibrate import CalibrationResult, Calibrator, LayerPlan
from .config import PRECISIONS, QuantConfig
from .linear import QuantLinear

__all__ = ["quantize_", "quantized_skeleton", "CalibrationResult", "Calibrator", "LayerPlan", "PRECISIONS",
           "QuantConfig", "QuantLinear"]
