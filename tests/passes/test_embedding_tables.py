"""embedding-tables on a hand-built Gather graph: a table is stored in fp16 or per-row INT8 in standard
ONNX and its gathered rows stay close; a table another operator reads (tied) stays float32 and says why."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from redux_edge.passes import build_pass

_RNG = np.random.default_rng(0)


def _table_model(tied: bool = False) -> onnx.ModelProto:
    """ids -> Gather(E) -> MatMul(W), the gathered rows also an output; ``tied``: the MatMul's weight is
    E transposed instead (an LM head tied to the embeddings)."""
    table = _RNG.standard_normal((96, 1000)).astype(np.float32).T.copy()
    weights = [numpy_helper.from_array(table, "E")]
    nodes = [oh.make_node("Gather", ["E", "ids"], ["rows"])]
    if tied:
        nodes += [oh.make_node("Transpose", ["E"], ["Et"]), oh.make_node("MatMul", ["rows", "Et"], ["y"])]
    else:
        weights.append(numpy_helper.from_array(_RNG.standard_normal((96, 8)).astype(np.float32), "W"))
        nodes.append(oh.make_node("MatMul", ["rows", "W"], ["y"]))
    graph = oh.make_graph(
        nodes,
        "tables",
        [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 5])],
        [
            oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
            oh.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, [2, 5, 96]),
        ],
        weights,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize(
    ("dtype", "stored_fraction", "relative_error"), [("fp16", 0.5, 1e-3), ("int8", 0.27, 1e-2)]
)
def test_a_table_is_stored_narrow_and_its_gathered_rows_stay_close(dtype, stored_fraction, relative_error):
    proto = _table_model()
    ids = {"ids": _RNG.integers(0, 1000, (2, 5))}
    expected = ort.InferenceSession(proto.SerializeToString()).run(None, ids)
    model = ir.from_proto(proto)
    outcome = build_pass("embedding-tables", {"dtype": dtype})(model)
    (table,) = outcome.tables
    assert table["bytes_after"] <= stored_fraction * table["bytes_before"]
    narrowed = ir.to_proto(model)
    onnx.checker.check_model(narrowed, full_check=True)
    assert [output.name for output in narrowed.graph.output] == ["y", "rows"]
    got = ort.InferenceSession(narrowed.SerializeToString()).run(None, ids)
    for want, have in zip(expected, got, strict=True):
        assert have.dtype == np.float32 and have.shape == want.shape
        assert np.abs(have - want).max() <= relative_error * np.abs(want).max()


def test_a_table_another_operator_reads_stays_float32_and_says_why():
    model = ir.from_proto(_table_model(tied=True))
    outcome = build_pass("embedding-tables", {})(model)
    assert not outcome.modified and not outcome.tables
    assert "also read by Transpose (a tied weight)" in outcome.kept[0]["why"]
