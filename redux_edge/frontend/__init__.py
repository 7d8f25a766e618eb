"""Frontends: bring a model into the IR (an in-memory ``onnx_ir.Model``), from PyTorch or an ONNX file."""
