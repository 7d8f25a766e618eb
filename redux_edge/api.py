"""The one entry point that the CLI, tools and tests share: compile, run, bench, inspect.

``compile`` is the pipeline of docs/ARCHITECTURE.md in order: resolve target and backend, bring the
model into the IR (zoo export or a user's ONNX file) with real inputs and reference outputs, run the
recipe's passes, lower, verify the IR and the artifact against the reference, and publish the bundle
atomically. Any check that fails raises before the bundle is renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx_ir as ir

from redux_edge import bundle as bundles
from redux_edge.backends import Backend, select_backend
from redux_edge.datasets.images import Images
from redux_edge.errors import UserError
from redux_edge.ir.cost import model_cost
from redux_edge.ir.surgery import copy_model
from redux_edge.ir.verify import Tolerance, compare, require_match
from redux_edge.passes import RecipePass, StructuralPass, WeightMaskPass
from redux_edge.passes.mac_prune import MacPrunePass
from redux_edge.preprocess import Preprocessor, from_manifest, read_inputs
from redux_edge.recipe import Recipe
from redux_edge.runtime import runner
from redux_edge.targets import Target, load_target

__all__ = [
    "Source",
    "bench",
    "compile_model",
    "inspect",
    "load_source",
    "native_output_to_stderr",
    "run",
    "target_status",
]


Step = Callable[[str], contextlib.AbstractContextManager]
_TOOLCHAIN = ("torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime")


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


def _no_progress(_: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class Source:
    """A model in the IR with the inputs it is verified on and the outputs it must reproduce."""

    name: str
    origin: dict
    model: ir.Model
    inputs: dict[str, np.ndarray]
    reference: list[np.ndarray]
    reference_kind: str
    preprocessor: Preprocessor | None = None
    architecture: dict = field(default_factory=dict)
    # The PyTorch reference with a structural plan applied by masking (nothing removed) and weight masks
    # multiplied in; None where the model's modules cannot express the plan.
    masked_reference: Callable[[dict, dict], list[np.ndarray] | None] | None = None
    task_data: str | None = None
    # The PyTorch module of a zoo model (what learned masks are trained on); None for ONNX files.
    module: object | None = None
    synthetic_inputs: bool = False

    @property
    def output_names(self) -> list[str]:
        return [value.name for value in self.model.graph.outputs]


def load_source(
    model: str,
    shapes: dict[str, list[int]] | None = None,
    inputs_file: Path | None = None,
    step: Step = _no_progress,
    weights: Path | None = None,
) -> Source:
    """A zoo name or a path to an ``.onnx`` file, as a Source; ``weights`` replace a zoo model's own."""
    if model.endswith(".onnx") or Path(model).is_file():
        if weights is not None:
            raise UserError("--weights replaces a zoo model's parameters", "an ONNX file carries its own")
        return _onnx_source(Path(model), shapes or {}, inputs_file, step)
    from redux_edge import zoo
    from redux_edge.frontend.torch import export_module, run_module

    card = zoo.load_card(model)  # fails fast on an unknown name, before torch work
    with step(f"loading {model}"):
        entry = zoo.load_model(model)
        if weights is not None:
            entry.source = _load_weights(entry.module, weights)
        inputs = (
            entry.inputs
            if inputs_file is None
            else read_inputs(inputs_file, list(entry.inputs), entry.preprocessor)
        )
        inputs = _fit_inputs(inputs, shapes or {})
    with step(f"exporting {model} with torch.onnx (dynamo)"):
        exported = export_module(entry.module, entry.inputs, entry.dynamic_axes, entry.output_names)
    _check_feeds(exported, inputs)

    def masked_reference(plan: dict, masks: dict) -> list[np.ndarray] | None:
        from redux_edge.analysis.reference import masked

        if plan and entry.architecture.get("family") != "bert":
            return None  # the hooks address BERT-family modules
        head_dim = entry.architecture.get("hidden_size", 1) // entry.architecture.get("num_heads", 1)
        with masked(entry.module, plan, head_dim, masks) as module:
            return run_module(module, inputs)

    return Source(
        name=entry.name,
        origin={"zoo": entry.name, "weights": entry.source, "description": entry.description},
        model=exported,
        inputs=inputs,
        reference=run_module(entry.module, inputs),
        reference_kind="pytorch",
        preprocessor=entry.preprocessor,
        architecture=entry.architecture,
        masked_reference=masked_reference,
        task_data=card.get("task_data"),
        module=entry.module,
    )


def _load_weights(module, path: Path) -> str:
    """Put the parameters of a .safetensors file (a format that cannot run code) into a zoo module."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"cannot read weights {path}: {exc}", "give a .safetensors file") from exc
    expected = module.state_dict()
    wrong = sorted(
        name for name in expected if name not in weights or weights[name].shape != expected[name].shape
    )
    if wrong or set(weights) - set(expected):
        first = wrong[0] if wrong else sorted(set(weights) - set(expected))[0]
        raise UserError(
            f"weights {path} do not fit the model (e.g. {first})",
            "give weights of this zoo model in its original shapes, as `train recover` writes them",
        )
    module.load_state_dict(weights)
    return f"{path} (sha256 {bundles.file_digest(path)[:16]})"


def _onnx_source(path: Path, shapes: dict[str, list[int]], inputs_file: Path | None, step: Step) -> Source:
    from redux_edge.frontend.onnx import load_onnx

    with step(f"checking {path}"):
        model = load_onnx(path)
    if inputs_file is not None:
        inputs = _fit_inputs(
            read_inputs(inputs_file, [value.name for value in model.graph.inputs], None), shapes
        )
    else:
        inputs = _synthetic_inputs(model, shapes)
    _check_feeds(model, inputs)
    with step("running the original model for reference outputs"), tempfile.TemporaryDirectory() as scratch:
        # The IR as loaded, not the file: loading may lower an IR version the runtime would refuse.
        ir.save(model, str(Path(scratch) / "original.onnx"))
        reference = _run_ir_file(Path(scratch) / "original.onnx", inputs)
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return Source(
        name=path.stem,
        origin={"onnx": str(path), "sha256": digest},
        model=model,
        inputs=inputs,
        reference=reference,
        reference_kind="onnxruntime on the original file"
        + (" (synthetic inputs)" if inputs_file is None else ""),
        synthetic_inputs=inputs_file is None,
    )


def _fit_inputs(inputs: dict[str, np.ndarray], shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Real inputs brought to the shapes asked for. Along the batch axis every sample is kept, cycled up to
    a whole number of batches (a static-batch artifact is verified chunk by chunk); other axes are
    zero-padded or cut (a zero token id is BERT's [PAD] and a zero mask hides it, so text stays valid)."""
    if unknown := set(shapes) - set(inputs):
        raise UserError(
            f"--shapes names unknown inputs {sorted(unknown)}", f"the model's inputs are {list(inputs)}"
        )
    fitted = dict(inputs)
    for name, shape in shapes.items():
        array = inputs[name]
        if len(shape) != array.ndim:
            raise UserError(
                f"wrong input: --shapes gives {name} {len(shape)} dimensions, the model takes {array.ndim}",
                f"write --shapes {name}:{'x'.join(str(d) for d in array.shape)}",
            )
        if shape:
            batches = -(-array.shape[0] // shape[0])
            array = np.resize(array, (batches * shape[0], *array.shape[1:]))
        for axis, size in enumerate(shape[1:], start=1):
            if array.shape[axis] > size:
                array = np.take(array, range(size), axis=axis)
            elif array.shape[axis] < size:
                padding = [(0, 0)] * array.ndim
                padding[axis] = (0, size - array.shape[axis])
                array = np.pad(array, padding)
        fitted[name] = array
    return fitted


def _synthetic_inputs(model: ir.Model, shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Random inputs from the model's signature; named dimensions default to 1 unless --shapes sets them."""
    rng = np.random.default_rng(0)
    names = [value.name for value in model.graph.inputs]
    if unknown := set(shapes) - set(names):
        raise UserError(f"--shapes names unknown inputs {sorted(unknown)}", f"the model's inputs are {names}")
    inputs = {}
    for value in model.graph.inputs:
        if value.name in shapes:
            shape = tuple(shapes[value.name])
        else:
            shape = tuple(dim if isinstance(dim, int) else 1 for dim in value.shape or ())
        dtype = value.dtype.numpy()
        if np.issubdtype(dtype, np.floating):
            inputs[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            # Small non-negative integers are valid indices, ids and masks for almost any model.
            inputs[value.name] = rng.integers(0, 2, shape).astype(dtype)
    return inputs


def input_specs(model: ir.Model) -> list[dict]:
    specs = []
    for value in model.graph.inputs:
        shape = [
            dim if isinstance(dim, int) else (str(dim) if dim.value else f"{value.name}_{axis}")
            for axis, dim in enumerate(value.shape or ())
        ]
        specs.append({"name": value.name, "dtype": value.dtype.name, "shape": shape})
    return specs


def _with_static_shapes(specs: list[dict], static: dict[str, list[int]] | None) -> list[dict]:
    """Input specs as the artifact takes them: a static-shape backend fixes every dimension."""
    return [{**spec, "shape": static[spec["name"]]} if static else spec for spec in specs]


def _check_feeds(model: ir.Model, inputs: dict[str, np.ndarray]) -> None:
    with _input_errors():
        runner.check_inputs(input_specs(model), inputs)


def _run_ir_file(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of an ONNX file under ONNX Runtime with graph optimisations off: the plain semantics."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(None, inputs)
    except Exception as exc:  # ORT raises its own pybind types (Fail, NotImplemented, InvalidArgument)
        first_line = str(exc).strip().splitlines()[0]
        raise UserError(f"ONNX Runtime cannot run {path.name}: {first_line}", "--debug for details") from exc


def compile_model(
    model: str,
    target_name: str,
    recipe: Recipe,
    out: Path,
    *,
    force: bool = False,
    backend_name: str | None = None,
    tolerance: Tolerance | None = None,
    shapes: dict[str, list[int]] | None = None,
    inputs_file: Path | None = None,
    weights: Path | None = None,
    backend_options: dict | None = None,
    emit_c: bool = False,
    step: Step = _no_progress,
) -> bundles.Bundle:
    """Compile ``model`` for ``target_name`` into the bundle ``out``; ``emit_c`` adds the C kernel of a
    mac-prune-protected first layer (``c/``).

    ``backend_options``: ``threads``, ``precision`` (default fp32) and backend-specific keys (``tune``,
    ``tuning_db``, ``rpc``, ``sparsity``, ``dla_core``); see each backend's ``lower``.
    """
    target = load_target(target_name)
    backend = select_backend(target, backend_name)
    options = {**(backend_options or {})}
    options["precision"] = options.get("precision") or backend.default_precision
    if options["precision"] not in backend.precisions:
        raise UserError(
            f"the {backend.name} backend has no precision '{options['precision']}'",
            f"choose one of: {', '.join(backend.precisions)}",
        )
    tolerance = tolerance or Tolerance.for_precision(options["precision"])
    bundles.check_destination(out, force)
    source = load_source(model, shapes, inputs_file, step, weights)
    options["shapes"] = {name: list(array.shape) for name, array in source.inputs.items()} | (shapes or {})
    original_cost = model_cost(source.model, {k: v.shape for k, v in source.inputs.items()})
    structural = [p for p in recipe.passes if isinstance(p, StructuralPass)]
    masking = [p for p in recipe.passes if isinstance(p, WeightMaskPass)]
    calibration = _calibration(source, structural)
    protecting = next((p for p in recipe.passes if isinstance(p, MacPrunePass)), None)
    if emit_c and protecting is None:
        raise UserError("--emit-c writes the kernel of a mac-prune-protected layer", "add --mac-prune P")
    if protecting is not None:
        _check_protection(recipe, backend)
        image_data = _image_task_data(source)
        calibration = _pixel_calibration(source, protecting, image_data)
    pass_log, dense = _run_passes(source.model, recipe, step)
    plan = {key: units for p in structural for key, units in p.removed.items() if units}
    masks = {name: keep for p in masking for name, keep in p.masks.items()}
    adapting = next((p for p in recipe.passes if p.name == "adapters"), None)
    if masks:
        # TensorRT builds sparse tactics only when asked (trtexec --sparsity=enable).
        options.setdefault("sparsity", masking[-1].pattern)
    if adapting is not None:
        _check_adapters(source, adapting, backend, bool(plan or masks))
    reference, reference_kind = source.reference, source.reference_kind
    if plan or masks:
        with step("running the reference with the plan's units and the weight masks applied"):
            reference = _masked_reference(source, dense, plan, masks)
        reference_kind += ", with " + " and ".join(
            ["the removed heads/neurons zeroed and dropped layers skipped"] * bool(plan)
            + ["the sparsity masks multiplied into the weights"] * bool(masks)
        )
    if adapting is not None:
        task, pack = next(iter(adapting.read.items()))
        with step(f"running the reference with the adapter pack '{task}'"):
            reference = _run_adapted(source, pack)
        reference_kind += f", with the adapter pack '{task}' (dequantized from its file)"

    def expected(outputs: list[np.ndarray]) -> list[np.ndarray]:
        """What a run's outputs must equal: the reference, or for mac-prune the original fed the input
        masked as that run drew it (its ``pixel_keep`` output), and that mask itself."""
        if protecting is None:
            return reference
        return _pixel_masked_reference(source, dense, protecting, outputs[-1])

    if protecting is not None:
        reference_kind += ", fed each run's masked input (the run's pixel_keep output)"
    with bundles.staging(out, force) as stage:
        ir.save(source.model, str(stage / "model.onnx"))
        with step("verifying the transformed IR"):
            ir_outputs = _run_ir_file(stage / "model.onnx", source.inputs)
            ir_report = compare(expected(ir_outputs), ir_outputs, source.output_names)
            require_match(ir_report, tolerance, "the transformed IR (model.onnx)")
        with step(f"lowering with {backend.name} for {target.name}"):
            backend_entry = backend.lower(stage / "model.onnx", target, stage / "artifact", options)
        storage = _pack_sparse_weights(stage, masking)
        # The health-check sample is one batch the artifact takes: all samples, or one static batch.
        sample_count = next(iter(options["shapes"].values()))[0] if backend.static_shapes else None
        _write_runner(stage, source, sample_count)
        manifest = _manifest(
            source, target, backend_entry, recipe, pass_log, original_cost, tolerance, ir_report
        )
        manifest["verify"]["reference"] = reference_kind
        if storage:
            manifest["storage"] = storage
        if adapting is not None:
            manifest["adapters"] = _bundle_adapters(adapting, stage)
        bundles.write_manifest(stage, manifest)
        with step("verifying the artifact"):
            outputs, how = _run_artifact(backend, target, stage, source.inputs, options["shapes"])
            if outputs is not None:
                checks = [(expected(outputs), "artifact"), (ir_outputs, "artifact_vs_onnxruntime")]
                if protecting is not None and protecting.seed < 0:
                    checks.pop()  # two sessions without a seed draw different masks
                for expected_outputs, name in checks:
                    manifest["verify"][name] = compare(expected_outputs, outputs, source.output_names)
                    require_match(manifest["verify"][name], tolerance, f"the {backend.name} artifact")
            manifest["verify"]["artifact_run"] = how
        if adapting is not None and not adapting.merge:
            with step(f"verifying every adapter pack swapped into the artifact ({', '.join(adapting.read)})"):
                _verify_adapter_swaps(source, adapting, stage, manifest, tolerance)
        verified = outputs if outputs is not None else ir_outputs
        np.savez(
            stage / "sample" / "outputs.npz",
            **{name: value[:sample_count] for name, value in zip(source.output_names, verified, strict=True)},
        )
        if plan or masks:
            manifest["compression"] = _compression_report(
                source, dense, plan, calibration, backend, target, stage, manifest, options, step
            )
            if masking:
                manifest["compression"]["sparsity"] = _sparsity_report(masking, storage, target)
        if protecting is not None:
            manifest["protection"] = _protection_report(
                source, dense, protecting, calibration, image_data, stage, step
            )
            if emit_c:
                with step("emitting the first layer's C kernel and checking it with gcc"):
                    manifest["protection"]["kernel"] = _emit_kernel(source, protecting, stage, verified[-1])
        bundles.write_manifest(stage, manifest)
    return bundles.load_bundle(out)


def learn_mask_plan(
    model: str,
    out: Path,
    pattern: str = "2:4",
    steps: int = 300,
    sentences: int = 4096,
    batch: int = 32,
    seed: int = 0,
    step: Step = _no_progress,
) -> dict:
    """Learn N:M masks (MaskLLM) for the weights the ``sparsity`` pass would sparsify in a zoo model,
    on the card's task data (training split; else its samples), and write them to ``out`` (.npz)."""
    import torch

    from redux_edge.ir.nm import groups, parse_pattern
    from redux_edge.passes import build_pass
    from redux_edge.train.maskllm import MaskTraining, learn_masks
    from redux_edge.zoo.bert import BertSentenceEncoder, TokenStates

    source = load_source(model, step=step)
    if source.module is None:
        raise UserError("learn-masks trains a PyTorch model", "give a zoo model (redux-edge models)")
    build_pass("cleanup", {})(source.model)
    magnitude = build_pass("sparsity", {"pattern": pattern})
    magnitude(source.model)
    if source.task_data == "rotten-tomatoes" and source.preprocessor is not None:
        from redux_edge.datasets import rotten_tomatoes

        texts = rotten_tomatoes.calibration_texts(sentences)
        feeds = [source.preprocessor(texts[i : i + batch]) for i in range(0, len(texts), batch)]
        data = f"{len(texts)} Rotten Tomatoes training sentences"
    else:
        feeds, data = [source.inputs], f"the card's {next(iter(source.inputs.values())).shape[0]} samples"
    batches = [tuple(torch.from_numpy(array) for array in f.values()) for f in feeds]
    module = TokenStates(source.module) if isinstance(source.module, BertSentenceEncoder) else source.module
    losses: list[float] = []
    with step(f"learning {pattern} masks for {len(magnitude.masks)} weights on {data} ({steps} steps)"):
        learned = learn_masks(
            module,
            magnitude.masks,
            batches,
            pattern,
            MaskTraining(steps=steps, seed=seed),
            progress=lambda _, loss: losses.append(loss),
        )
    _write_atomically(out, lambda handle: np.savez_compressed(handle, **learned))
    m = parse_pattern(pattern)[1]
    changed = sum(
        int((groups(learned[n], m) != groups(magnitude.masks[n], m)).any(axis=1).sum()) for n in learned
    )
    total = sum(keep.size // m for keep in learned.values())
    return {
        "plan": str(out),
        "pattern": pattern,
        "weights": len(learned),
        "data": data,
        "steps": steps,
        "groups_changed_from_magnitude": changed / total,
        "distillation_loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None},
    }


def train_adapter_pack(
    model: str,
    task: str,
    out: Path,
    bits: int = 1,
    rank: int = 4,
    sentences: int = 2000,
    epochs: int = 2,
    seed: int = 0,
    test_sentences: int = 1000,
    step: Step = _no_progress,
) -> dict:
    """Train a low-bit adapter pack for a Rotten Tomatoes ``task`` on a zoo text model, measure its test
    accuracy through the pack as a device reads it, and write it to ``out``."""
    import torch

    from redux_edge import zoo
    from redux_edge.datasets import rotten_tomatoes
    from redux_edge.train.adapters import AdapterTraining, PackedAdapters, train_adapters

    card = zoo.load_card(model)
    if card.get("task_data") != "rotten-tomatoes":
        raise UserError(f"{model} has no task data to train adapters on", "use minilm-l6")
    if task not in rotten_tomatoes.TASKS:
        raise UserError(f"unknown task '{task}'", f"choose one of: {', '.join(rotten_tomatoes.TASKS)}")
    entry = zoo.load_model(model)
    data = rotten_tomatoes.load(train=sentences, test=test_sentences, seed=seed, task=task)

    def batches(texts: list[str], labels: np.ndarray, size: int = 32) -> list:
        return [
            (
                tuple(torch.from_numpy(a) for a in entry.preprocessor(texts[i : i + size]).values()),
                torch.from_numpy(labels[i : i + size]).long(),
            )
            for i in range(0, len(texts), size)
        ]

    config = AdapterTraining(bits=bits, rank=rank, epochs=epochs, seed=seed)
    with step(f"training {bits}-bit rank-{rank} adapters for '{task}' on {len(data.train_texts)} sentences"):
        pack = train_adapters(
            entry.module,
            batches(data.train_texts, data.train_labels),
            task,
            list(rotten_tomatoes.TASKS[task]),
            config,
        )
    with step(f"measuring accuracy on {len(data.test_texts)} test sentences"):
        adapted = PackedAdapters(entry.module, runner.parse_adapter_pack(pack.to_bytes()))
        with torch.inference_mode():
            correct = sum(
                int((adapted(*inputs)[1].argmax(1) == labels).sum())
                for inputs, labels in batches(data.test_texts, data.test_labels, 64)
            )
    pack.metrics = {
        "accuracy": correct / len(data.test_texts),
        "train_sentences": len(data.train_texts),
        "test_sentences": len(data.test_texts),
    }
    blob = pack.to_bytes()
    _write_atomically(out, lambda handle: handle.write(blob))
    return {"pack": str(out), "task": task, "bits": bits, "rank": rank, "bytes": len(blob), **pack.metrics}


def _write_atomically(out: Path, write: Callable) -> None:
    """``write(handle)`` into a temporary sibling of ``out``, renamed to ``out`` once complete."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as handle:
            try:
                write(handle)
            except BaseException:
                Path(handle.name).unlink(missing_ok=True)
                raise
        os.replace(handle.name, out)
    except OSError as exc:
        why = exc.strerror or exc
        raise UserError(f"cannot write {out}: {why}", "free disk space or choose another path") from exc


def _run_artifact(
    backend: Backend, target: Target, stage: Path, inputs: dict[str, np.ndarray], shapes: dict[str, list]
) -> tuple[list[np.ndarray] | None, str]:
    """The artifact's outputs where this machine can produce them, and how they were produced."""
    runs, why = backend.can_run_here(target)
    emulate = getattr(backend, "emulate", None)
    if runs:
        run, how = backend.load(stage).run, f"ran here ({why})"
    elif emulate is not None:
        run, how = emulate(stage, target)
        if run is None:
            return None, f"not run here: {why}; {how}"
    else:
        return None, f"not run here: {why}"
    if not backend.static_shapes:
        return run(inputs), how
    # A static-shape artifact takes one batch at a time.
    batch = next(iter(shapes.values()))[0]
    total = next(iter(inputs.values())).shape[0]
    chunks = [run({k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, total, batch)]
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)], how


def _masked_reference(source: Source, dense: ir.Model, plan: dict, masks: dict) -> list[np.ndarray]:
    """The original computation with the plan and the weight masks applied: PyTorch for zoo models; for
    ONNX files, ONNX Runtime on the graph the passes started from, with weights zeroed instead of sliced."""
    if source.masked_reference is not None:
        outputs = source.masked_reference(plan, masks)
        if outputs is not None:
            return outputs
    from redux_edge.analysis.reference import masked_graph

    with tempfile.TemporaryDirectory() as scratch:
        ir.save(masked_graph(copy_model(dense), plan, masks), str(Path(scratch) / "masked.onnx"))
        return _run_ir_file(Path(scratch) / "masked.onnx", source.inputs)


def _run_passes(model: ir.Model, recipe: Recipe, step: Step) -> tuple[list[dict], ir.Model | None]:
    """Run the recipe; also return the model as the first structural or weight-masking pass found it (the
    dense model that quality, speed and the exact reference compare against), None when there is none."""
    log, dense = [], None
    for configured in recipe.passes:
        if dense is None and isinstance(configured, (StructuralPass, WeightMaskPass, MacPrunePass)):
            dense = copy_model(model)
        with step(f"pass {configured.name}"):
            started = time.perf_counter()
            try:
                result = configured(model)
            except ir.passes.PreconditionError as exc:
                # onnx_ir wraps what requires() raises; a bad parameter is the user's to fix.
                if isinstance(exc.__cause__, UserError):
                    raise exc.__cause__ from None
                raise
        entry = {
            "pass": configured.name,
            "modified": result.modified,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if isinstance(configured, StructuralPass):
            entry["removed"] = {key: _count(units) for key, units in configured.removed.items()}
        log.append(entry)
    return log, dense


def _count(units: dict | list) -> int:
    return sum(len(v) for v in units.values()) if isinstance(units, dict) else len(units)


def _calibration(source: Source, structural: list[StructuralPass]) -> str | None:
    """Give the structural passes real calibration inputs: the model card's task data (training split,
    never the test sentences the quality report uses), else the inputs the compile verifies on."""
    if not any(p.importance == "calibration" for p in structural):
        return None
    if source.task_data == "rotten-tomatoes" and source.preprocessor is not None:
        from redux_edge.datasets import rotten_tomatoes

        texts = rotten_tomatoes.calibration_texts()
        feeds, described = source.preprocessor(texts), f"{len(texts)} Rotten Tomatoes training sentences"
    else:
        feeds = source.inputs
        described = f"the {next(iter(feeds.values())).shape[0]} verification samples"
    for configured in structural:
        configured.calibration = feeds
    return described


def _check_protection(recipe: Recipe, backend: Backend) -> None:
    others = [p.name for p in recipe.passes if p.name not in ("cleanup", "mac-prune")]
    if others:
        raise UserError(
            f"mac-prune runs in a compile of its own, not with {', '.join(others)}",
            "compile the compressed model first, then protect its model.onnx in a second compile",
        )
    if backend.name != "onnxruntime":
        raise UserError(
            f"mac-prune bundles use the onnxruntime backend, not {backend.name}",
            "the masks are drawn by ONNX RandomUniformLike; for microcontrollers use --emit-c",
        )


def _emit_kernel(source: Source, protecting: MacPrunePass, stage: Path, keep: np.ndarray) -> dict:
    """Write c/ (the C kernel and its quantised layer) and check the C, built with the host's gcc, against
    the integer reference on the verification samples with the masks the verified run drew."""
    from redux_edge.leakage import kernel

    images = (protecting.calibration or source.inputs)[protecting.protected_input]
    layer = kernel.first_conv_after_mask(source.model, protecting.critical, protecting.drop, images)
    folder = stage / "c"
    paths = kernel.emit_c(layer, folder)
    layer.save(folder / "layer.npz")
    report = {
        "files": [str(path.relative_to(stage)) for path in [*paths, folder / "layer.npz"]],
        "weights": list(layer.weights.shape),
        "input_scale": layer.input_scale,
    }
    if shutil.which("gcc") is None:
        return report | {"checked": False, "why": "no gcc on this machine"}
    quantized = layer.quantize_input(source.inputs[protecting.protected_input])
    got = kernel.run_c_kernel(folder, layer, quantized, keep[:, 0])
    want = kernel.accumulate(layer, quantized, keep[:, 0])
    if not np.array_equal(got, want):
        raise RuntimeError(
            f"the emitted C kernel differs from the integer reference by {np.abs(got - want).max()}"
        )
    return report | {"checked": True, "samples": len(quantized), "integer_exact": True}


def _pixel_calibration(source: Source, protecting: MacPrunePass, data: Images | None) -> str | None:
    """Real images for the pixel map: the card's task data (calibration split), else the user's inputs."""
    if protecting.keep_top == 0:
        return None
    if data is not None:
        protecting.calibration = source.preprocessor.pixels(data.train_images[:_PIXEL_CALIBRATION])
        return f"{_PIXEL_CALIBRATION} {data.name} calibration images"
    if source.synthetic_inputs:
        raise UserError(
            "mac-prune --mac-keep-top needs real images to choose the pixels always kept",
            "give --inputs with calibration images (.npz), or --mac-keep-top 0 for random masking only",
        )
    protecting.calibration = source.inputs
    return f"the {len(next(iter(source.inputs.values())))} input samples"


_PIXEL_CALIBRATION = 64


def _image_task_data(source: Source) -> Images | None:
    """The card's labelled images (read once per compile: calibration and the accuracy report)."""
    from redux_edge.datasets import images

    loaders = {"mnist": images.mnist, "fashion-mnist": images.fashion_mnist}
    if source.task_data not in loaders or source.preprocessor is None:
        return None
    return loaders[source.task_data]()


def _pixel_masked_reference(
    source: Source, dense: ir.Model, protecting: MacPrunePass, keep: np.ndarray
) -> list[np.ndarray]:
    feeds = dict(source.inputs)
    name = protecting.protected_input
    feeds[name] = (feeds[name] * keep).astype(feeds[name].dtype)
    if source.module is not None:
        from redux_edge.frontend.torch import run_module

        outputs = run_module(source.module, feeds)
    else:
        from redux_edge.analysis import in_memory_runner

        outputs = in_memory_runner(dense)(feeds)
    return [*outputs, keep]


def _protection_report(
    source: Source,
    dense: ir.Model,
    protecting: MacPrunePass,
    calibration: str | None,
    data: Images | None,
    stage: Path,
    step: Step,
) -> dict:
    """The defence's parameters, its pixel map (saved in the bundle) and what it costs on the card's task."""
    folder = stage / "mac_prune"
    folder.mkdir()
    np.save(folder / "critical.npy", protecting.critical)
    np.save(folder / "importance.npy", protecting.importance)
    report = {
        "pass": "mac-prune",
        "input": protecting.protected_input,
        "drop": protecting.drop,
        "keep_top": protecting.keep_top,
        "seed": protecting.seed,
        "critical_pixels": int(protecting.critical.sum()),
        "pixels": int(protecting.critical.size),
        "expected_keep_rate": float(
            protecting.critical.mean() + (1 - protecting.critical.mean()) * (1 - protecting.drop)
        ),
        "importance": "occlusion" if calibration else "none (random masking only)",
        "calibration": calibration,
        "files": {"critical": "mac_prune/critical.npy", "importance": "mac_prune/importance.npy"},
        # Without a seed every run draws anew, so a health check can compare only shapes.
        "random_outputs": source.output_names if protecting.seed < 0 else [],
    }
    if data is None:
        report["quality"] = {"measured": False, "why": "the model card names no image task data"}
        return report
    from redux_edge.analysis.quality import image_accuracy

    with step(f"measuring accuracy on {data.name} with and without masking"):
        report["quality"] = image_accuracy(dense, source.model, source.preprocessor, data)
    return report


def _compression_report(
    source: Source,
    dense: ir.Model,
    plan: dict,
    calibration: str | None,
    backend: Backend,
    target: Target,
    stage: Path,
    manifest: dict,
    options: dict,
    step: Step,
) -> dict:
    """What the structural passes removed and what it cost and bought: architecture before and after,
    quality on the card's real task, and latency against the dense model through the same backend."""
    from redux_edge.ir.blocks import find_structure

    report = {
        "plan": plan,
        "calibration": calibration,
        "architecture": {
            "original": find_structure(dense).summary(),
            "compiled": find_structure(source.model).summary(),
        },
    }
    if source.task_data == "rotten-tomatoes" and source.preprocessor is not None:
        from redux_edge.analysis.quality import text_quality
        from redux_edge.datasets import rotten_tomatoes

        with step("measuring quality on Rotten Tomatoes (embedding cosine, linear probe)"):
            report["quality"] = text_quality(dense, source.model, source.preprocessor, rotten_tomatoes.load())
    else:
        report["quality"] = {"measured": False, "why": "the model card names no task data"}
    if not plan:
        report["speed"] = {
            "measured": False,
            "why": "weight sparsity keeps every shape: it runs faster only on sparse tensor cores "
            "(TensorRT on Ampere/Orin), not on CPUs",
        }
        return report
    with step("timing dense vs compressed through the same backend"):
        report["speed"] = _speed_vs_dense(source, dense, backend, target, stage, manifest, options)
    return report


def _check_adapters(source: Source, adapting: RecipePass, backend: Backend, other_changes: bool) -> None:
    if source.module is None:
        raise UserError(
            "adapter packs are verified against the PyTorch model they were trained on",
            "compile the zoo model the packs were trained for",
        )
    if other_changes:
        raise UserError(
            "adapters with structural or sparsity passes in one compile are not supported",
            "adapters are trained on the dense model: compile them without pruning or sparsity",
        )
    if not adapting.merge and backend.name != "onnxruntime":
        raise UserError(
            f"swappable adapter packs need the onnxruntime backend, not {backend.name}",
            "merge one pack (merge = true, --merge-adapters) for this backend",
        )


def _run_adapted(source: Source, pack: dict) -> list[np.ndarray]:
    from redux_edge.frontend.torch import run_module
    from redux_edge.train.adapters import PackedAdapters

    return run_module(PackedAdapters(source.module, pack), source.inputs)


def _bundle_adapters(adapting: RecipePass, stage: Path) -> dict:
    """Copy the packs to ``adapters/<task>.bin``; the manifest entry listing them."""
    (stage / "adapters").mkdir()
    packs = []
    for (task, pack), path in zip(adapting.read.items(), adapting.packs, strict=True):
        copy = stage / "adapters" / f"{task}.bin"
        shutil.copyfile(path, copy)
        header = pack["header"]
        packs.append(
            {
                "task": task,
                "file": f"adapters/{task}.bin",
                "labels": header["labels"],
                "bits": header["bits"],
                "rank": header["rank"],
                "bytes": copy.stat().st_size,
                **header["metrics"],
            }
        )
    return {
        "merged": adapting.merge,
        "default": packs[0]["task"],
        "initializers": adapting.names,
        "packs": packs,
    }


def _verify_adapter_swaps(
    source: Source, adapting: RecipePass, stage: Path, manifest: dict, tolerance: Tolerance
) -> None:
    """Open the artifact with each pack swapped in, as a device does, and compare with PyTorch."""
    for entry in manifest["adapters"]["packs"]:
        outputs = runner.BundleSession(stage, adapter=entry["task"]).run(source.inputs)
        entry["verify"] = compare(
            _run_adapted(source, adapting.read[entry["task"]]), outputs, source.output_names
        )
        require_match(entry["verify"], tolerance, f"the artifact with the adapter pack '{entry['task']}'")


def _pack_sparse_weights(stage: Path, masking: list[WeightMaskPass]) -> dict | None:
    """Store the bundle's N:M weights packed (kept values and positions); the manifest's index."""
    from redux_edge.ir.nm import parse_pattern
    from redux_edge.packing import pack_bundle_models

    patterns = {p.pattern for p in masking if p.masks}
    if len(patterns) != 1:
        return None
    return pack_bundle_models(stage, *parse_pattern(patterns.pop()))


def _sparsity_report(masking: list[WeightMaskPass], storage: dict | None, target: Target) -> dict:
    report = [entry for p in masking for entry in p.report]
    return {
        "pattern": masking[-1].pattern,
        # Without sparse tensor cores the weights run dense: the gain is the bundle's size only.
        "target_has_sparse_tensor_cores": bool(target.sparse_tensor_cores),
        "sparsified": sum(entry["sparsified"] for entry in report),
        "weights": len(report),
        "layers": report,
        "storage": {k: v for k, v in (storage or {}).items() if k != "packed_files"},
    }


_SPEED_BLOCKS, _SPEED_CALLS = 4, 10


def _speed_vs_dense(
    source: Source,
    dense: ir.Model,
    backend: Backend,
    target: Target,
    stage: Path,
    manifest: dict,
    options: dict,
) -> dict:
    """p50 latency of the dense and the compressed artifact in one process, same inputs and threads;
    text models at batch 1, sequence 128."""
    runs, why = backend.can_run_here(target)
    if not runs or backend.static_shapes:
        why = why if not runs else "static-shape artifact: compare with tools/bench.py"
        return {"measured": False, "why": why}
    shapes = {}
    if source.preprocessor is not None and source.preprocessor.kind == "text":
        shapes = {name: [1, 128] for name in source.inputs}
    feeds = _fit_inputs({name: array[:1] for name, array in source.inputs.items()}, shapes)
    entry = manifest["backend"]
    threads = entry["session"]["threads"]
    with tempfile.TemporaryDirectory() as scratch:
        ir.save(dense, str(Path(scratch) / "model.onnx"))
        dense_entry = backend.lower(Path(scratch) / "model.onnx", target, Path(scratch) / "artifact", options)
        sessions = {
            "dense": runner.open_artifact(Path(scratch), dense_entry, threads, source.output_names),
            "compressed": runner.open_artifact(
                stage, entry, threads, source.output_names, manifest.get("storage")
            ),
        }
        seconds = {name: [] for name in sessions}
        # Blocks of consecutive calls in alternating order, as tools/bench.py measures: one by one
        # interleaving would let each ONNX Runtime session's spinning threads slow the other's calls.
        for block in range(_SPEED_BLOCKS):
            for name in list(sessions)[:: 1 if block % 2 == 0 else -1]:
                run_once = sessions[name]
                run_once(feeds)
                for _ in range(_SPEED_CALLS):
                    started = time.perf_counter()
                    run_once(feeds)
                    seconds[name].append(time.perf_counter() - started)
    p50 = {name: float(np.median(values) * 1000.0) for name, values in seconds.items()}
    return {
        "shapes": {name: list(array.shape) for name, array in feeds.items()},
        "threads": threads or "all cores",
        "calls": _SPEED_BLOCKS * _SPEED_CALLS,
        "dense_p50_ms": p50["dense"],
        "compressed_p50_ms": p50["compressed"],
        "speedup": p50["dense"] / p50["compressed"],
    }


def _write_runner(stage: Path, source: Source, sample_count: int) -> None:
    (stage / "runner").mkdir()
    shutil.copyfile(runner.__file__, stage / "runner" / "run.py")
    (stage / "sample").mkdir()
    np.savez(stage / "sample" / "inputs.npz", **{k: v[:sample_count] for k, v in source.inputs.items()})
    if source.preprocessor is not None:
        for relative, path in source.preprocessor.assets().items():
            (stage / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, stage / relative)


def _manifest(
    source: Source,
    target: Target,
    backend_entry: dict,
    recipe: Recipe,
    pass_log: list[dict],
    original_cost: dict,
    tolerance: Tolerance,
    ir_report: dict,
) -> dict:
    shapes = {k: v.shape for k, v in source.inputs.items()}
    outputs = [
        {
            "name": value.name,
            "dtype": value.dtype.name,
            "shape": [d if isinstance(d, int) else str(d) for d in value.shape or ()],
        }
        for value in source.model.graph.outputs
    ]
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": {"name": source.name, **source.origin, "architecture": source.architecture},
        "target": target.to_json(),
        "backend": backend_entry,
        "recipe": recipe.to_json(),
        "passes": pass_log,
        "inputs": _with_static_shapes(input_specs(source.model), backend_entry.get("static_shapes")),
        "outputs": outputs,
        "preprocess": source.preprocessor.to_manifest() if source.preprocessor else None,
        "metrics": {
            "at_shapes": {k: list(v) for k, v in shapes.items()},
            "original": original_cost,
            "compiled": model_cost(source.model, shapes),
            **_structure(source.model),
        },
        "verify": {
            "reference": source.reference_kind,
            "samples": int(next(iter(source.inputs.values())).shape[0]) if source.inputs else 0,
            "tolerance": tolerance.to_json(),
            "ir": ir_report,
        },
        "toolchain": {
            "python": platform.python_version(),
            **{name: metadata.version(name) for name in _TOOLCHAIN},
        },
    }


def _structure(model: ir.Model) -> dict:
    """Heads and feed-forward widths per layer, for transformer models."""
    from redux_edge.ir.blocks import find_structure

    found = find_structure(model)
    return {"structure": found.summary()} if found.attention else {}


def _open(bundle_path: Path) -> tuple[bundles.Bundle, Backend]:
    """A bundle that is intact and runnable on this machine, with its backend."""
    from redux_edge.backends.base import available_backends

    bundle = bundles.load_bundle(bundle_path)
    if problems := bundle.verify_files():
        raise UserError(f"bundle {bundle_path} is damaged: {problems[0]}", "recompile or re-copy the bundle")
    name = bundle.manifest["backend"]["name"]
    backend = available_backends().get(name)
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
    except runner.InputError as exc:
        raise UserError(
            f"wrong input: {exc}", "match the model's input signature (see `redux-edge inspect`)"
        ) from exc


def run(
    bundle_path: Path, inputs_file: Path | None = None, adapter: str | None = None
) -> tuple[dict[str, np.ndarray], dict]:
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
            backend.load(bundle.path)
            if adapter is None
            else runner.BundleSession(bundle.path, adapter=adapter)
        )
        outputs = session.run(feeds)
    names = [spec["name"] for spec in bundle.manifest["outputs"]]
    return dict(zip(names, outputs, strict=True)), bundle.manifest


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
    """Every target with, per backend it lists, whether that backend can build and run for it here."""
    from redux_edge.backends.base import available_backends
    from redux_edge.targets import available_targets

    known = available_backends()
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
                }
            )
        rows.append({**target.to_json(), "description": target.description, "backend_status": statuses})
    return rows


def inspect(bundle_path: Path) -> tuple[dict, list[str]]:
    bundle = bundles.load_bundle(bundle_path)
    return bundle.manifest, bundle.verify_files()
