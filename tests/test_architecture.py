"""The architecture holds what it promises: a pass is its file plus one registry line, the pipeline names no
pass or backend, modules stay small, and a bundle's runner needs nothing but numpy and its runtime."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import subprocess
import venv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn

from redux_edge import passes, pipeline
from redux_edge.backends import BACKENDS
from redux_edge.ir.surgery import new_initializer
from redux_edge.passes.contract import (
    CompileContext,
    Flag,
    PassOutcome,
    RecipePass,
    ReferenceChange,
    Section,
    parameter,
)

PACKAGE = Path(pipeline.__file__).parent


# A pass written here, the way a user or a new pass file would: nothing under redux_edge/ knows it.
class _TimesModule(nn.Module):
    def __init__(self, module: nn.Module, factor: float) -> None:
        super().__init__()
        self.module, self.factor = module, factor

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.module(*inputs) * self.factor


class _Times(ReferenceChange):
    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.describes = f", with the first output scaled by {factor:g}"

    def on_module(self, module: nn.Module, architecture: dict, stack: contextlib.ExitStack) -> nn.Module:
        return _TimesModule(module, self.factor)


class ScaledSection(Section):
    key = "scaled"

    def reference(self) -> ReferenceChange:
        return _Times(self.outcomes[0].factor)

    def report(self, context: CompileContext) -> dict:
        return {self.key: {"factor": self.outcomes[0].factor, "output": context.source.output_names[0]}}

    @staticmethod
    def render(section: dict, manifest: Mapping[str, Any]) -> list[str]:
        return [f"  scaled   {section['output']} x {section['factor']:g}"]


@dataclasses.dataclass
class Scaled(PassOutcome):
    factor: float

    section = ScaledSection


@dataclasses.dataclass
class ScaleOutputPass(RecipePass):
    name = "scale-output"
    summary = "multiply the first output by a constant (a pass defined in a test)"
    flags = (Flag("--scale-output", "Multiply the first output by K.", "factor", float, metavar="K"),)

    factor: float = parameter(1.0, "what the first output is multiplied by")

    def call(self, model: ir.Model) -> Scaled:
        output = model.graph.outputs[0]
        name = output.name
        factor = new_initializer(model.graph, np.array(self.factor, np.float32), "scale_output.factor")
        node = ir.node("Mul", [output, factor], name="scale_output")
        output.name = f"{name}_unscaled"
        scaled = node.outputs[0]
        scaled.name, scaled.dtype, scaled.shape = name, output.dtype, output.shape
        model.graph.append(node)
        model.graph.outputs[0] = scaled
        return Scaled(model, True, self.factor)


@pytest.fixture
def scale_pass(monkeypatch):
    monkeypatch.setitem(passes.PASSES, ScaleOutputPass.name, ScaleOutputPass)  # the one registry line


def test_a_pass_defined_outside_the_package_compiles_through_the_cli(cli, scale_pass, mnist_bundle, tmp_path):
    help_text = cli("compile", "--help").stdout
    assert "--scale-output" in help_text and "Multiply the first output by K." in help_text
    out = tmp_path / "scaled"
    result = cli("compile", "-m", "mnist-cnn", "--scale-output", "2.5", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "scaled   logits x 2.5" in result.stdout  # its report section
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scaled"] == {"factor": 2.5, "output": "logits"}
    assert manifest["recipe"]["passes"][-1] == {"pass": "scale-output", "factor": 2.5}
    # The verification used the pass's reference: PyTorch's logits times 2.5, matched exactly.
    assert manifest["verify"]["reference"] == "pytorch, with the first output scaled by 2.5"
    assert manifest["verify"]["ir"]["logits"]["max_abs"] <= 1e-4
    assert manifest["verify"]["artifact"]["logits"]["max_abs"] <= 1e-4
    with (
        np.load(out / "sample" / "outputs.npz") as scaled,
        np.load(mnist_bundle / "sample" / "outputs.npz") as plain,
    ):
        np.testing.assert_allclose(scaled["logits"], 2.5 * plain["logits"], rtol=1e-5, atol=1e-4)
    listing = {row["pass"]: row for row in json.loads(cli("passes", "--json").stdout)}
    assert listing["scale-output"]["help"] == {"factor": "float: what the first output is multiplied by"}
    assert "scaled   logits x 2.5" in cli("inspect", out).stdout


def test_a_pass_parameter_is_checked_against_its_type_hint(scale_pass, tmp_path):
    from redux_edge.errors import UserError
    from redux_edge.recipe import load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\npass = "scale-output"\nfactor = "big"\n')
    with pytest.raises(UserError, match="'factor' must be float"):
        load_recipe(recipe)


def test_the_pipeline_names_no_pass_or_backend():
    tree = ast.parse(Path(pipeline.__file__).read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)}
    for cls in passes.PASSES.values():
        assert cls.__name__ not in names and cls.name not in strings
    for backend in BACKENDS.values():
        assert type(backend).__name__ not in names and backend.name not in strings


def test_modules_stay_small_and_the_cli_is_a_package_of_command_groups():
    long = {
        str(path.relative_to(PACKAGE)): count
        for path in PACKAGE.rglob("*.py")
        if (count := len(path.read_text().splitlines())) > 600
    }
    assert long.keys() <= {"zoo/bert.py"}, long
    groups = {path.stem for path in (PACKAGE / "cli").glob("*.py")}
    assert {"compile", "run", "devices", "leakage", "train", "listings"} <= groups


@pytest.mark.slow
def test_a_bundle_runs_in_a_venv_with_only_numpy_and_onnxruntime(mnist_bundle, tmp_path):
    import numpy
    import onnxruntime

    env = tmp_path / "device"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    wheels = [f"numpy=={numpy.__version__}", f"onnxruntime=={onnxruntime.__version__}"]
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", *wheels], capture_output=True, text=True, check=False
    )
    assert installed.returncode == 0, installed.stderr
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True)
    names = {row["name"].lower() for row in json.loads(listed.stdout)}
    assert "redux-edge" not in names and "torch" not in names and "onnx" not in names
    runner = mnist_bundle / "runner" / "run.py"
    check = subprocess.run([python, runner, "--check"], capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["healthy"] is True
    bench = subprocess.run(
        [python, runner, "--bench", "--iterations", "20", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["iterations"] == 20


def test_a_manifest_that_does_not_fit_the_schema_is_a_user_error_naming_the_field(
    cli, mnist_bundle, tmp_path
):
    import shutil

    from redux_edge.manifest import SCHEMA

    assert json.loads(SCHEMA.read_text())["properties"]["format_version"] == {"const": 2}
    copy = tmp_path / "bundle"
    shutil.copytree(mnist_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["inputs"][0]["dtype"] = 5
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = cli("inspect", copy)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "inputs/0/dtype" in result.stderr and "does not fit bundle format 2" in result.stderr


def test_the_readme_python_api_example_runs_as_written(monkeypatch, tmp_path):
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    code = section[
        section.index("```python") + len("```python") : section.index("```\n", section.index("```python") + 3)
    ]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    manifest = namespace["manifest"]
    assert manifest["compression"]["plan"] == {"layers": [1]}
    assert manifest["compression"]["sparsity"]["sparsified"] >= 1
    assert manifest["verify"]["reference"].startswith("onnxruntime on the IR before the passes, with")
    assert manifest["verify"]["ir"]["output"]["max_abs"] <= 1e-4
    assert manifest["metrics"]["compiled"]["params"] < manifest["metrics"]["original"]["params"]
    assert namespace["outputs"]["output"].shape == (4, 10)


def test_passes_keep_no_per_compile_results_on_themselves():
    """Configuration is the dataclass; what a pass gathers comes back from prepare() into a new pass; its
    results are its outcome. No method but __init__/__post_init__ sets an attribute of the pass."""
    import ast
    import inspect
    import textwrap

    from redux_edge.passes import PASSES
    from redux_edge.passes.contract import RecipePass

    classes = {base for cls in PASSES.values() for base in cls.__mro__ if issubclass(base, RecipePass)}
    offenders = []
    for cls in classes:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        for method in ast.walk(tree):
            if not isinstance(method, ast.FunctionDef) or method.name in ("__init__", "__post_init__"):
                continue
            for node in ast.walk(method):
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                for target in targets:
                    for leaf in ast.walk(target) if target is not None else []:
                        sets = isinstance(leaf, ast.Attribute) and isinstance(leaf.ctx, ast.Store)
                        if sets and getattr(leaf.value, "id", "") == "self":
                            offenders.append(f"{cls.__name__}.{method.name} sets self.{leaf.attr}")
    assert offenders == []
