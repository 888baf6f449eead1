"""Export a frozen decoder into a tapped, self-quantizing ONNX engine (needs torch)."""
