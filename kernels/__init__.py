"""Quantization formats for tapped activations.

`codec` (numpy) is the specification; `onnx_codec` (in-graph ONNX), `torch_codec`
(server) and the native kernels in `cpp/` are tested bit for bit against it.
"""
