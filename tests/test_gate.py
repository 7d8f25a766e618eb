"""The quality gate: a pass that changes numerics on purpose is measured against the float model with
numbers that see every kind of output, and a result beyond its gate is refused unless waived."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest
from conftest import assert_clean_user_error, assert_one_error_line

from redux_edge.analysis.shift import GATES, Gate, failures, output_shift, weights_that_move_most


def test_a_scalar_per_sample_that_moves_is_seen_though_its_cosine_is_one():
    before = [np.array([0.664, 0.373, 0.5])]
    after = [np.array([0.970, 0.0013, 0.5])]
    shift = output_shift(before, after, ["probability"])
    assert "min_cosine" not in shift["probability"]  # one number per sample: a cosine says nothing
    assert shift["probability"]["rel_l2"] > 0.4
    assert failures(shift, GATES["int8"]) == ["output 'probability' rel_l2 0.5285 > 0.25"]


def test_logits_count_their_changed_classes_and_integers_their_changed_elements():
    logits = np.array([[2.0, 1.0], [0.0, 1.0], [3.0, -1.0], [1.0, 0.9]])
    flipped = logits.copy()
    flipped[3] = [0.9, 1.0]
    ids = np.array([[1, 2, 3, 4]])
    shift = output_shift([logits, ids], [flipped, ids * [[1, 1, 1, 0]]], ["logits", "ids"], ["logits"])
    assert shift["logits"]["top1"] == 0.75 and shift["ids"] == {"equal": 0.75}
    found = failures(shift, Gate(max_rel_l2=1.0, min_cosine=0.0, min_top1=0.9))
    assert found == ["output 'logits' top1 0.75 < 0.9", "output 'ids' equal 0.75 < 0.9"]


def test_one_wrecked_sample_among_good_ones_fails_the_cosine():
    rng = np.random.default_rng(0)
    before = rng.standard_normal((16, 32))
    after = before.copy()
    after[7] = rng.standard_normal(32)
    shift = output_shift([before], [after], ["embedding"])
    assert shift["embedding"]["min_cosine"] < 0.5 and shift["embedding"]["rel_l2"] < 0.5


def test_nan_and_stacked_gates():
    shift = output_shift([np.ones((2, 3))], [np.full((2, 3), np.nan)], ["y"])
    assert failures(shift, GATES["fp16"])[0].startswith("output 'y' rel_l2 inf")
    stacked = Gate.loosest([GATES["sparsity"], GATES["int8"]])
    assert stacked == Gate(max_rel_l2=0.5, min_cosine=0.8, min_top1=0.8)


def _outlier_model(path):
    """y = (x * [10^4, 1, ..., 1]) @ W with W's first row zero: y depends only on the small columns, whose
    values per-tensor INT8 activations round to nothing next to the outlier (a saturated scale)."""
    scale = np.ones(8, np.float32)
    scale[0] = 1e4
    weight = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    weight[0] = 0.0
    graph = oh.make_graph(
        [oh.make_node("Mul", ["x", "scale"], ["h"]), oh.make_node("MatMul", ["h", "w"], ["y"])],
        "outlier",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
        initializer=[onnx.numpy_helper.from_array(scale, "scale"), onnx.numpy_helper.from_array(weight, "w")],
    )
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9), path)
    return path


def test_int8_that_wrecks_a_model_is_refused_with_its_shift_and_written_only_when_waived(cli, tmp_path):
    model = _outlier_model(tmp_path / "outlier.onnx")
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(2).standard_normal((32, 8)).astype(np.float32))
    compile_args = ["compile", "-m", model, "--inputs", tmp_path / "x.npz", "--quantize", "int8"]
    result = cli(*compile_args, "-o", tmp_path / "out")
    assert_clean_user_error(result, tmp_path, message="quantize moved the outputs beyond the default gate")
    assert "rel_l2" in result.stderr and "--waive-gate" in result.stderr
    assert "the weights where they start to move: w (+1)" in result.stderr  # the MatMul after the outlier
    waived = cli(*compile_args, "--waive-gate", "-o", tmp_path / "out", "--json")
    assert waived.exit_code == 0, waived.stderr
    shift = json.loads(waived.stdout)["verify"]["shift"]
    assert shift["waived"] and shift["beyond"] and shift["outputs"]["y"]["rel_l2"] > 0.5
    assert shift["gate"] == GATES["int8"].to_json() and list(shift["moves_most"]) == ["w"]
    report = cli("inspect", tmp_path / "out")
    assert "gate     WAIVED (--waive-gate)" in report.stdout


@pytest.mark.slow
def test_int8_of_the_zoo_cnn_passes_its_gate_and_says_so(cli, tmp_path):
    result = cli("compile", "-m", "mnist-cnn", "--quantize", "int8", "-o", tmp_path / "q", "--json")
    assert result.exit_code == 0, result.stderr
    shift = json.loads(result.stdout)["verify"]["shift"]
    assert shift["passes"] == ["quantize"] and not shift["beyond"] and not shift["waived"]
    assert shift["outputs"]["logits"]["top1"] >= GATES["int8"].min_top1


def _save(path, nodes, inputs, outputs, initializers=(), opset=17):
    graph = oh.make_graph(nodes, path.stem, inputs, outputs, initializer=list(initializers))
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


_FLOAT = onnx.TensorProto.FLOAT
_WEIGHT = onnx.numpy_helper.from_array(
    np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w"
)


def test_a_scalar_input_and_a_batch_on_axis_one_compile_for_dynamic_and_static_shape_targets(cli, tmp_path):
    scalar = _save(
        tmp_path / "scalar.onnx",
        [oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Mul", ["h", "s"], ["y"])],
        [oh.make_tensor_value_info("x", _FLOAT, ["batch", 8]), oh.make_tensor_value_info("s", _FLOAT, [])],
        [oh.make_tensor_value_info("y", _FLOAT, ["batch", 8])],
        [_WEIGHT],
    )
    state = _save(
        tmp_path / "state.onnx",
        [oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Add", ["state", "h"], ["new_state"])],
        [oh.make_tensor_value_info("x", _FLOAT, ["batch", 8]),
         oh.make_tensor_value_info("state", _FLOAT, [2, "batch", 8])],
        [oh.make_tensor_value_info("new_state", _FLOAT, [2, "batch", 8])],
        [_WEIGHT],
    )  # fmt: skip
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "scalar.npz", x=rng.standard_normal((4, 8)).astype(np.float32), s=np.float32(3))
    x, h = rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal((2, 4, 8)).astype(np.float32)
    np.savez(tmp_path / "state.npz", x=x, state=h)
    for model, shapes in ((scalar, "x:2x8"), (state, "x:2x8,state:2x2x8")):
        for target in ("host", "jetson-orin-nano"):
            out = tmp_path / f"{model.stem}-{target}"
            argv = ["compile", "-m", model, "--inputs", model.with_suffix(".npz"), "-t", target, "-o", out]
            result = cli(*argv, *(["--shapes", shapes] if target != "host" else []), "--json")
            assert result.exit_code == 0, result.stderr
            with np.load(out / "sample" / "inputs.npz") as sample:
                batch = 4 if target == "host" else 2
                assert sample["x"].shape == (batch, 8)
                assert model.stem != "state" or sample["state"].shape == (2, batch, 8)
                assert model.stem != "scalar" or sample["s"].shape == ()
    with np.load(tmp_path / "state-host" / "sample" / "outputs.npz") as outputs:
        np.testing.assert_allclose(
            outputs["new_state"], h + x @ onnx.numpy_helper.to_array(_WEIGHT), rtol=1e-5
        )


def test_free_dimensions_are_each_their_own_and_made_up_inputs_say_what_they_hold(cli, tmp_path):
    model = _save(
        tmp_path / "free.onnx",
        [oh.make_node("MatMul", ["x", "w"], ["h"]),
         oh.make_node("ReduceMean", ["h"], ["y"], axes=[1], keepdims=0)],
        [oh.make_tensor_value_info("x", _FLOAT, ["?", -1, 8])],
        [oh.make_tensor_value_info("y", _FLOAT, ["?", 8])],
        [_WEIGHT],
        opset=13,
    )  # fmt: skip
    result = cli("compile", "-m", model, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["inputs"][0]["shape"] == ["x_0", "x_1", 8]
    assert manifest["verify"]["made_up_inputs"] == ["x [2, 16, 8] standard normal"]
    assert manifest["metrics"]["compiled"]["macs"] == 2 * 16 * 8 * 8
    np.savez(tmp_path / "other.npz", x=np.ones((3, 5, 8), np.float32))
    assert cli("run", tmp_path / "out", tmp_path / "other.npz").exit_code == 0
    assert "made up (no --inputs)" in cli("inspect", tmp_path / "out").stdout


def test_token_ids_made_up_over_the_table_and_lossy_passes_refused_on_made_up_inputs(cli, tmp_path):
    table = onnx.numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32), "t"
    )
    model = _save(
        tmp_path / "ids.onnx",
        [oh.make_node("Gather", ["t", "input_ids"], ["e"]), oh.make_node("Mul", ["e", "mask"], ["m"]),
         oh.make_node("MatMul", ["m", "w"], ["y"])],
        [oh.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"]),
         oh.make_tensor_value_info("mask", _FLOAT, ["batch", "sequence", 1])],
        [oh.make_tensor_value_info("y", _FLOAT, ["batch", "sequence", 8])],
        [table, _WEIGHT],
    )  # fmt: skip
    result = cli("compile", "-m", model, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    filled = json.loads(result.stdout)["verify"]["made_up_inputs"]
    assert filled[0] == "input_ids [2, 16] ids in 0..49 (its table's rows)" and filled[1].endswith("ones")
    refused = cli("compile", "-m", model, "--quantize", "int8-dynamic", "-o", tmp_path / "q")
    assert_one_error_line(refused, "came without inputs")
    assert not (tmp_path / "q").exists()


def test_int8_on_an_opset_11_file_writes_a_valid_model_and_branch_weights_are_named(cli, tmp_path):
    conv = onnx.numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32), "k"
    )
    model = _save(
        tmp_path / "old.onnx",
        [oh.make_node("Conv", ["x", "k"], ["c"]), oh.make_node("Relu", ["c"], ["y"])],
        [oh.make_tensor_value_info("x", _FLOAT, ["batch", 1, 8, 8])],
        [oh.make_tensor_value_info("y", _FLOAT, ["batch", 4, 6, 6])],
        [conv],
        opset=11,
    )
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(1).standard_normal((16, 1, 8, 8)).astype(np.float32))
    for precision in ("int8", "int8-dynamic"):
        result = cli("compile", "-m", model, "--inputs", tmp_path / "x.npz", "--quantize", precision,
                     "-o", tmp_path / precision, "--json")  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["verify"]["shift"]["beyond"] == []
        assert onnx.load(tmp_path / precision / "model.onnx").opset_import[0].version == 13
    then = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["a"])],
        "then",
        [],
        [oh.make_tensor_value_info("a", _FLOAT, None)],
    )
    other = oh.make_graph(
        [oh.make_node("Neg", ["x"], ["b"])], "else", [], [oh.make_tensor_value_info("b", _FLOAT, None)]
    )
    branched = _save(
        tmp_path / "if.onnx",
        [oh.make_node("ReduceSum", ["x"], ["s"], keepdims=0), oh.make_node("Greater", ["s", "zero"], ["c"]),
         oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        [oh.make_tensor_value_info("x", _FLOAT, ["batch", 8])],
        [oh.make_tensor_value_info("y", _FLOAT, ["batch", 8])],
        [_WEIGHT, onnx.numpy_helper.from_array(np.float32(0), "zero")],
    )  # fmt: skip
    np.savez(tmp_path / "b.npz", x=np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32))
    result = cli(
        "compile", "-m", branched, "--inputs", tmp_path / "b.npz", "--quantize", "int8", "-o", tmp_path / "b"
    )
    assert_clean_user_error(result, tmp_path, message="sit inside control-flow branches (w of a MatMul)")
    assert "exclude patterns" not in result.stderr


def test_the_weights_that_move_most_are_found_with_a_scalar_input_beside_the_batch(tmp_path):
    """The per-node comparison cuts each input along its own batch axis; a 0-d input has none (found on
    the published voice-activity model, whose sample rate is a scalar input)."""
    before = ir.load(str(_outlier_model(tmp_path / "outlier.onnx")))
    after = ir.from_proto(ir.to_proto(before))
    after.graph.initializers["w"].const_value = ir.tensor(np.zeros((8, 4), np.float32), name="w")
    for model in (before, after):
        model.graph.inputs.append(
            ir.Value(name="gain", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
        )
    feeds = {
        "x": np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32),
        "gain": np.array(2, np.float32),
    }
    assert [name for name, _ in weights_that_move_most(before, after, feeds)] == ["w"]
