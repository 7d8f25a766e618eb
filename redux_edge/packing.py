"""Bundle storage of weights: one copy of each shared weight on the host, N:M-sparse weights packed.

A host bundle holds two ONNX graphs when the backend's artifact is one (ONNX Runtime's optimised
graph beside the portable ``model.onnx``); their weights are mostly the same bytes. ``share_weights`` stores
each such weight once, in the artifact's standard external data (``artifact/weights.bin``), which both
graphs name, so the bundle is not twice its model and a device (which receives the artifact) is unchanged.

N:M-sparse weights:

Every ONNX file of a sparse bundle keeps its N:M weights as standard ONNX external data in a dense file
(``model.onnx.data``), so that ``onnx``, ONNX Runtime, TensorRT's parser and Netron open the bundle's files
as they are. Beside it the bundle holds ``model.onnx.packed``: per group of M weights along the reduction
axis, the N kept values (float32) and their positions (ceil(log2 M) bits each, so 2:4 takes 8.5 of 16
bytes). Flash sends and the device stores the packed file instead of the dense one
(``redux_edge.bundle.device_files``); the runner expands it into ONNX Runtime's session
(``add_external_initializers``) without writing anything, or writes the dense file for tools that read
ONNX files (``runner/run.py --expand``; TensorRT's engine build does it first). The index lives in the
manifest, under ``storage``.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from redux_edge.ir import nm

__all__ = ["PORTABLE_IR", "pack_bundle_models", "share_weights"]

_PACKED_SUFFIX, _DENSE_SUFFIX = ".packed", ".data"
# The bundle's portable IR, which a device does not receive (``redux_edge.bundle``).
PORTABLE_IR = "model.onnx"


def _reduction_axis(node: onnx.NodeProto, rank: int) -> int | None:
    """The reduction axis of the weight input (index 1) of ``node`` as stored, None for other ops."""
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    # ONNX Runtime's artifacts hold its fused forms (FusedConv, FusedGemm, FusedMatMul).
    if node.op_type in ("MatMul", "FusedMatMul", "Gemm", "FusedGemm") and rank == 2:
        return 1 if attributes.get("transB", 0) else 0
    if node.op_type in ("Conv", "FusedConv") and rank >= 3 and attributes.get("group", 1) == 1:
        return 1
    return None


def _weight_axes(graph: onnx.GraphProto) -> dict[str, int]:
    axes: dict[str, int | None] = {}
    ranks = {init.name: len(init.dims) for init in graph.initializer}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name not in ranks:
                continue
            axis = _reduction_axis(node, ranks[name]) if index == 1 else None
            # A tensor used anywhere but as such a weight, or with two different axes, stays dense.
            axes[name] = axis if axes.get(name, axis) == axis else None
    return {name: axis for name, axis in axes.items() if axis is not None}


def _pack(array: np.ndarray, axis: int, n: int, m: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(kept values [groups, n], position bits as bytes), or None when ``array`` is not N:M along ``axis``."""
    reduction_second = np.moveaxis(array, axis, 1)  # the layout redux_edge.ir.nm groups along
    if array.shape[axis] % m or nm.violations(reduction_second, n, m):
        return None
    grouped = nm.groups(reduction_second, m)
    # Non-zeros first (a group with fewer than n non-zeros keeps some zeros), then in position order.
    positions = np.sort(np.argsort(grouped == 0, axis=1, kind="stable")[:, :n], axis=1).astype(np.uint8)
    values = np.take_along_axis(grouped, positions.astype(np.int64), axis=1)
    bits = math.ceil(math.log2(m))
    position_bits = np.unpackbits(positions.reshape(-1, 1), axis=1)[:, 8 - bits :]
    return values.astype(np.float32), np.packbits(position_bits.reshape(-1))


def _point_at(initializer: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``initializer`` standard ONNX external data: ``length`` bytes at ``offset`` of ``location``."""
    initializer.ClearField("raw_data")
    initializer.ClearField("float_data")
    initializer.data_location = onnx.TensorProto.EXTERNAL
    del initializer.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = initializer.external_data.add()
        entry.key, entry.value = key, str(value)


def pack_model_file(path: Path, n: int, m: int, min_bytes: int = 4096) -> dict | None:
    """Rewrite the ONNX file ``path`` with its N:M float32 weights packed; the index, None if none."""
    model = onnx.load(str(path))
    dense_name, packed_name = path.name + _DENSE_SUFFIX, path.name + _PACKED_SUFFIX
    tensors, dense_offset, dense_chunks, chunks, packed_offset = {}, 0, [], [], 0
    axes = _weight_axes(model.graph)
    for initializer in model.graph.initializer:
        axis = axes.get(initializer.name)
        if axis is None or initializer.data_type != onnx.TensorProto.FLOAT:
            continue
        # Masked weights hold -0.0 where a negative weight was zeroed; +0.0 is what unpacking restores, so
        # the dense file is the packed file's exact expansion (same bytes, same results).
        array = numpy_helper.to_array(initializer) + np.float32(0)
        packed = _pack(array, axis, n, m) if array.nbytes >= min_bytes else None
        if packed is None:
            continue
        values, positions = packed
        tensors[initializer.name] = {
            "shape": list(array.shape),
            "axis": axis,
            "dense_offset": dense_offset,
            "dense_bytes": array.nbytes,
            "values_offset": packed_offset,
            "values": int(values.size),
            "positions_offset": packed_offset + values.nbytes,
            "positions_bytes": int(positions.size),
        }
        chunks += [values.tobytes(), positions.tobytes()]
        dense_chunks.append(array.tobytes())
        packed_offset += values.nbytes + positions.size
        _point_at(initializer, dense_name, dense_offset, array.nbytes)
        dense_offset += array.nbytes
    if not tensors:
        return None
    (path.parent / packed_name).write_bytes(b"".join(chunks))
    (path.parent / dense_name).write_bytes(b"".join(dense_chunks))
    onnx.save(model, str(path))
    return {"pattern": f"{n}:{m}", "packed": packed_name, "dense": dense_name, "tensors": tensors}


def pack_bundle_models(stage: Path, n: int, m: int) -> dict:
    """Pack every ONNX file of the bundle being built in ``stage``; the manifest's ``storage`` entry. Its
    figures count what a device stores: the artifact's files, not the portable IR's, unless the IR is the
    only ONNX file (a backend whose artifact is another format)."""
    files = {}
    for path in sorted(stage.rglob("*.onnx")):
        index = pack_model_file(path, n, m)
        if index is not None:
            files[path.relative_to(stage).as_posix()] = index
    stored = [index for relative, index in files.items() if relative != PORTABLE_IR] or list(files.values())
    dense = sum(t["dense_bytes"] for index in stored for t in index["tensors"].values())
    packed = sum(
        t["values"] * 4 + t["positions_bytes"] for index in stored for t in index["tensors"].values()
    )
    return {
        "packed_files": files,
        "sparse_weights_dense_bytes": dense,
        "sparse_weights_packed_bytes": packed,
        "packed_to_dense": packed / dense if dense else None,
    }


SHARED_WEIGHTS = "weights.bin"


_Key = tuple[int, tuple[int, ...], bytes]


def _tensor_key(initializer: onnx.TensorProto) -> _Key:
    return initializer.data_type, tuple(initializer.dims), hashlib.sha256(initializer.raw_data).digest()


def share_weights(stage: Path, portable: str, artifact: str, min_bytes: int = 1024) -> dict:
    """Store each weight that the ``portable`` IR and the ONNX ``artifact`` (paths relative to ``stage``)
    both hold inline, byte for byte, once: in ``weights.bin`` beside the artifact, named by both. Weights
    already in external data (packed N:M ones) and small ones stay where they are. Returns the manifest's
    ``storage`` figures: bytes stored once instead of twice."""
    artifact_path, portable_path = stage / artifact, stage / portable
    artifact_model = onnx.load(str(artifact_path), load_external_data=False)
    portable_model = onnx.load(str(portable_path), load_external_data=False)
    wanted = {
        _tensor_key(init)
        for init in portable_model.graph.initializer
        if init.data_location != onnx.TensorProto.EXTERNAL and len(init.raw_data) >= min_bytes
    }
    stored: dict[_Key, tuple[int, int]] = {}
    chunks, offset = [], 0
    for init in artifact_model.graph.initializer:
        key = _tensor_key(init)
        if init.data_location == onnx.TensorProto.EXTERNAL or key not in wanted:
            continue
        if key not in stored:
            # Offsets on page boundaries: ONNX Runtime maps such weights from the file instead of copying.
            data = init.raw_data
            padding = -offset % 4096
            chunks += [b"\0" * padding, data]
            offset += padding
            stored[key] = (offset, len(data))
            offset += len(data)
        _point_at(init, SHARED_WEIGHTS, *stored[key])
    if not stored:
        return {}
    location = posixpath.join(posixpath.dirname(artifact), SHARED_WEIGHTS)
    for init in portable_model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL and (key := _tensor_key(init)) in stored:
            _point_at(init, location, *stored[key])
    (artifact_path.parent / SHARED_WEIGHTS).write_bytes(b"".join(chunks))
    onnx.save(artifact_model, str(artifact_path))
    onnx.save(portable_model, str(portable_path))
    return {"shared_file": location, "shared_weights": len(stored), "shared_bytes": offset}
