"""Trace sets from simulation or from a probe: samples [n, length] and the known inputs [n, weights].

Readers (each validated, never unpickling): plain ``.npy`` traces with their inputs in a second ``.npy``;
ChipWhisperer 5 projects (``<name>.cwp`` listing each segment's ``config_<prefix>.cfg``, beside which lie
``<prefix>traces.npy`` and ``<prefix>textin.npy``); estraces ETS files (HDF5: samples and a metadata
array ``operands``, or ``plaintext``); lascar-style ``.npz`` (``leakages`` and ``values``). Captured
inputs are the int8 operands of the attacked MACs in the kernel's loop order; byte arrays (ChipWhisperer's
textin) are read as int8. Samples are read lazily (memory-mapped .npy, HDF5 datasets) and handed out in
chunks, so that a capture larger than memory can be attacked.
"""

from __future__ import annotations

import configparser
import dataclasses
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from redux_edge.errors import UserError
from redux_edge.untrusted import npy_members

__all__ = ["TraceSet", "read_traces", "write_ets"]


@dataclasses.dataclass
class TraceSet:
    source: str
    samples: Any  # an array-like [n, length]: ndarray, memmap or h5py dataset
    operands: np.ndarray  # int8 [n, weights]

    def __len__(self) -> int:
        return self.samples.shape[0]

    @property
    def length(self) -> int:
        return self.samples.shape[1]

    def chunks(self, size: int = 2000, limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        end = len(self) if limit is None else min(limit, len(self))
        for start in range(0, end, size):
            stop = min(end, start + size)
            samples = np.asarray(self.samples[start:stop], dtype=np.float32)
            if not np.isfinite(samples).all():
                row = start + int(np.argwhere(~np.isfinite(samples))[0][0])
                raise UserError(
                    f"{self.source}: trace {row} holds NaN or infinite samples", "drop or re-capture it"
                )
            yield samples, self.operands[start:stop]


def read_traces(path: Path, inputs: Path | None = None, need_inputs: bool = True) -> TraceSet:
    """The trace set at ``path``; a t-test (``need_inputs=False``) reads plain .npy samples alone."""
    if not path.exists():
        raise UserError(f"{path} does not exist", "give a .npy, .npz, .ets/.h5 file or a ChipWhisperer .cwp")
    suffix = path.suffix.lower()
    try:
        if suffix == ".cwp":
            samples, operands = _chipwhisperer(path)
        elif suffix in (".ets", ".h5", ".hdf5"):
            samples, operands = _ets(path)
        elif suffix == ".npz":
            samples, operands = _lascar(path)
        elif suffix == ".npy":
            samples = _npy(path, mmap=True)
            if inputs is None and need_inputs:
                raise UserError(f"{path}: plain .npy traces need their inputs", "add --inputs inputs.npy")
            operands = _array(inputs) if inputs is not None else np.zeros((samples.shape[0], 1), np.int8)
        else:
            raise UserError(f"{path}: unknown trace format '{suffix}'", "use .npy, .npz, .ets/.h5 or .cwp")
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read traces from {path}: {exc}", "check the file and its format") from exc
    return _checked(str(path), samples, operands)


def _npy(path: Path, mmap: bool = False) -> np.ndarray:
    """A .npy file whose header has been checked against its size and the memory budget; samples are
    memory-mapped (``mmap``), so that a capture larger than memory is read in chunks."""
    npy_members(path, "save the array with numpy.save")
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def _array(path: Path) -> np.ndarray:
    return _npy(path)


def _checked(source: str, samples, operands: np.ndarray) -> TraceSet:
    if len(samples.shape) != 2 or 0 in samples.shape:
        raise UserError(
            f"{source}: samples must be [traces, samples], got {list(samples.shape)}", "one row a trace"
        )
    if not np.issubdtype(samples.dtype, np.number):
        raise UserError(f"{source}: samples are {samples.dtype}, not numbers", "store float or int samples")
    operands = np.asarray(operands)
    if operands.ndim == 1:
        operands = operands[:, None]
    if operands.ndim != 2 or operands.shape[1] == 0 or not np.issubdtype(operands.dtype, np.integer):
        raise UserError(
            f"{source}: inputs must be integers [traces, weights], got {operands.dtype} "
            f"{list(operands.shape)}",
            "store the int8 operands of the attacked MACs",
        )
    if operands.shape[0] != samples.shape[0]:
        raise UserError(
            f"{source}: {samples.shape[0]} traces but {operands.shape[0]} input rows",
            "give one input row per trace",
        )
    if operands.dtype == np.uint8:
        operands = operands.view(np.int8)
    if operands.min() < -128 or operands.max() > 127:
        raise UserError(f"{source}: inputs outside int8", "the operands are int8 values")
    return TraceSet(source, samples, operands.astype(np.int8))


def _chipwhisperer(project: Path) -> tuple[np.ndarray, np.ndarray]:
    samples, textins = [], []
    for config in _trace_configs(project):
        segment = _config(config)
        prefix = segment.get("Trace Config", "prefix", fallback=None)
        if prefix is None:
            raise UserError(f"{project}: {config.name} names no trace prefix", "copy the whole project")
        files = {
            name: _in_project(project, config.with_name(f"{prefix}{name}.npy"))
            for name in ("traces", "textin")
        }
        for path in files.values():
            if not path.is_file():
                raise UserError(f"{project}: segment {prefix} has no {path.name}", "copy the whole project")
        traces, textin = _npy(files["traces"], mmap=True), _npy(files["textin"])
        # ChipWhisperer grows its trace buffer ahead of the capture and saves it whole: rows past the
        # config's numTraces were never captured.
        count = segment.getint("Trace Config", "numTraces", fallback=len(traces))
        if not 0 <= count <= min(len(traces), len(textin)):
            raise UserError(
                f"{project}: segment {prefix} says {count} traces, its files hold {len(traces)} traces and "
                f"{len(textin)} inputs",
                "copy the whole project",
            )
        samples.append(np.asarray(traces[:count]))
        textins.append(textin[:count])
    return np.concatenate(samples), np.concatenate(textins)


def _trace_configs(project: Path) -> list[Path]:
    """The enabled segments' config files a ChipWhisperer 5 project lists (written with the capturing
    machine's path separator), else every config in ``<name>_data/traces``."""
    listed = _config(project)
    section = "Trace Management"
    configs = []
    for key, value in listed.items(section) if listed.has_section(section) else []:
        enabled = listed.get(section, key.replace("tracefile", "enabled"), fallback="True")
        if key.startswith("tracefile") and enabled.strip().lower() == "true":
            configs.append(_in_project(project, project.parent / value.replace("\\", "/")))
    if not configs:
        configs = sorted((project.parent / f"{project.stem}_data" / "traces").glob("config_*.cfg"))
    if not configs:
        raise UserError(f"{project}: lists no trace segments", "is this a ChipWhisperer project with traces?")
    missing = [str(path) for path in configs if not path.is_file()]
    if missing:
        raise UserError(f"{project}: missing {', '.join(missing)}", "copy the whole project")
    return configs


def _in_project(project: Path, path: Path) -> Path:
    """``path``, refused when it leads outside the project's folder (a project file is untrusted)."""
    if not path.resolve().is_relative_to(project.parent.resolve()):
        raise UserError(f"{project}: trace file {path} is outside the project", "copy the project")
    return path


def _config(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(path.read_text(errors="replace"))
    except configparser.Error as exc:
        raise UserError(f"{path}: not a ChipWhisperer config ({exc})", "check the project file") from exc
    return parser


def _ets(path: Path) -> tuple[Any, np.ndarray]:
    import h5py

    handle = h5py.File(path, "r")
    for key in ("operands", "plaintext"):
        if _hard_link(handle, f"metadata/{key}") is not None:
            traces = _hard_link(handle, "traces")
            if traces is None:
                raise UserError(f"{path}: no dataset 'traces'", "write the samples as an ETS file")
            return traces, np.asarray(_hard_link(handle, f"metadata/{key}"))
    raise UserError(f"{path}: no metadata 'operands' or 'plaintext'", "write the inputs as ETS metadata")


_LINKS = {"ExternalLink": "an external link", "SoftLink": "a soft link"}


def _hard_link(handle: Any, name: str) -> Any:
    """The dataset at ``name`` when every step to it is a link inside the file and its data is stored in
    the file; None when it is absent. HDF5 follows external links, external raw storage and virtual
    datasets into other files, which an untrusted trace file may not make us read."""
    import h5py

    node = handle
    for part in name.split("/"):
        if not isinstance(node, h5py.Group) or part not in node:
            return None
        link = node.get(part, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise UserError(
                f"{handle.filename}: '{name}' is {_LINKS.get(type(link).__name__, 'a link')}, which could "
                "lead outside the file",
                "store the traces in the file itself",
            )
        node = node[part]
    if isinstance(node, h5py.Dataset) and (node.external or node.is_virtual):
        raise UserError(
            f"{handle.filename}: '{name}' keeps its data in other files",
            "store the traces in the file itself",
        )
    return node


def _lascar(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        if not {"leakages", "values"} <= set(archive.files):
            raise UserError(
                f"{path}: a lascar .npz holds 'leakages' and 'values'", f"it holds {archive.files}"
            )
        values = archive["values"]
        if values.dtype.names:
            values = values[values.dtype.names[0]]
        return archive["leakages"], values


def write_ets(path: Path, samples: np.ndarray, operands: np.ndarray, **metadata: np.ndarray) -> None:
    """An estraces ETS file (HDF5) with ``operands`` and any other per-trace metadata."""
    from estraces import ETSWriter

    writer = ETSWriter(str(path), overwrite=True)
    try:
        writer.write_samples(samples)
        writer.write_metadata("operands", operands)
        for key, value in metadata.items():
            writer.write_metadata(key, value)
    finally:
        writer.close()
