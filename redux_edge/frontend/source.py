"""A model source: a model in the IR with the real inputs it is verified on, and its reference runner.

Every kind of model a user can give (a zoo entry or PyTorch module, an ONNX file; a Hugging Face
directory is one more subclass) is a ``Source``: the IR the passes work on, the inputs, the reference
outputs of the original, the preprocessing and task data a quality report and calibration read, and
``reference(changes, dense)``: the original computation with the passes' changes applied, against which
the compiled model is checked exactly. A source with a PyTorch module applies the changes to the module
(hooks, masked parameters, adapters); otherwise, or when a change cannot be expressed on the module, they
are applied to the dense ONNX graph, run by ONNX Runtime with graph optimisations off.
"""

from __future__ import annotations

import contextlib
import functools
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from redux_edge.datasets import images, rotten_tomatoes, user
from redux_edge.errors import UserError
from redux_edge.interfaces import Feeds
from redux_edge.ir.surgery import copy_model
from redux_edge.preprocess import ImagePreprocessor, Preprocessor, TextPreprocessor
from redux_edge.runtime.session import InputError, check_inputs, one_line

if TYPE_CHECKING:
    from redux_edge.datasets.images import Images
    from redux_edge.datasets.rotten_tomatoes import Sentiment
    from redux_edge.datasets.user import UserData
    from redux_edge.passes.contract import ReferenceChange

__all__ = [
    "EVAL_TASKS",
    "Calibration",
    "Reference",
    "Source",
    "check_sample_size",
    "fit_inputs",
    "run_onnx_file",
]

EVAL_TASKS = ("auto", "classification", "embedding")


@dataclass
class Calibration:
    """Real inputs a pass chooses by, and what they are (for the manifest)."""

    feeds: Feeds
    described: str
    synthetic: bool = False


@dataclass
class Reference:
    """What a compiled model's run must equal: ``expected(run_outputs)`` for the verification inputs."""

    kind: str
    run: Callable[[Feeds], list[np.ndarray]]
    inputs: Feeds
    changes: list[ReferenceChange] = field(default_factory=list)
    _fixed: list[np.ndarray] | None = field(default=None, init=False, repr=False)

    @property
    def per_run(self) -> bool:
        return any(change.per_run_outputs for change in self.changes)

    def warm(self) -> None:
        """Compute the reference outputs now, where they do not depend on a run."""
        if not self.per_run:
            self._fixed_outputs()

    def _fixed_outputs(self) -> list[np.ndarray]:
        if self._fixed is None:
            self._fixed = self.run(self.inputs)
        return self._fixed

    def expected(self, run_outputs: list[np.ndarray]) -> list[np.ndarray]:
        if not self.per_run:
            return self._fixed_outputs()
        feeds, extra = self.inputs, []
        for change in self.changes:
            feeds, added = change.per_run(feeds, run_outputs)
            extra += added
        return [*self.run(feeds), *extra]


@dataclass
class Source:
    """A model in the IR with the inputs it is verified on and the outputs it must reproduce."""

    name: str
    origin: dict
    model: ir.Model
    inputs: Feeds
    reference_outputs: list[np.ndarray]
    reference_kind: str
    preprocessor: Preprocessor | None = None
    architecture: dict = field(default_factory=dict)
    task_data: str | None = None
    synthetic_inputs: bool = False
    # What made-up inputs hold, one phrase per input (frontend/made_up.py), for the report.
    made_up: list[str] = field(default_factory=list)
    # The PyTorch module of a source that has one (what learned masks and adapters are trained on).
    module: Any = None
    # The user's --eval-data and --calibration-data, read by ``use_data``.
    eval_data: UserData | None = None
    calibration_data: UserData | None = None
    # What the first output is, as the user says (``--eval-task``): "classification", "embedding" or
    # "auto" (the checkpoint's or the zoo card's word).
    eval_task: str = "auto"
    _calibrations: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def classifier(self) -> bool:
        """Whether the first output is class logits: the user says so (``--eval-task``), a classification
        checkpoint, or an image model with one score vector per sample (the zoo's CNN)."""
        if self.eval_task != "auto":
            return self.eval_task == "classification"
        if self.origin.get("output") == "logits" or self.architecture.get("labels"):
            return True
        return isinstance(self.preprocessor, ImagePreprocessor) and self.reference_outputs[0].ndim == 2

    def use_data(
        self, eval_file: Path | None, calibration_file: Path | None, eval_task: str = "auto"
    ) -> None:
        """Read the user's evaluation (labelled) and calibration files now: a bad file fails before any
        work is done. ``eval_task`` says what the first output is (see ``eval_task``)."""
        if eval_task not in EVAL_TASKS:
            raise UserError(
                f"unknown evaluation task {eval_task!r}", f"choose one of {', '.join(EVAL_TASKS)}"
            )
        if eval_task == "classification" and self.reference_outputs[0].ndim != 2:
            raise UserError(
                f"--eval-task classification reads the first output as logits [batch, classes], but it is "
                f"{list(self.reference_outputs[0].shape)}",
                "export the classifier's logits first, or use --eval-task embedding",
            )
        self.eval_task = eval_task
        if eval_file is not None:
            self.eval_data = self._read_data(eval_file, "--eval-data", labels_required=True)
        if calibration_file is not None:
            self.calibration_data = self._read_data(calibration_file, "--calibration-data", False)

    def _read_data(self, path: Path, option: str, labels_required: bool) -> UserData:

        if not path.exists():
            raise UserError(
                f"{option} {path} does not exist", "give a CSV/JSONL file, an image folder or an .npz"
            )
        classes = self.architecture.get("labels")
        if isinstance(self.preprocessor, TextPreprocessor):
            data = user.read_texts(path, labels_required, classes)
        elif isinstance(self.preprocessor, ImagePreprocessor):
            data = user.read_images(path, self.preprocessor, labels_required, classes)
        else:
            data = user.read_feeds(path, [str(v.name) for v in self.model.graph.inputs], labels_required)
        if self.classifier and data.labels is not None:
            classes_out = int(self.reference_outputs[0].shape[-1])
            if (bad := data.labels[(data.labels < 0) | (data.labels >= classes_out)]).size:
                raise UserError(
                    f"{option} {path}: label {int(bad[0])} is not a class of the model "
                    f"({classes_out} logits)",
                    "relabel the data with the model's class indices",
                )
        return data

    def feeds_of(self, data: UserData, rows: slice | np.ndarray) -> Feeds:
        """The model's inputs for some rows of the user's data."""
        if data.texts is not None and isinstance(self.preprocessor, TextPreprocessor):
            return self.preprocessor([data.texts[i] for i in np.arange(len(data.texts))[rows]])
        if data.images is not None and isinstance(self.preprocessor, ImagePreprocessor):
            return self.preprocessor.pixels(data.images[rows])
        assert data.feeds is not None, "user data holds texts, images or feeds"
        return {name: array[rows] for name, array in data.feeds.items()}

    @property
    def output_names(self) -> list[str]:
        return [str(value.name) for value in self.model.graph.outputs]

    def reference(self, changes: list[ReferenceChange], dense: ir.Model | None) -> Reference:
        """The original with ``changes`` applied, on the module where it can express them all, else on
        the dense graph (``dense``: the IR before the first changing pass)."""
        described = "".join(change.describes for change in changes)
        kind = self.reference_kind + described
        if not changes:
            return Reference(kind, lambda _: self.reference_outputs, self.inputs)
        if self.module is not None and all(c.applies_to_module(self.architecture) for c in changes):
            return Reference(kind, functools.partial(self._run_module, changes), self.inputs, changes)
        if dense is None:
            raise RuntimeError("a changed reference on the graph needs the dense model")
        if self.module is not None:
            # The module cannot express a change (a plan outside BERT's module layout): say what ran.
            kind = "onnxruntime on the IR before the passes" + described
        return Reference(kind, _graph_runner(dense, changes), self.inputs, changes)

    def _run_module(self, changes: list[ReferenceChange], feeds: Feeds) -> list[np.ndarray]:
        from redux_edge.frontend.module_run import run_module  # torch, loaded when a module runs

        with contextlib.ExitStack() as stack:
            module = self.module
            for change in changes:
                module = change.on_module(module, self.architecture, stack)
            return run_module(module, feeds)

    def calibration(self, count: int | None = None) -> Calibration:
        """Real inputs for passes that choose by data: the card's task data (its training split, never
        the test data the quality report uses), else the inputs the compile verifies on."""
        if count not in self._calibrations:
            self._calibrations[count] = self._calibration(count)
        return self._calibrations[count]

    def _calibration(self, count: int | None) -> Calibration:
        if self.calibration_data is not None:
            data = self.calibration_data
            return Calibration(
                self.feeds_of(data, slice(0, count)),
                f"{min(count or len(data), len(data))} of the {data.described}",
            )
        if self.task_data == "rotten-tomatoes" and isinstance(self.preprocessor, TextPreprocessor):
            chosen = (
                rotten_tomatoes.calibration_texts(count) if count else rotten_tomatoes.calibration_texts()
            )
            return Calibration(self.preprocessor(chosen), f"{len(chosen)} Rotten Tomatoes training sentences")
        images = self.image_task
        if (
            images is not None
            and len(images.train_images)
            and isinstance(self.preprocessor, ImagePreprocessor)
        ):
            chosen_images = images.train_images[:count]
            return Calibration(
                self.preprocessor.pixels(chosen_images),
                f"{len(chosen_images)} {images.name} calibration images",
            )
        samples = next(iter(self.inputs.values())).shape[0]
        return Calibration(self.inputs, f"the {samples} verification samples", self.synthetic_inputs)

    @functools.cached_property
    def text_task(self) -> Sentiment | None:
        """The card's labelled sentences, for the quality report; None when it names none."""
        if self.task_data != "rotten-tomatoes" or self.preprocessor is None:
            return None

        return rotten_tomatoes.load()

    @functools.cached_property
    def image_task(self) -> Images | None:
        """The user's labelled images (--eval-data), else the card's (read once: calibration and the
        accuracy report)."""

        data = self.eval_data
        if data is not None and data.images is not None and data.labels is not None:
            empty = data.images[:0]
            return images.Images(data.described, empty, data.labels[:0], data.images, data.labels)
        loaders = {"mnist": images.mnist, "fashion-mnist": images.fashion_mnist}
        if self.task_data not in loaders or self.preprocessor is None:
            return None
        return loaders[self.task_data]()


def _graph_runner(dense: ir.Model, changes: list[ReferenceChange]) -> Callable[[Feeds], list[np.ndarray]]:

    changed = copy_model(dense)
    for change in changes:
        change.on_graph(changed)
    # The file is read into the session; the folder is not needed once it is open.
    with tempfile.TemporaryDirectory(prefix="redux-edge-reference-") as scratch:
        path = Path(scratch) / "reference.onnx"
        ir.save(changed, str(path))
        session = plain_session(path)
    return lambda feeds: session.run(None, feeds)


def plain_session(path: Path, what: str | None = None) -> Any:
    """An ONNX Runtime session with graph optimisations off: the plain semantics of the file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with _runtime_errors(f"load {what or path.name}"):
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx_file(path: Path, inputs: Feeds, what: str | None = None) -> list[np.ndarray]:
    """Outputs of an ONNX file under ONNX Runtime with graph optimisations off; ``what`` names the model
    in errors when ``path`` is a scratch copy the user never saw."""
    session = plain_session(path, what)
    with _runtime_errors(f"run {what or path.name} on the sample inputs"):
        return session.run(None, inputs)


@contextlib.contextmanager
def _runtime_errors(action: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # ORT raises its own pybind types (Fail, NotImplemented, InvalidArgument)
        raise UserError(
            f"ONNX Runtime cannot {action}: {one_line(exc)}",
            "check that the model runs in ONNX Runtime with inputs of its signature, or give --inputs FILE",
        ) from exc


# The sample inputs a compile verifies with are held in memory several times over (reference, IR,
# artifact); an input larger than this is a mistake in --shapes or the model's signature, not a sample.
MAX_SAMPLE_INPUT_BYTES = 1 << 30


def check_sample_size(name: str, shape: tuple[int, ...], dtype: np.typing.DTypeLike) -> None:
    """Refuse, before allocating it, a sample input with a dimension below 1 or too large to hold."""
    if any(size < 1 for size in shape):
        raise UserError(
            f"input '{name}' would have shape {list(shape)}: every dimension must be at least 1",
            f"give its shape: --shapes {name}:" + "x".join(str(max(size, 1)) for size in shape),
        )
    size = math.prod(shape) * np.dtype(dtype).itemsize
    if size > MAX_SAMPLE_INPUT_BYTES:
        raise UserError(
            f"input '{name}' at shape {list(shape)} would take {size / 2**30:,.1f} GiB",
            f"give a smaller shape (--shapes {name}:...); sample inputs are limited to "
            f"{MAX_SAMPLE_INPUT_BYTES >> 30} GiB each",
        )


def fit_inputs(
    inputs: Feeds, shapes: dict[str, list[int]], batch_axes: dict[str, int | None] | None = None
) -> Feeds:
    """Real inputs brought to the shapes asked for. Along an input's batch axis (``batch_axes``, else axis
    0) every sample is kept, cycled up to a whole number of batches (a static-batch artifact is verified
    chunk by chunk); other axes are zero-padded or cut (a zero token id is BERT's [PAD] and a zero mask
    hides it, so text stays valid)."""
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
        check_sample_size(name, tuple(shape), array.dtype)
        batch = (batch_axes or {}).get(name, 0) if shape else None
        if batch is not None:
            batches = -(-array.shape[batch] // shape[batch])
            array = np.take(array, np.arange(batches * shape[batch]) % array.shape[batch], axis=batch)
        for axis, size in enumerate(shape):
            if axis == batch:
                continue
            if array.shape[axis] > size:
                array = np.take(array, range(size), axis=axis)
            elif array.shape[axis] < size:
                padding = [(0, 0)] * array.ndim
                padding[axis] = (0, size - array.shape[axis])
                array = np.pad(array, padding)
        fitted[name] = array
    return fitted


def input_specs(model: ir.Model) -> list[dict]:
    specs = []
    for value in model.graph.inputs:
        # A dimension without a name of its own ("?", a negative size) is free: it agrees with nothing.
        shape = [
            dim
            if isinstance(dim, int) and dim >= 0
            else (
                str(dim)
                if not isinstance(dim, int) and dim.value not in (None, "?")
                else f"{value.name}_{axis}"
            )
            for axis, dim in enumerate(value.shape or ())
        ]
        specs.append(
            {"name": value.name, "dtype": value.dtype.name if value.dtype else "FLOAT", "shape": shape}
        )
    return specs


def _spec_dim(dim: int | ir.SymbolicDim, anonymous: str) -> int | str:
    """A size, a shared name, or for a dimension without a name of its own ("?", no name, a negative size)
    a name of its own, which agrees with nothing else."""
    if isinstance(dim, int):
        return dim if dim >= 0 else anonymous
    return str(dim) if dim.value not in (None, "?") else anonymous


def check_feeds(model: ir.Model, inputs: Feeds) -> None:

    try:
        check_inputs(input_specs(model), inputs)
    except InputError as exc:
        raise UserError(
            f"wrong input: {exc}", "match the model's input signature (see `redux-edge inspect`)"
        ) from exc
