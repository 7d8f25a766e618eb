"""The bundle manifest's types, and its validation against ``manifest.schema.json`` when a bundle is read.

The TypedDicts are what code reading a manifest may rely on; the JSON Schema beside this file (format
``FORMAT_VERSION``) is the same contract for other tools. A manifest that does not validate is the user's
problem (a damaged or foreign bundle): one line naming the field. Sections that passes add
(``compression``, ``adapters``, ``protection``, ...) are objects under their own keys.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, TypedDict, cast

from redux_edge.errors import UserError

__all__ = ["FORMAT_VERSION", "SCHEMA", "Manifest", "validate"]

FORMAT_VERSION = 2
SCHEMA = Path(__file__).with_name("manifest.schema.json")


class TensorSpec(TypedDict):
    name: str
    dtype: str
    shape: list[int | str]


class Tolerance(TypedDict):
    min_cosine: float
    atol: float


class Verify(TypedDict, total=False):
    reference: str
    samples: int
    tolerance: Tolerance
    ir: dict[str, dict[str, Any]]
    artifact: dict[str, dict[str, Any]]
    artifact_vs_onnxruntime: dict[str, dict[str, Any]]
    artifact_run: str
    random_outputs: list[str]
    # How far passes that change numerics on purpose moved the outputs from the float model, and the gate.
    shift: dict[str, Any]
    # What made-up inputs hold, when the model came without inputs (frontend/made_up.py).
    made_up_inputs: list[str]


class BackendEntry(TypedDict, total=False):
    name: str
    version: str
    artifact: str
    precision: str
    session: dict[str, Any]
    static_shapes: dict[str, list[int]]
    engine_build: dict[str, Any]


class FileEntry(TypedDict):
    sha256: str
    bytes: int


class Manifest(TypedDict, total=False):
    format_version: int
    created: str
    model: dict[str, Any]
    target: dict[str, Any]
    backend: BackendEntry
    recipe: dict[str, Any]
    passes: list[dict[str, Any]]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocess: dict[str, Any] | None
    metrics: dict[str, Any]
    verify: Verify
    storage: dict[str, Any]
    # The sections of the built-in passes (a registered pass may add its own key).
    compression: dict[str, Any]
    adapters: dict[str, Any]
    protection: dict[str, Any]
    toolchain: dict[str, str]
    files: dict[str, FileEntry]


@functools.cache
def _validator() -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))


def validate(document: object, where: Path) -> Manifest:
    """``document`` as a Manifest; UserError naming the first field that does not fit the schema."""
    if isinstance(document, dict) and document.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{where.parent} has bundle format {document.get('format_version')!r}, "
            f"this redux-edge reads {FORMAT_VERSION}",
            "recompile the bundle with this version",
        )
    errors = sorted(_validator().iter_errors(document), key=lambda error: list(error.absolute_path))
    if errors:
        first = errors[0]
        field = "/".join(str(part) for part in first.absolute_path) or "(the document)"
        raise UserError(
            f"{where} does not fit bundle format {FORMAT_VERSION}: {field}: {first.message}",
            "recompile the bundle; the format is redux_edge/manifest.schema.json",
        )
    return cast(Manifest, document)
