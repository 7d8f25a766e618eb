"""TensorRT for Jetson: a TensorRT-ready ONNX, a static support report, and the engine build for the device.

TensorRT engines are specific to the GPU, the TensorRT release and the precision, so they are built on
the device (NVIDIA's deployment guidance for Jetson); what is made here is everything that build needs.
The ONNX is given static shapes; operators the target's parser rejects that the ONNX spec defines by
older ones (LayerNormalization, Gelu: ``ir/decompose.py``) are rewritten as those; the model is brought
to the newest opset that parser reads (``ir/opset.py``), then every node is checked against
onnx-tensorrt's operator support matrix for that release (``tensorrt_support.toml``): a node still
unsupported fails the compile. The build is a ``trtexec`` command line (``--fp16``, ``--sparsity=enable``
for 2:4 bundles, ``--useDLACore`` with ``--allowGPUFallback`` on targets with DLA) that the bundle's
runner runs on the device
(``runner/run.py --build-engine``), keeping the log and failing when 2:4 was asked for and no layer took
a sparse tactic. Where ``tensorrt`` and a GPU are present, the same runner call builds it here.
"""

from __future__ import annotations

import json
import logging
import shutil
import tomllib
from pathlib import Path
from typing import ClassVar

import click
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import onnxscript.optimizer

from redux_edge.backends.base import Backend, Emulation, quantized_onnx_operators
from redux_edge.errors import UserError
from redux_edge.files import file_digest
from redux_edge.interfaces import Flag
from redux_edge.ir.decompose import decompose
from redux_edge.ir.opset import convert_opset
from redux_edge.runtime.backend_tensorrt import build_engine
from redux_edge.runtime.packed import add_packed_weights
from redux_edge.targets import Target, load_target

__all__ = ["TensorRtBackend", "support_report"]

logger = logging.getLogger(__name__)

_SUPPORT = tomllib.loads(Path(__file__).with_name("tensorrt_support.toml").read_text())
_PRECISION_FLAGS = {"fp16": ["--fp16"], "fp32": []}


def _board_options(base: list[str], board: Target, sparsity: bool, dla_core: int | None) -> dict:
    """The engine build of a family bundle on one member board, and the options it resolved to."""
    sparse = sparsity and board.sparse_tensor_cores
    dla = dla_core if dla_core is not None and dla_core < board.dla_cores else None
    return {"argv": [*base, *_option_flags(sparse, dla)], "sparsity": sparse, "dla_core": dla}


def _option_flags(sparsity: bool, dla_core: int | None) -> list[str]:
    """trtexec's flags for 2:4 sparse tactics and a DLA core (GPU fallback for layers it lacks)."""
    flags = ["--sparsity=enable"] if sparsity else []
    return flags + ([f"--useDLACore={dla_core}", "--allowGPUFallback"] if dla_core is not None else [])


def _release_line(version: str) -> str:
    """The support table for a TensorRT version: its own line, or the newest older one."""
    as_tuple = tuple(int(part) for part in version.split("."))
    known = sorted(_SUPPORT, key=lambda line: tuple(int(p) for p in line.split(".")))
    older = [line for line in known if tuple(int(p) for p in line.split(".")) <= as_tuple]
    if not older:
        raise UserError(f"TensorRT {version} is older than any release redux-edge knows", f"known: {known}")
    return older[-1]


def support_report(model: ir.Model, tensorrt_version: str) -> dict:
    """Nodes that TensorRT's ONNX parser of ``tensorrt_version`` rejects, with the reason for each."""
    import onnx.defs

    table = _SUPPORT[_release_line(tensorrt_version)]
    opset = model.opset_imports.get("", 0)
    unsupported = []
    if opset > table["max_opset"]:
        unsupported.append(
            {"node": "(model)", "op": f"opset {opset}", "why": f"needs opset > {table['max_opset']}"}
        )
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx"):
            why = f"custom domain {node.domain}"
        elif node.op_type in table["unsupported"]:
            why = "not implemented by the parser"
        elif not onnx.defs.has(node.op_type, min(opset, table["max_opset"]), ""):
            why = f"needs opset > {table['max_opset']}"
        else:
            continue
        unsupported.append({"node": node.name or node.op_type, "op": node.op_type, "why": why})
    return {
        "tensorrt": tensorrt_version,
        "opset": opset,
        "max_opset": table["max_opset"],
        "nodes": sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph)),
        "unsupported": unsupported,
    }


def _local_engine_build() -> bool:
    """TensorRT, trtexec and an NVIDIA GPU are all here, so the engine can be built as on a device."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return shutil.which("trtexec") is not None and shutil.which("nvidia-smi") is not None


def _parser_ready(model_file: Path, shapes: dict, version: str) -> tuple[ir.Model, dict]:
    """The model at static shapes as TensorRT ``version``'s parser reads it, and its support report:
    operators it rejects become their definitions (the older opsets lack them), then the opset is lowered."""
    model = ir.load(str(model_file))
    for value in model.graph.inputs:
        value.shape = ir.Shape(shapes[value.name])
    onnxscript.optimizer.optimize(model)
    decomposed = decompose(model, {entry["op"] for entry in support_report(model, version)["unsupported"]})
    rewritten = convert_opset(model, _SUPPORT[_release_line(version)]["max_opset"])
    onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
    return model, support_report(model, version) | {"decomposed": decomposed, "opset_rewritten": rewritten}


def _other_boards(model_file: Path, shapes: dict, target: Target, otherwise: str) -> str:
    """The hint of a refusal: the Jetson boards whose TensorRT parses this model, if any."""
    takers = []
    for board in map(load_target, load_target("jetson").members):
        if board.name == target.name or board.runtime["tensorrt"] == target.runtime["tensorrt"]:
            continue
        try:
            _, report = _parser_ready(model_file, shapes, board.runtime["tensorrt"])
        except UserError:
            continue
        if not report["unsupported"]:
            takers.append(f"{board.name} (TensorRT {board.runtime['tensorrt']})")
    if not takers:
        return otherwise
    return f"{', '.join(takers)} take this model: compile for that target; or {otherwise}"


class TensorRtBackend(Backend):
    name = "tensorrt"
    precisions = ("fp16", "fp32")
    default_precision = "fp16"
    # INT8 as explicit quantization: the quantize pass's QDQ graph, built with --int8 (and --fp16 for
    # the layers left in float, TensorRT's advice for QDQ networks).
    quantized: ClassVar[dict[str, str]] = {"int8": "integer", "fp16": "runtime"}
    symmetric_int8 = True
    static_shapes = True
    builds_on_device = True
    device_runtime = "trtexec"
    device_modules: ClassVar[dict[str, str]] = {"tensorrt": "tensorrt"}
    flags = (
        Flag(
            "--dla-core",
            "TensorRT: run on this DLA core, with GPU fallback.",
            "dla_core",
            click.IntRange(min=0),
        ),
    )

    def can_build_here(self) -> tuple[bool, str]:
        return True, "writes the TensorRT-ready ONNX and the engine build; the engine is built on the device"

    def check_target(self, target: Target) -> None:
        if target.gpu_compute_capability is None:
            raise UserError(
                f"TensorRT needs an NVIDIA GPU, and target {target.name} has none",
                "choose a jetson-* target, or a CPU backend: --backend onnxruntime, openvino or tvm",
            )
        if "tensorrt" not in target.runtime:
            raise UserError(f"target {target.name} names no TensorRT version", "add tensorrt under [runtime]")

    def can_run_here(self, target: Target) -> tuple[bool, str]:
        # The runner runs engines through trtexec, on the device whose GPU the engine was built for.
        if _local_engine_build():
            return False, "engine built here with trtexec; it runs on the device"
        return False, "no TensorRT here; engine built on the device"

    def lower(self, model_file: Path, target: Target, artifact_dir: Path, options: dict) -> dict:
        version = target.runtime["tensorrt"]
        try:
            model, report = _parser_ready(model_file, options["shapes"], version)
        except UserError as exc:
            raise UserError(
                exc.message, _other_boards(model_file, options["shapes"], target, exc.hint)
            ) from exc
        if report["unsupported"]:
            logger.debug("nodes TensorRT %s cannot parse: %s", version, report["unsupported"])
            first = report["unsupported"][0]
            raise UserError(
                f"TensorRT {version} cannot parse {len(report['unsupported'])} node(s) of this model, "
                f"e.g. {first['op']} ({first['node']}): {first['why']}",
                _other_boards(
                    model_file, options["shapes"], target, "choose another backend or change the model"
                ),
            )
        artifact_dir.mkdir(parents=True, exist_ok=True)
        onnx_file = artifact_dir / "model.trt.onnx"
        ir.save(model, str(onnx_file))
        (artifact_dir / "support.json").write_text(json.dumps(report, indent=2) + "\n")
        sparsity = options.get("sparsity") == "2:4"
        int8 = options.get("quantized") == "int8"
        base = [
            "trtexec",
            "--onnx=artifact/model.trt.onnx",
            "--saveEngine={engine}",
            "--verbose",
            *_PRECISION_FLAGS[options["precision"]],
            *(["--int8"] if int8 else []),
        ]
        dla_core = options.get("dla_core")
        members = [load_target(name) for name in target.members]
        if dla_core is not None and not any(0 <= dla_core < t.dla_cores for t in members or [target]):
            cores = max(t.dla_cores for t in members or [target])
            where = " on its largest board" if members else ""
            raise UserError(f"target {target.name} has {cores} DLA cores{where}", "drop --dla-core")
        # A family bundle's options are resolved per board: sparse tactics where it has sparse tensor
        # cores, the DLA core where it has one; elsewhere the same model is built dense on the GPU.
        resolved = {t.name: _board_options(base, t, sparsity, dla_core) for t in members}
        argv = base if members else [*base, *_option_flags(sparsity, dla_core)]
        suffix = "".join(
            [
                f"-{options['precision']}",
                "-int8" if int8 else "",
                "-sparse" if sparsity else "",
                f"-dla{dla_core}" if dla_core is not None else "",
            ]
        )
        # Each board builds its own engine; the agent's cache key adds its TensorRT version and GPU.
        gpu = target.name if members else f"sm{str(target.gpu_compute_capability).replace('.', '')}"
        return {
            "name": self.name,
            "version": version,
            "artifact": "artifact/model.trt.onnx",
            "precision": options["precision"],
            "support": {
                k: report[k]
                for k in ("tensorrt", "opset", "max_opset", "nodes", "decomposed", "opset_rewritten")
            }
            | {"unsupported": 0},
            "engine_build": {
                "argv": argv,
                "engine_dir": "engines",
                "engine_name": f"{file_digest(onnx_file)[:12]}-{gpu}{suffix}",
                "sparsity": sparsity and not members,
                "dla_core": dla_core if not members else None,
                **({"members": resolved} if members else {}),
                "where": "on the device, by `python3 runner/run.py --build-engine` (flash runs it)",
            },
            "session": {"threads": 0, "input_order": [v.name for v in model.graph.inputs]},
            "static_shapes": {name: list(shape) for name, shape in options["shapes"].items()},
        }

    def quantized_operators(self, stage: Path, entry: dict) -> dict[str, int]:
        return quantized_onnx_operators(stage / entry["artifact"])

    def emulate(self, stage: Path, target: Target) -> Emulation:
        """The TensorRT-ready ONNX through ONNX Runtime: checks the opset conversion, not TensorRT."""
        import onnxruntime as ort

        manifest = json.loads((stage / "manifest.json").read_text())
        if _local_engine_build():
            build_engine(stage)
        options = ort.SessionOptions()
        buffers = add_packed_weights(
            options, stage, manifest["backend"]["artifact"], manifest.get("storage", {})
        )
        session = ort.InferenceSession(
            str(stage / manifest["backend"]["artifact"]), options, providers=["CPUExecutionProvider"]
        )
        names = [output["name"] for output in manifest["outputs"]]

        def execute(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            # The packed weights' memory, which ONNX Runtime reads, lives as long as this function.
            assert buffers is not None
            return session.run(names, feeds)

        return (
            execute,
            "TensorRT-ready ONNX run by ONNX Runtime here; the engine is built and checked on the device",
        )
