"""The device process: ONNX Runtime forward passes, quantized taps, streaming. Never imports torch."""
