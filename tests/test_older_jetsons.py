"""Older Jetsons: LayerNormalization and Gelu written as their ONNX definitions, models brought down to the
opset TensorRT 8.2 / 8.5 parse, each rewrite checked under ONNX Runtime against the original; MiniLM and a
TorchScript-exported BERT compile for every Jetson with no node the parser rejects."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from redux_edge import api
from redux_edge.backends.tensorrt import support_report
from redux_edge.errors import UserError
from redux_edge.ir.decompose import decompose
from redux_edge.ir.opset import convert_opset
from redux_edge.recipe import load_recipe

RNG = np.random.default_rng(0)


def _run(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _block(opset: int) -> onnx.ModelProto:
    """LayerNormalization -> Gelu (erf) -> Gelu (tanh) -> ReduceMean, its axes an input (opset 18 on)."""
    hidden = 16
    nodes = [
        helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["normed"], axis=-1, epsilon=1e-12),
        helper.make_node("Gelu", ["normed"], ["exact"]),
        helper.make_node("Gelu", ["exact"], ["approx"], approximate="tanh"),
        helper.make_node("ReduceMean", ["approx", "axes"], ["y"], keepdims=1),
    ]
    initializers = [
        helper.make_tensor(
            "scale", TensorProto.FLOAT, [hidden], RNG.normal(1, 0.1, hidden).astype(np.float32)
        ),
        helper.make_tensor(
            "bias", TensorProto.FLOAT, [hidden], RNG.normal(0, 0.1, hidden).astype(np.float32)
        ),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1, hidden])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


@pytest.mark.parametrize("source", [20, 23])
@pytest.mark.parametrize("target", [13, 17])
def test_decomposed_and_converted_block_matches_the_original_under_onnx_runtime(target, source):
    original = _block(source)
    feeds = {"x": RNG.normal(0, 3, (2, 5, 16)).astype(np.float32)}
    model = ir.from_proto(original)
    assert decompose(model, {"LayerNormalization", "Gelu"}) == {"LayerNormalization": 1, "Gelu": 2}
    assert convert_opset(model, target) == {"ReduceMean": 3}  # two of them from LayerNormalization
    assert model.opset_imports[""] == target
    assert {node.op_type for node in model.graph} <= {
        "ReduceMean",
        "Sub",
        "Mul",
        "Add",
        "Sqrt",
        "Div",
        "Erf",
        "Tanh",
    }
    (expected,), (got,) = _run(original, feeds), _run(model, feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_newer_file_comes_down_to_tensorrt_10s_opset_unchanged():
    """An exporter at opset 23 (torch.onnx.export(..., opset_version=23)) for Orin's TensorRT 10.3 (20):
    every node's schema is the same at 20, so only the import changes."""
    original = _block(23)
    model = ir.from_proto(original)
    assert convert_opset(model, 20) == {} and model.opset_imports[""] == 20
    assert [node.op_type for node in model.graph] == ["LayerNormalization", "Gelu", "Gelu", "ReduceMean"]
    feeds = {"x": RNG.normal(0, 3, (2, 5, 16)).astype(np.float32)}
    (expected,), (got,) = _run(original, feeds), _run(model, feeds)
    np.testing.assert_array_equal(got, expected)


def test_a_node_whose_meaning_changed_is_refused_by_name():
    graph = helper.make_graph(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest", name="upsample")],
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]))
    with pytest.raises(UserError, match=r"node upsample \(Resize\) has no form at opset 13"):
        convert_opset(model, 13)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "tensorrt", "opset"), [("jetson-nano", "8.2", 13), ("jetson-xavier-nx", "8.5", 17)]
)
def test_minilm_compiles_for_an_older_jetson_exact_against_onnx_runtime(tmp_path, target, tensorrt, opset):
    bundle = api.compile_model("minilm-l6", target, load_recipe(None), tmp_path / target)
    support = bundle.manifest["backend"]["support"]
    assert support["tensorrt"] == tensorrt and support["unsupported"] == 0
    assert support["decomposed"] == {"LayerNormalization": 13, "Gelu": 6}
    saved = ir.load(str(bundle.path / bundle.manifest["backend"]["artifact"]))
    assert saved.opset_imports[""] == opset and not support_report(saved, tensorrt)["unsupported"]
    verify = bundle.manifest["verify"]
    assert verify["artifact_vs_onnxruntime"]["sentence_embedding"]["max_abs"] <= 1e-5
    assert verify["artifact"]["sentence_embedding"]["min_cosine"] >= 0.99999


def _llama_block() -> onnx.ModelProto:
    """RMSNorm as torch exports it (rsqrt: Sqrt then Reciprocal), then Split(num_outputs), opset 18."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [16, 16], RNG.standard_normal(256).astype(np.float32))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Mul", ["h", "h"], ["squared"]),
        helper.make_node("ReduceMean", ["squared", "axes"], ["mean"], keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inverse"]),
        helper.make_node("Mul", ["h", "inverse"], ["normed"]),
        helper.make_node("Split", ["normed"], ["gate", "up"], axis=1, num_outputs=2),
        helper.make_node("Mul", ["gate", "up"], ["y"]),
    ]
    initializers = [
        weight,
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-6]),
    ]
    graph = helper.make_graph(
        nodes,
        "llama_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@pytest.mark.parametrize("target", ["jetson", "jetson-nano", "jetson-xavier-nx", "jetson-orin-nano"])
def test_rmsnorm_and_split_by_count_compile_for_every_jetson_and_equal_the_original(tmp_path, target):
    block = _llama_block()
    onnx.save(block, tmp_path / "block.onnx")
    feeds = {"x": RNG.standard_normal((4, 16)).astype(np.float32)}
    np.savez(tmp_path / "x.npz", **feeds)
    out = tmp_path / target
    bundle = api.compile_model(
        str(tmp_path / "block.onnx"), target, load_recipe(None), out, inputs_file=tmp_path / "x.npz"
    )
    lowered = onnx.load(out / "artifact" / "model.trt.onnx")
    if target != "jetson-orin-nano":  # TensorRT 10.3 parses opset 20, Reciprocal and Split by count
        assert "Reciprocal" not in {node.op_type for node in lowered.graph.node}
        splits = [node for node in lowered.graph.node if node.op_type == "Split"]
        assert splits and not [a for node in splits for a in node.attribute if a.name == "num_outputs"]
    (expected,) = _run(block, feeds)
    (got,) = _run(lowered, feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert bundle.manifest["verify"]["artifact"]["y"]["min_cosine"] > 0.9999


def test_a_model_only_newer_jetsons_parse_is_refused_naming_them(cli, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Mod", ["x", "two"], ["y"], fmod=1)],
        "mod",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9),
        tmp_path / "m.onnx",
    )
    result = cli("compile", "-m", tmp_path / "m.onnx", "-t", "jetson", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "cannot parse 1 node(s)" in result.stderr
    assert "jetson-orin-nano (TensorRT 10.3)" in result.stderr and "take this model" in result.stderr
