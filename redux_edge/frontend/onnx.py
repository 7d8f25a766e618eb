"""A user's own ONNX file -> IR, treated as untrusted input, and the source it makes: verified against
ONNX Runtime on the file as loaded, with graph optimisations off.

Checks, in order: the file parses as an ONNX ``ModelProto`` (a truncated or foreign file fails here);
every external-data reference is a relative path that stays inside the model's folder and exists (the
ONNX external-data spec allows any path; we do not let a model read ``../../etc/passwd``); the ONNX
checker accepts the model; every operator has a schema in its domain (standard ONNX, or Microsoft's
contrib domain that ONNX Runtime implements). Only then is the file loaded into ``onnx_ir``, its IR
version lowered to the one its opsets need.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.helper
import onnx_ir as ir
from google.protobuf.message import DecodeError, Message

from redux_edge.errors import UserError, first_line
from redux_edge.frontend.made_up import made_up_inputs
from redux_edge.frontend.source import Source, check_feeds, check_sample_size, fit_inputs, run_onnx_file
from redux_edge.interfaces import Step, no_progress
from redux_edge.ir.batch import Batches
from redux_edge.preprocess import read_inputs
from redux_edge.untrusted import check_memory, inside

__all__ = ["load_onnx", "onnx_source"]

logger = logging.getLogger(__name__)


# Domains whose operators ONNX Runtime's CPU provider implements beyond the ONNX standard.
_RUNTIME_DOMAINS = {"com.microsoft", "com.microsoft.nchwc", "ai.onnx.ml"}


def load_onnx(path: Path) -> ir.Model:
    if not path.is_file():
        raise UserError(f"ONNX file {path} does not exist", "check the path given to --model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise UserError(
            f"{path} is not a valid ONNX model ({exc})", "the file is malformed or truncated"
        ) from exc
    if not proto.HasField("graph") or not proto.opset_import:
        raise UserError(
            f"{path} is not a valid ONNX model (no graph or opset)", "the file is malformed or truncated"
        )
    if where := _invalid_text(proto):
        raise UserError(
            f"{path} is not a valid ONNX model: {where} is not UTF-8 text",
            "the file is corrupted; re-export it",
        )
    _check_io_types(proto, path)
    _check_external_data(proto, path.parent)
    densified = _densify_sparse_initializers(proto, path)
    try:
        # A file over 2 GiB only checks by path; a densified one only as the proto changed here.
        onnx.checker.check_model(proto if densified else str(path))
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.shape_inference.InferenceError) as exc:
        raise UserError(f"{path} fails the ONNX checker: {first_line(exc)}", "re-export the model") from exc
    _check_operators(proto, path)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    _separate_outputs_from_inputs(model)
    _name_free_dimensions(model)
    # Weights in external files (torch's dynamo exporter writes model.onnx + model.onnx.data) are read
    # into memory, checked to lie inside the folder above: the IR is then saved anywhere as one file.
    ir.external_data.load_to_model(model)
    # Exporters stamp the newest IR version they know, which runtimes one release older refuse; the
    # operators and types a model may use are fixed by its opsets, so the IR version those opsets need is
    # what the file really requires.
    model.ir_version = min(
        model.ir_version, onnx.helper.find_min_ir_version_for(list(proto.opset_import), True)
    )
    return model


def _invalid_text(message: Message, where: str = "model") -> str:
    """The first text field of ``message`` that is not UTF-8 (protobuf hands it over as bytes), or ""."""
    for descriptor, value in message.ListFields():
        name = f"{where}.{descriptor.name}"
        repeated = descriptor.is_repeated
        if descriptor.type == descriptor.TYPE_STRING:
            if any(isinstance(item, bytes) for item in (value if repeated else [value])):
                return name
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            for index, item in enumerate(value if repeated else [value]):
                if found := _invalid_text(item, f"{name}[{index}]" if repeated else name):
                    return found
    return ""


# The element types of model inputs and outputs that the runner feeds and returns as numpy arrays.
_IO_TYPES = {"FLOAT", "FLOAT16", "DOUBLE", "INT64", "INT32", "INT8", "UINT8", "BOOL"}


def _check_io_types(proto: onnx.ModelProto, path: Path) -> None:
    for role, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        initializers = {init.name for init in proto.graph.initializer}
        for value in values:
            if value.name in initializers:
                continue
            if not value.type.HasField("tensor_type"):
                kind = value.type.WhichOneof("value") or "untyped"
                raise UserError(
                    f"{path}: model {role} '{value.name}' is a {kind.removesuffix('_type')}, not a tensor, "
                    "which redux-edge cannot feed or read",
                    f"export the model with tensor {role}s (e.g. without a ZipMap at the end)",
                )
            element = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
            if element not in _IO_TYPES:
                kinds = ", ".join(sorted(_IO_TYPES))
                raise UserError(
                    f"{path}: model {role} '{value.name}' is {element}, which redux-edge cannot feed or read",
                    f"export the model with {role}s of {kinds} (cast inside the model)",
                )


def _check_external_data(proto: onnx.ModelProto, folder: Path) -> None:
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        try:
            info = onnx.external_data_helper.ExternalDataInfo(tensor)
        except ValueError as exc:  # an offset or length that is not a number
            raise UserError(
                f"tensor '{tensor.name}' has unreadable external-data fields ({exc})", "re-export the model"
            ) from exc
        location = info.location
        target = inside(folder, location, f"tensor '{tensor.name}'")
        if not target.is_file():
            raise UserError(
                f"tensor '{tensor.name}' needs external data file {location}, which is missing",
                f"put {location} beside the model",
            )
        offset, length, size = info.offset or 0, info.length, target.stat().st_size
        hint = "the data file does not belong to this model, or is truncated: re-export it"
        if offset < 0 or (length is not None and (length < 0 or offset + length > size)):
            raise UserError(
                f"tensor '{tensor.name}' reads bytes {offset}..{offset + (length or 0)} of {location}, "
                f"which holds {size}",
                hint,
            )
        needed = _tensor_bytes(tensor)
        available = size - offset if length is None else length
        if needed is not None and available < needed:
            raise UserError(
                f"tensor '{tensor.name}' is {list(tensor.dims)} and needs {needed:,} bytes, and its external "
                f"data in {location} holds {max(available, 0):,}",
                hint,
            )


def _tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes a tensor's dims and element type take; None for element types of no fixed size."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) or any(
        dim < 0 for dim in tensor.dims
    ):
        return None
    bits = 4 if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else itemsize * 8
    return (math.prod(tensor.dims) * bits + 7) // 8


def _densify_sparse_initializers(proto: onnx.ModelProto, path: Path) -> bool:
    """Sparse initializers as the dense ones ONNX Runtime makes of them (the checker and the IR take dense
    initializers only); True when there were any."""
    graph = proto.graph
    for sparse in graph.sparse_initializer:
        try:
            values = onnx.numpy_helper.to_array(sparse.values)
            indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
            dense = np.zeros(math.prod(sparse.dims), dtype=values.dtype)
            flat = (
                indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), tuple(sparse.dims))
            )
            check_memory(dense.nbytes, f"sparse initializer '{sparse.values.name}'", "re-export the model")
            dense[flat] = values
        except (ValueError, IndexError, TypeError) as exc:
            raise UserError(
                f"{path}: sparse initializer '{sparse.values.name}' is malformed ({exc})",
                "re-export the model",
            ) from exc
        graph.initializer.append(onnx.numpy_helper.from_array(dense.reshape(sparse.dims), sparse.values.name))
    densified = len(graph.sparse_initializer) > 0
    del graph.sparse_initializer[:]
    return densified


def _name_free_dimensions(model: ir.Model) -> None:
    """Exporters write a dimension of no fixed size as -1, "?", without a name, or (spox) as 0 on a graph
    input or output, where it could carry no data. Each is its own: a graph input or output gets a name of
    its own (``<value>_<axis>``), so that no two are taken to be equal and none is taken for a size; inside
    the graph such a dimension is unknown."""
    graph_values = {id(value) for value in (*model.graph.inputs, *model.graph.outputs)}
    for value in _all_values(model.graph):
        if value.shape is None:
            continue
        dims, io = list(value.shape), id(value) in graph_values
        free = [
            axis
            for axis, dim in enumerate(dims)
            if (isinstance(dim, int) and (dim < 0 or (dim == 0 and io)))
            or (not isinstance(dim, int) and dim.value in (None, "?"))
        ]
        if not free:
            continue
        for axis in free:
            dims[axis] = ir.SymbolicDim(f"{value.name}_{axis}" if io else None)
        value.shape = ir.Shape(dims)


def _correct_declared_outputs(model: ir.Model, computed: list[np.ndarray]) -> None:
    """An output whose declared shape contradicts what ONNX Runtime computes (a file edited after export:
    ddddocr's ORT-quantized CNN declares [1, seqlen] and computes [40, 1, 8210]) loses that shape: the
    optimizer would otherwise believe it and rewrite the graph to produce it."""
    for value, array in zip(model.graph.outputs, computed, strict=True):
        declared = list(value.shape) if value.shape is not None else None
        if declared is None:
            continue
        fits = len(declared) == array.ndim and all(
            not isinstance(dim, int) or dim == size for dim, size in zip(declared, array.shape, strict=True)
        )
        if not fits:
            logger.warning(
                "output '%s' is declared %s and ONNX Runtime computes %s: the declared shape is dropped",
                value.name, [str(d) for d in declared], list(array.shape),
            )  # fmt: skip
            value.shape = ir.Shape([ir.SymbolicDim(f"{value.name}_{axis}") for axis in range(array.ndim)])


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.outputs
    for node in graph:
        yield from node.outputs


def _separate_outputs_from_inputs(model: ir.Model) -> None:
    """A graph input that is also a graph output (ONNX Runtime passes it through) gets an Identity whose
    output is named ``<input>_output``: the IR's passes would otherwise rename the input, and the bundle
    must take the inputs the file takes."""
    for index, value in enumerate(model.graph.outputs):
        if value.is_graph_input():
            node = ir.node("Identity", inputs=[value])
            node.outputs[0].name = f"{value.name}_output"
            node.outputs[0].shape, node.outputs[0].type = value.shape, value.type
            model.graph.append(node)
            model.graph.outputs[index] = node.outputs[0]
            logger.warning(
                "output '%s' is also an input: the bundle names it '%s'", value.name, node.outputs[0].name
            )


def _check_operators(proto: onnx.ModelProto, path: Path) -> None:
    opsets = {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import}
    local_functions = {(function.domain, function.name) for function in proto.functions}
    for node in _all_nodes(proto.graph):
        domain = node.domain or "ai.onnx"
        if (node.domain, node.op_type) in local_functions or domain in _RUNTIME_DOMAINS:
            continue
        if domain != "ai.onnx" or not onnx.defs.has(node.op_type, opsets.get(domain, 0), ""):
            raise UserError(
                f"unsupported operator {domain}::{node.op_type} (node '{node.name}') in {path}",
                "export the model with standard ONNX operators",
            )


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)


def onnx_source(
    path: Path,
    shapes: dict[str, list[int]] | None = None,
    inputs_file: Path | None = None,
    step: Step = no_progress,
) -> Source:
    """An ONNX file as a source: verified on ``inputs_file`` (else random inputs of its signature)."""
    shapes = shapes or {}
    with step(f"checking {path}"):
        model = load_onnx(path)
    made_up: list[str] = []
    if inputs_file is not None:
        given = read_inputs(inputs_file, [str(v.name) for v in model.graph.inputs], None)
        inputs = fit_inputs(given, shapes, Batches.of(model).axes)
    else:
        inputs, made_up = made_up_inputs(model, shapes, check_sample_size)
    check_feeds(model, inputs)
    with step("running the original model for reference outputs"), tempfile.TemporaryDirectory() as scratch:
        # The IR as loaded, not the file: loading may lower an IR version the runtime would refuse.
        ir.save(model, str(Path(scratch) / "original.onnx"))
        reference = run_onnx_file(Path(scratch) / "original.onnx", inputs, what=str(path))
    _correct_declared_outputs(model, reference)
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return Source(
        name=path.stem,
        origin={"onnx": str(path), "sha256": digest},
        model=model,
        inputs=inputs,
        reference_outputs=reference,
        reference_kind="onnxruntime on the original file"
        + (" (synthetic inputs)" if inputs_file is None else ""),
        synthetic_inputs=inputs_file is None,
        made_up=made_up,
    )
