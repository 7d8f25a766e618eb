"""Graph passes on the IR, in the style of ``onnx_ir.passes``: one file per pass, one registry line each.

Every redux-edge pass is an ``onnx_ir.passes.InPlacePass`` and a dataclass of its parameters, so that a
recipe step is exactly ``(pass name, parameters)`` and the manifest can record it and a later compile can
rebuild it; what else a pass tells the pipeline is its contract (``passes/contract.py``). ``PASSES`` maps
recipe names to pass classes, in the order their flags add them to a recipe.
"""

from __future__ import annotations

from redux_edge.errors import UserError
from redux_edge.passes.adapters import AdaptersPass
from redux_edge.passes.cleanup import CleanupPass
from redux_edge.passes.contract import RecipePass, configure
from redux_edge.passes.embedding_tables import EmbeddingTablesPass
from redux_edge.passes.ffn_prune import PruneFfnPass
from redux_edge.passes.head_prune import PruneHeadsPass
from redux_edge.passes.layer_drop import DropLayersPass
from redux_edge.passes.mac_prune import MacPrunePass
from redux_edge.passes.quantize import QuantizePass
from redux_edge.passes.sparsity import SparsityPass

__all__ = ["PASSES", "RecipePass", "build_pass", "register_pass"]

PASSES: dict[str, type[RecipePass]] = {}


def register_pass(cls: type[RecipePass]) -> type[RecipePass]:
    """Make ``cls`` known to recipes, ``compile`` flags, ``redux-edge passes`` and the report."""
    PASSES[cls.name] = cls
    return cls


for _builtin in (
    CleanupPass,
    PruneHeadsPass,
    PruneFfnPass,
    DropLayersPass,
    SparsityPass,
    AdaptersPass,
    MacPrunePass,
    EmbeddingTablesPass,
    QuantizePass,
):
    register_pass(_builtin)


def build_pass(name: str, parameters: dict) -> RecipePass:
    if name not in PASSES:
        raise UserError(f"unknown pass '{name}'", f"choose one of: {', '.join(sorted(PASSES))}")
    return configure(PASSES[name], parameters)
