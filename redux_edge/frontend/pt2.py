"""A ``torch.export`` program saved with ``torch.export.save`` (``.pt2``) as a source, vetted before torch
reads it.

``torch.export.load`` can unpickle: payloads marked ``use_pickle``, custom (``custom_obj_``) and opaque
(``opaque_obj_``) objects among the constants, the legacy archive layouts, and the sample inputs (read
with ``torch.load(weights_only=True)``, then, if that fails, again with ``weights_only=False``); an
AOTInductor package even loads a shared library. The archive is untrusted, so its index is read first and
anything but the pickle-free layout is refused: every weight and constant a raw tensor payload described
in JSON, no compiled artifacts, and sample inputs that load here with ``weights_only=True`` (so torch's own
first attempt succeeds and its fallback never runs). Only then does torch load it. The program is
translated to ONNX with its own dynamic dims, and its module is the reference.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from redux_edge.errors import UserError, first_line
from redux_edge.frontend.module_run import run_module
from redux_edge.frontend.source import Source, check_feeds, fit_inputs
from redux_edge.frontend.torch import export_module
from redux_edge.interfaces import Step, no_progress
from redux_edge.preprocess import read_inputs

__all__ = ["pt2_source"]

_HINT = "save the program with torch.export.save from plain tensors (no custom objects), or export to ONNX"
# Every entry torch.export.save writes for one program named "model" without pickles. torch.export.load
# loads a program for *any* entry under models/ and reads that program's weights by its own configs and
# legacy pickled files, so an entry that is not on this list is refused, whatever its name.
_FIXED_ENTRIES = frozenset(
    {
        "archive_format",
        "archive_version",
        "byteorder",
        ".data/version",
        ".data/serialization_id",
        "models/model.json",
        "data/weights/model_weights_config.json",
        "data/constants/model_constants_config.json",
        "data/sample_inputs/model.pt",
    }
)
_WEIGHTS = "data/weights/model_weights_config.json"
_CONSTANTS = "data/constants/model_constants_config.json"
# Raw tensor payloads: weight_<n> and tensor_<n> (custom_obj_/opaque_obj_ constants are pickles).
_PAYLOAD = re.compile(r"(weight|tensor)_[0-9]+")


def _refuse(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a .pt2 redux-edge loads: {why}", _HINT)


def _payloads(archive: zipfile.ZipFile, name: str, path: Path) -> dict[str, dict]:
    try:
        config = json.loads(archive.read(name))["config"]
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise _refuse(path, f"{PurePosixPath(name).name} is missing or not JSON") from exc
    if not isinstance(config, dict) or not all(isinstance(entry, dict) for entry in config.values()):
        raise _refuse(path, f"{PurePosixPath(name).name} is not a table of payloads")
    return config


def _entries(archive: zipfile.ZipFile, path: Path) -> tuple[str, set[str]]:
    """The archive's one root folder and the entries under it; duplicates and escapes refused."""
    names = archive.namelist()
    if len(set(names)) != len(names):
        raise _refuse(path, "it holds two entries of the same name")
    parts = [PurePosixPath(name).parts for name in names]
    roots = {part[0] for part in parts if part}
    escapes = any(".." in part or name.startswith("/") for name, part in zip(names, parts, strict=True))
    if len(roots) != 1 or escapes:
        raise _refuse(path, "its files do not sit in one archive folder")
    root = roots.pop() + "/"
    return root, {name[len(root) :] for name in names if name != root}


def vet_archive(path: Path) -> None:
    """Refuse an archive whose loading could unpickle or run code (see the module's docstring)."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise _refuse(path, f"not a zip archive ({exc})") from exc
    with archive:
        root, inside = _entries(archive, path)
        if "archive_format" not in inside or archive.read(root + "archive_format").strip() != b"pt2":
            raise _refuse(path, "no pt2 archive_format (a legacy layout, which loads with pickle)")
        if "models/model.json" not in inside:
            raise _refuse(path, "it holds no program 'model'")
        weights = _payloads(archive, root + _WEIGHTS, path)
        constants = _payloads(archive, root + _CONSTANTS, path)
        allowed = set(_FIXED_ENTRIES)
        for folder, table in (("data/weights/", weights), ("data/constants/", constants)):
            for fqn, payload in table.items():
                name = str(payload.get("path_name", ""))
                if payload.get("use_pickle") or not _PAYLOAD.fullmatch(name):
                    raise _refuse(path, f"'{fqn}' is stored as a pickled object")
                allowed.add(folder + name)
        if unknown := sorted(name for name in inside - allowed if not name.endswith("/")):
            raise _refuse(
                path, f"it holds {unknown[0]}, which torch would load and a plain save never writes"
            )
        try:
            torch.load(io.BytesIO(archive.read(root + "data/sample_inputs/model.pt")), weights_only=True)
        except Exception as exc:  # torch.load raises many types for what it refuses
            raise _refuse(path, "its sample inputs are not plain tensors") from exc


def pt2_source(
    path: Path,
    shapes: dict[str, list[int]] | None = None,
    inputs_file: Path | None = None,
    step: Step = no_progress,
) -> Source:
    vet_archive(path)
    with step(f"loading {path.name} with torch.export.load (vetted: no pickles)"):
        try:
            program = torch.export.load(path)
        except Exception as exc:  # the deserializer raises many types for a damaged archive
            raise _refuse(path, f"torch cannot read it ({first_line(exc)})") from exc
    placeholders = {
        node.name: node.meta.get("val")
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs
    }
    names = list(placeholders)
    args, kwargs = program.example_inputs or ((), {})
    if inputs_file is not None:
        inputs = read_inputs(inputs_file, names, None)
    elif args and not kwargs and all(isinstance(a, torch.Tensor) for a in args):
        inputs = {name: arg.detach().numpy() for name, arg in zip(names, args, strict=True)}
    else:
        raise UserError(
            f"{path} has no tensor sample inputs", "give --inputs FILE.npz with one array per input"
        )
    inputs = fit_inputs({name: np.asarray(array) for name, array in inputs.items()}, shapes or {})
    reference = run_module(program.module(), inputs)
    outputs = ["output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))]
    with step(f"exporting {path.name} with torch.onnx (dynamo)"):
        try:
            exported = export_module(program, inputs, {}, outputs)
        except Exception as exc:  # the exporter raises its own types for what it cannot translate
            raise UserError(
                f"torch.onnx.export cannot translate {path}: {first_line(exc)}", "--debug shows why"
            ) from exc
    check_feeds(exported, inputs)
    return Source(
        name=path.stem,
        origin={"pt2": str(path)},
        model=exported,
        inputs=inputs,
        reference_outputs=reference,
        reference_kind="pytorch (torch.export program)",
    )
