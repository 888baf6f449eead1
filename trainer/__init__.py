"""The server: trains the side network from streamed activations (PyTorch)."""
