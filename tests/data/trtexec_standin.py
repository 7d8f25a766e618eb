"""A stand-in for NVIDIA's trtexec, for tests on machines without TensorRT or a GPU (TensorRT cannot be
installed here). It speaks the subset of trtexec's command line that redux-edge uses and writes the same
files in the formats trtexec writes them (sampleReporting.cpp: --exportOutput, --exportTimes,
--exportProfile), but the "engine" is a copy of the ONNX file, run by ONNX Runtime on the CPU.
It checks redux-edge's use of trtexec, not TensorRT.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

_DTYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
}


def main(argv):
    options = dict(arg[2:].split("=", 1) if "=" in arg else (arg[2:], "") for arg in argv)
    if "help" in options:
        # A test stands in for several boards by giving each its TensorRT version.
        version = os.environ.get("TRTEXEC_STANDIN_VERSION", "100300")
        print(
            f"&&&& RUNNING TensorRT.trtexec [TensorRT v{version}] # trtexec --help (redux-edge test stand-in)"
        )
        return 0
    if "onnx" in options:  # build
        onnx_file = Path(options["onnx"])
        onnx.checker.check_model(str(onnx_file))
        # An engine holds its weights: external data (the bundle's weights.bin) is read in, as TensorRT's
        # parser does.
        onnx.save(onnx.load(str(onnx_file)), options["saveEngine"])
        print(f"[I] stand-in engine for {onnx_file.name} saved to {options['saveEngine']}")
        return 0
    engine = options["loadEngine"]
    model = onnx.load(engine)
    feeds = {}
    for spec in options["loadInputs"].split(","):
        name, path = spec.rsplit(":", 1)
        name = name.strip("'")
        value = next(v for v in model.graph.input if v.name == name)
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[name] = np.fromfile(path, _DTYPES[value.type.tensor_type.elem_type]).reshape(shape)
    session_options = ort.SessionOptions()
    profiling = "exportProfile" in options
    session_options.enable_profiling = profiling
    if profiling:
        session_options.profile_file_prefix = str(Path(options["exportProfile"]).with_suffix(""))
    session = ort.InferenceSession(engine, session_options, providers=["CPUExecutionProvider"])
    iterations = int(options.get("iterations", 10))
    deadline = time.perf_counter() + float(options.get("duration", 0))
    times = []
    while len(times) < iterations or time.perf_counter() < deadline:
        start = time.perf_counter()
        outputs = session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000.0)
    if "exportOutput" in options:
        exported = [
            {
                "name": o.name,
                "dimensions": "x".join(str(s) for s in array.shape),
                "values": array.ravel().tolist(),
            }
            for o, array in zip(session.get_outputs(), outputs, strict=True)
        ]
        Path(options["exportOutput"]).write_text(json.dumps(exported))
    if "exportTimes" in options:
        Path(options["exportTimes"]).write_text(json.dumps([{"computeMs": t, "latencyMs": t} for t in times]))
    if profiling:
        events = json.loads(Path(session.end_profiling()).read_text())
        kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        total = sum(e["dur"] for e in kernels) or 1
        layers = {}
        for event in kernels:
            layers[event["name"]] = layers.get(event["name"], 0) + event["dur"] / 1000.0
        profile = [{"count": iterations}] + [
            {
                "name": n,
                "timeMs": t,
                "averageMs": t / iterations,
                "medianMs": t / iterations,
                "percentage": t / total,
            }
            for n, t in layers.items()
        ]
        Path(options["exportProfile"]).write_text(json.dumps(profile))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
