"""N:M-sparse weights stored packed on a device (written by ``redux_edge/packing.py``; a bundle on the host
also holds them as standard dense external data, which flash does not send): expanded when loaded, into
ONNX Runtime's session without writing anything, or into the dense external-data file for tools that
read ONNX files themselves (``--expand``; TensorRT's engine build does it first)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["add_packed_weights", "expand_packed", "file_name", "unpacked_weights"]


def unpacked_weights(folder: Path, index: dict) -> dict[str, np.ndarray]:
    """The dense weights of one packed ONNX file in ``folder`` (see redux_edge/packing.py): per group of
    M along the reduction axis, N kept float32 values and their positions in ceil(log2 M) bits each."""
    n, m = (int(part) for part in index["pattern"].split(":"))
    bits = (m - 1).bit_length()
    blob = (folder / file_name(index["packed"])).read_bytes()
    weights = {}
    for name, entry in index["tensors"].items():
        values = np.frombuffer(blob, np.float32, entry["values"], entry["values_offset"]).reshape(-1, n)
        raw = np.frombuffer(blob, np.uint8, entry["positions_bytes"], entry["positions_offset"])
        position_bits = np.unpackbits(raw)[: values.size * bits].reshape(-1, bits).astype(np.int64)
        positions = (position_bits @ (1 << np.arange(bits - 1, -1, -1))).reshape(-1, n)
        grouped = np.zeros((values.shape[0], m), np.float32)
        np.put_along_axis(grouped, positions, values, axis=1)
        shape, axis = entry["shape"], entry["axis"]
        moved = [size for i, size in enumerate(shape) if i != axis] + [shape[axis]]
        weights[name] = np.ascontiguousarray(np.moveaxis(grouped.reshape(moved), -1, axis))
    return weights


def add_packed_weights(options, bundle_dir: Path, relative: str, storage: dict) -> list:
    """Give an ONNX Runtime session the expanded packed weights of the bundle file ``relative``. Returns
    the arrays and OrtValues, which the caller keeps as long as the session: an OrtValue made from numpy
    shares the array's memory and does not keep the array alive."""
    import onnxruntime as ort

    packed = storage.get("packed_files", {}).get(relative)
    folder = (bundle_dir / relative).parent
    if not packed or _dense_on_disk(folder, packed):
        return []  # dense, or stored as standard external data, which ONNX Runtime reads itself
    weights = unpacked_weights(folder, packed)
    values = [ort.OrtValue.ortvalue_from_numpy(array) for array in weights.values()]
    options.add_external_initializers(list(weights), values)
    return [weights, values]


def expand_packed(bundle_dir: Path, storage: dict) -> list[Path]:
    """Write the dense external-data files of every packed ONNX file, for tools that read ONNX files
    (trtexec, onnx, OpenVINO's reader) where they are not there already; returns the files written."""
    written = []
    for relative, index in storage.get("packed_files", {}).items():
        folder = (bundle_dir / relative).parent
        # A device holds only the files its runner reads (no portable model.onnx unless flashed with it).
        if _dense_on_disk(folder, index) or not (bundle_dir / relative).is_file():
            continue
        dense = bytearray(sum(entry["dense_bytes"] for entry in index["tensors"].values()))
        for name, array in unpacked_weights(folder, index).items():
            entry = index["tensors"][name]
            dense[entry["dense_offset"] : entry["dense_offset"] + entry["dense_bytes"]] = array.tobytes()
        target = folder / file_name(index["dense"])
        target.write_bytes(bytes(dense))
        written.append(target)
    return written


def _dense_on_disk(folder: Path, index: dict) -> bool:
    """The packed file's dense twin is there (a bundle on the host), so nothing needs expanding."""
    return (folder / file_name(index["dense"])).is_file()


def file_name(name: str) -> str:
    """A file name from the manifest, which must not lead out of the bundle's folder."""
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"the manifest names a packed-weights file outside its folder: {name!r}")
    return name
