"""Frontends: what a user names with ``--model``, brought into the IR as a ``Source``.

Each kind of source is one entry of ``SOURCES``: a test on the name the user gave and the function that
opens it; the first that accepts the name opens it. A new kind (a Hugging Face directory) is one more
entry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from redux_edge.errors import UserError
from redux_edge.frontend.onnx import onnx_source
from redux_edge.frontend.source import Source
from redux_edge.interfaces import Step, no_progress

__all__ = ["SOURCES", "Source", "load_source"]


def _is_onnx_file(model: str) -> bool:
    return model.endswith(".onnx") or Path(model).is_file()


def _open_onnx(
    model: str, shapes: dict[str, list[int]], inputs_file: Path | None, step: Step, weights: Path | None
) -> Source:

    return onnx_source(Path(model), shapes, inputs_file, step)


def _open_pt2(
    model: str, shapes: dict[str, list[int]], inputs_file: Path | None, step: Step, weights: Path | None
) -> Source:
    from redux_edge.frontend.pt2 import pt2_source

    if not Path(model).is_file():
        raise UserError(f"{model} does not exist", "give the path of a file saved with torch.export.save")
    return pt2_source(Path(model), shapes, inputs_file, step)


def _open_huggingface(
    model: str, shapes: dict[str, list[int]], inputs_file: Path | None, step: Step, weights: Path | None
) -> Source:
    from redux_edge.frontend.huggingface import huggingface_source

    return huggingface_source(Path(model), shapes, inputs_file, step)


def _open_zoo(
    model: str, shapes: dict[str, list[int]], inputs_file: Path | None, step: Step, weights: Path | None
) -> Source:
    from redux_edge.frontend.torch import zoo_source

    return zoo_source(model, shapes, inputs_file, step, weights)


Opener = Callable[[str, dict[str, list[int]], Path | None, Step, Path | None], Source]
# (accepts the --model text, opens it); the zoo comes last and names the choices when nothing fits.
SOURCES: list[tuple[Callable[[str], bool], Opener]] = [
    (lambda model: model.endswith(".pt2"), _open_pt2),
    (_is_onnx_file, _open_onnx),
    (lambda model: Path(model).is_dir(), _open_huggingface),
    (lambda _: True, _open_zoo),
]


def load_source(
    model: str,
    shapes: dict[str, list[int]] | None = None,
    inputs_file: Path | None = None,
    step: Step = no_progress,
    weights: Path | None = None,
) -> Source:
    """A zoo name, a path to an ``.onnx`` or ``.pt2`` file or a Hugging Face model directory, as a Source;
    ``weights`` replace a zoo model's own."""
    opener = next(open_ for accepts, open_ in SOURCES if accepts(model))
    if weights is not None and opener is not _open_zoo:
        raise UserError(
            "--weights replaces a zoo model's parameters", "a model file or directory carries its own"
        )
    return opener(model, shapes or {}, inputs_file, step, weights)
