"""The IR: ONNX held in memory as ``onnx_ir.Model``; analysis (cost) and checks (verify) on it."""
