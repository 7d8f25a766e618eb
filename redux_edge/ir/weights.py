"""The learnable weights of an ONNX graph, named and laid out as PyTorch has them.

A weight is a constant input of MatMul (input 1, stored [in, out]), Gemm (input 1, [out, in] with
``transB``, else [in, out]) or Conv (input 1, [out, in / groups, kh, kw]). Its name is the module path the
torch dynamo exporter records in node metadata (``pkg.torch.onnx.name_scopes``) plus ``.weight``, so that
``encoder.layer.0.attention.self.query.weight`` names the same tensor in the graph, in PyTorch and in a
plan file; graphs from other exporters fall back to the initializer's name. ``torch_layout`` puts the
reduction (input) dimension on axis 1, where PyTorch has it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from redux_edge.ir.blocks import const_array

__all__ = ["Weight", "find_weights"]

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass
class Weight:
    name: str
    node: ir.Node
    value: ir.Value
    array: np.ndarray
    transposed: bool

    @property
    def torch_layout(self) -> np.ndarray:
        return self.array.T if self.transposed else self.array

    def stored(self, torch_layout: np.ndarray) -> np.ndarray:
        """An array in torch layout, laid out as this weight is stored."""
        return torch_layout.T if self.transposed else torch_layout

    @property
    def shared(self) -> bool:
        return len(self.value.uses()) > 1


def _module_path(node: ir.Node) -> str | None:
    scopes = node.metadata_props.get(_SCOPES_KEY)
    if not scopes:
        return None
    try:
        names = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    # The last scope is the aten call inside the module ("linear", "conv2d"); the one before is the module.
    return names[-2] if isinstance(names, list) and len(names) >= 2 and names[-2] else None


def _transposed(node: ir.Node, array: np.ndarray) -> bool | None:
    """Whether the weight is stored [in, out]; None when ``node`` does not use it as a weight."""
    if node.op_type == "MatMul" and array.ndim == 2:
        return True
    if node.op_type == "Gemm" and array.ndim == 2:
        return not node.attributes.get_int("transB", 0)
    if node.op_type == "Conv" and array.ndim >= 3 and node.attributes.get_int("group", 1) == 1:
        return False
    return None


def find_weights(model: ir.Model) -> list[Weight]:
    """Every constant weight of a MatMul, Gemm or Conv, in graph order, with unique names."""
    found: list[Weight] = []
    taken: set[str] = set()
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
            continue
        value = node.inputs[1]
        array = const_array(value)
        if value is None or array is None or not np.issubdtype(array.dtype, np.floating):
            continue
        transposed = _transposed(node, array)
        if transposed is None:
            continue
        module = _module_path(node)
        name = f"{module}.weight" if module else str(value.name)
        unique, suffix = name, 1
        while unique in taken:
            suffix += 1
            unique = f"{name}#{suffix}"
        taken.add(unique)
        found.append(Weight(unique, node, value, array, transposed))
    return found
