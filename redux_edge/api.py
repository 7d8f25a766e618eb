"""The one entry point that the CLI, tools and tests share: compile, run, bench, inspect, and the trainers
that write what compile consumes (MaskLLM masks, adapter packs).

``compile_model`` is the pipeline of ``redux_edge/pipeline.py``; ``load_source`` brings a model into the IR
(``redux_edge/frontend``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from redux_edge import bundle as bundles
from redux_edge import pipeline
from redux_edge.backends import BACKENDS, Backend
from redux_edge.errors import UserError
from redux_edge.frontend import Source, load_source
from redux_edge.interfaces import Step, no_progress
from redux_edge.manifest import Manifest
from redux_edge.pipeline import CompileOptions
from redux_edge.preprocess import from_manifest, read_inputs
from redux_edge.recipe import Recipe
from redux_edge.runtime.session import BundleSession, InputError
from redux_edge.targets import Target, available_targets, load_target
from redux_edge.train.once import learn_mask_plan, train_adapter_pack

__all__ = [
    "CompileOptions",
    "Source",
    "bench",
    "compile_model",
    "inspect",
    "learn_mask_plan",
    "load_source",
    "native_output_to_stderr",
    "run",
    "target_status",
    "train_adapter_pack",
]


def compile_model(
    model: str | Source,
    target_name: str,
    recipe: Recipe,
    out: Path,
    *,
    backend_name: str | None = None,
    backend_options: dict | None = None,
    step: Step = no_progress,
    **asked: Any,
) -> bundles.Bundle:
    """``pipeline.compile_model`` with the options as keywords (``CompileOptions``' fields), the backend
    by name, and ``backend_options``: ``threads``, ``precision`` and what the backends' flags set."""
    settings = dict(backend_options or {})
    options = CompileOptions(
        target_name,
        recipe,
        out,
        backend=backend_name,
        threads=settings.pop("threads", None),
        precision=settings.pop("precision", None),
        backend_flags=settings,
        **asked,
    )
    return pipeline.compile_model(model, options, step)


@contextlib.contextmanager
def native_output_to_stderr() -> Iterator[None]:
    """Send what native libraries print (TVM's and ONNX Runtime's C++ logs) to stderr, at the file
    descriptor, so that stdout carries only our report or JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _open(bundle_path: Path) -> tuple[bundles.Bundle, Backend]:
    """A bundle that is intact and runnable on this machine, with its backend."""
    bundle = bundles.load_bundle(bundle_path)
    if problems := bundle.verify_files():
        raise UserError(f"bundle {bundle_path} is damaged: {problems[0]}", "recompile or re-copy the bundle")
    name = bundle.manifest["backend"]["name"]
    backend = BACKENDS.get(name)
    if backend is None:
        raise UserError(f"bundle {bundle_path} needs the {name} backend", "run it on its target device")
    target = Target.from_json(bundle.manifest["target"])
    runs, why = backend.can_run_here(target)
    if not runs:
        raise UserError(
            f"this {name} bundle for {target.name} cannot run on this machine ({why})",
            "run it on the device with runner/run.py, or compile for --target host",
        )
    return bundle, backend


def _feeds(bundle: bundles.Bundle, inputs_file: Path | None) -> dict[str, np.ndarray]:
    names = [spec["name"] for spec in bundle.manifest["inputs"]]
    if inputs_file is None:
        with np.load(bundle.file("sample/inputs.npz"), allow_pickle=False) as archive:
            return {name: archive[name] for name in names}
    return read_inputs(inputs_file, names, from_manifest(bundle.manifest["preprocess"], bundle.path))


@contextlib.contextmanager
def _input_errors():
    try:
        yield
    except InputError as exc:
        raise UserError(
            f"wrong input: {exc}", "match the model's input signature (see `redux-edge inspect`)"
        ) from exc


def run(
    bundle_path: Path, inputs_file: Path | None = None, adapter: str | None = None
) -> tuple[dict[str, np.ndarray], Manifest]:
    """Outputs of a bundle for an input file (text, image, .npy, .npz) or its sample inputs; ``adapter``
    names the task whose adapter pack to swap in."""
    bundle, backend = _open(bundle_path)
    adapters = bundle.manifest.get("adapters") or {}
    swappable = [] if adapters.get("merged") else [pack["task"] for pack in adapters.get("packs", [])]
    if adapter is not None and adapter not in swappable:
        raise UserError(
            f"bundle {bundle_path} has no swappable adapter '{adapter}'",
            f"choose one of: {', '.join(swappable)}" if swappable else "compile with --adapters PACK",
        )
    feeds = _feeds(bundle, inputs_file)
    with _input_errors():
        session = (
            backend.load(bundle.path) if adapter is None else BundleSession(bundle.path, adapter=adapter)
        )
        outputs = session.run(feeds)
    names = [spec["name"] for spec in bundle.manifest["outputs"]]
    if broken := [name for name, value in zip(names, outputs, strict=True) if _has_nan(value)]:
        raise UserError(
            f"the model computed NaN in output '{broken[0]}' for these inputs",
            "check the inputs' values (infinite or out-of-range numbers)",
        )
    return dict(zip(names, outputs, strict=True)), bundle.manifest


def _has_nan(value: np.ndarray) -> bool:
    return value.dtype.kind in "fc" and bool(np.isnan(value).any())


def bench(
    bundle_path: Path,
    inputs_file: Path | None = None,
    warmup: int = 10,
    iterations: int = 100,
    threads: int | None = None,
) -> dict:
    bundle, backend = _open(bundle_path)
    feeds = _feeds(bundle, inputs_file)
    with _input_errors():
        stats = backend.load(bundle.path, threads).benchmark(feeds, warmup, iterations)
    return {
        "bundle": str(bundle_path),
        "backend": bundle.manifest["backend"]["name"],
        "threads": threads or bundle.manifest["backend"]["session"]["threads"],
        "shapes": {k: list(v.shape) for k, v in feeds.items()},
        **stats,
    }


def target_status() -> list[dict]:
    """Every target with, per backend it lists, whether that backend can build and run for it here and
    the precisions it computes for it (float precisions and what ``--quantize`` can make)."""

    known = BACKENDS
    rows = []
    for name in available_targets():
        target = load_target(name)
        statuses = []
        for backend_name in target.backends:
            backend = known.get(backend_name)
            if backend is None:
                statuses.append(
                    {
                        "backend": backend_name,
                        "builds_here": False,
                        "runs_here": False,
                        "build_note": "not in this version",
                        "run_note": "not in this version",
                        "precisions": [],
                    }
                )
                continue
            builds, build_note = backend.can_build_here()
            try:
                backend.check_target(target)
            except UserError as exc:
                builds, build_note = False, str(exc)
            runs, run_note = backend.can_run_here(target)
            statuses.append(
                {
                    "backend": backend_name,
                    "builds_here": builds,
                    "runs_here": runs,
                    "build_note": build_note,
                    "run_note": run_note,
                    "precisions": backend.precisions_for(target),
                }
            )
        rows.append({**target.to_json(), "description": target.description, "backend_status": statuses})
    return rows


def inspect(bundle_path: Path) -> tuple[Manifest, list[str]]:
    bundle = bundles.load_bundle(bundle_path)
    return bundle.manifest, bundle.verify_files()
