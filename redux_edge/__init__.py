"""redux-edge: compile compressed PyTorch models into verified bundles for edge devices.

The Python API for one's own module (the CLI takes zoo names, ONNX files and bundles)::

    import redux_edge

    bundle = redux_edge.compile(module, {"image": images}, target="host", output="build/mine",
                                recipe=[{"pass": "drop-layers", "layers": [1]}, {"pass": "sparsity"}])
    outputs, manifest = redux_edge.run(bundle.path)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from redux_edge.bundle import Bundle

__all__ = ["__version__", "bench", "compile", "inspect", "run"]

__version__ = "0.1.0"


def compile(
    module: nn.Module,
    example_inputs: dict[str, np.ndarray],
    output: str | Path,
    target: str = "host",
    recipe: list[dict[str, Any]] | str | Path | None = None,
    *,
    force: bool = False,
    backend: str | None = None,
    name: str = "model",
) -> Bundle:
    """Compile ``module`` for ``target`` into a verified bundle at ``output``. ``example_inputs``: real
    inputs by name (the first axis is the batch); ``recipe``: steps as ``{"pass": name, **parameters}``,
    or a recipe file; the default is the cleanup recipe, as for ``redux-edge compile``."""
    from redux_edge.frontend.torch import module_source
    from redux_edge.pipeline import CompileOptions, compile_model
    from redux_edge.recipe import load_recipe, recipe_from_dict

    if isinstance(recipe, list):
        chosen = recipe_from_dict({"name": "python", "passes": recipe}, "the recipe argument")
    else:
        chosen = load_recipe(Path(recipe) if recipe is not None else None)
    source = module_source(module, example_inputs, name)
    return compile_model(source, CompileOptions(target, chosen, Path(output), force=force, backend=backend))


def run(bundle: str | Path, inputs: str | Path | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """A bundle's outputs for an input file (or its sample), and its manifest."""
    from redux_edge import api

    outputs, manifest = api.run(Path(bundle), Path(inputs) if inputs is not None else None)
    return outputs, dict(manifest)


def bench(bundle: str | Path, iterations: int = 100, threads: int | None = None) -> dict:
    """Latency statistics of a bundle on this machine."""
    from redux_edge import api

    return api.bench(Path(bundle), iterations=iterations, threads=threads)


def inspect(bundle: str | Path) -> tuple[dict, list[str]]:
    """A bundle's manifest and the files that do not match it."""
    from redux_edge import api

    manifest, problems = api.inspect(Path(bundle))
    return dict(manifest), problems
