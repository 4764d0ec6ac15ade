"""Quantization: calibration data, the quantization plan, ONNX and TFLite int8 conversion."""
