"""Apache TVM (Relax) for x86-64 and aarch64 CPUs, with optional MetaSchedule tuning.

Follows TVM's Relax flow: the ONNX importer (``tvm.relax.frontend.onnx.from_onnx``, which needs static
input shapes, so they are fixed on a copy of the IR and the onnxscript optimizer folds what becomes
constant), ``tvm.compile`` with the default Relax pipeline for an LLVM target built from the target file
(``-mtriple``, ``-mcpu``, ``-mattr``), and ``export_library`` into a shared object, cross-compiled for
aarch64 with Debian's ``aarch64-linux-gnu-g++``. With ``tune`` > 0, MetaSchedule searches schedules with
that trial budget (measured locally, or on a board through TVM's RPC tracker) into a JSON database that
is kept per target and reused by later compiles, tuned or not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import click
import numpy as np
import onnx_ir as ir
import onnxscript.optimizer

from redux_edge.backends.base import CpuBackend, Emulation
from redux_edge.errors import UserError
from redux_edge.interfaces import Flag
from redux_edge.targets import Target

__all__ = ["AARCH64_RUNTIME_DIR", "TUNING_ROOT", "TvmBackend", "tvm_target"]


TUNING_ROOT = Path(os.environ.get("REDUX_EDGE_CACHE", Path.home() / ".cache" / "redux-edge")) / "tvm-tuning"
# The aarch64 build of the TVM runtime, from PyPI's aarch64 wheels (tools/fetch_tvm_aarch64_runtime.py).
AARCH64_RUNTIME_DIR = Path(sys.prefix) / "share" / "redux-edge" / "tvm-aarch64"
_CROSS_COMPILER = "aarch64-linux-gnu-g++"
_AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")
_HOST_SOURCE = Path(__file__).with_name("native") / "tvm_host.cc"
_EMULATION_TIMEOUT_S = 600
_EVOLUTIONARY_MIN_TRIALS = 256
_WORKER_TIMEOUT_S = 900
# Task-name fragments of the compute-bound operators a small tuning budget is spent on.
_COMPUTE_BOUND = ("matmul", "conv")
_SMALL_BUDGET_TRIALS_PER_TASK = 4
_ELF_MACHINES = {62: "x86-64", 183: "AArch64"}
_INSTALL_TVM = "pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1"


def tvm_target(target: Target) -> dict:
    """The LLVM target of TVM 0.27 (a JSON dict) for a redux-edge target."""
    from tvm.target import codegen

    if target.cpu == "native":
        return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}
    spec: dict[str, str | list[str]] = {"kind": "llvm", "mtriple": target.triple, "mcpu": target.cpu}
    if target.cpu_features:
        spec["mattr"] = [f"+{feature}" for feature in target.cpu_features]
    return spec


class TvmBackend(CpuBackend):
    name = "tvm"
    # Relax's ONNX importer reads QuantizeLinear/DequantizeLinear and the dynamic INT8 operators, and its
    # default pipeline computes the dequantized values in fp32.
    quantized: ClassVar[dict[str, str]] = {"int8": "dequantized", "int8-dynamic": "dequantized"}
    static_shapes = True
    device_runtime = "tvm"
    device_modules: ClassVar[dict[str, str]] = {"tvm": "apache-tvm"}
    flags = (
        Flag(
            "--tune",
            "TVM: MetaSchedule trial budget (0 = reuse the database only).",
            "tune",
            click.IntRange(min=0),
        ),
        Flag("--tuning-db", "TVM: tuning database directory.", "tuning_db", type="path"),
        Flag(
            "--rpc-tracker", "TVM: tune on a board through this RPC tracker.", "tracker", metavar="HOST:PORT"
        ),
        Flag("--rpc-key", "TVM: the board's key at the RPC tracker.", "key"),
    )

    def options_from_flags(self, values: Mapping[str, Any]) -> dict:
        options = super().options_from_flags(values)
        tracker, key = options.pop("tracker", None), options.pop("key", None)
        if (tracker is None) != (key is None):
            raise UserError(
                "--rpc-tracker and --rpc-key go together", "give both, or neither to tune locally"
            )
        if tracker:
            options["rpc"] = {"tracker": tracker, "key": key}
        return options

    def can_build_here(self) -> tuple[bool, str]:
        try:
            import tvm
        except ImportError:
            return False, f"apache-tvm is not installed ({_INSTALL_TVM})"
        return True, f"apache-tvm {tvm.__version__}"

    def can_run_here(self, target: Target) -> tuple[bool, str]:
        runs, why = super().can_run_here(target)
        if not runs and target.arch == "aarch64":
            return False, f"{why}; checked under qemu-aarch64 at compile"
        return runs, why

    def check_target(self, target: Target) -> None:
        super().check_target(target)
        if target.arch != platform.machine() and shutil.which(_CROSS_COMPILER) is None:
            raise UserError(
                f"cross-compiling for {target.arch} needs {_CROSS_COMPILER}, which is not installed",
                "apt-get install g++-aarch64-linux-gnu",
            )

    def lower(self, model_file: Path, target: Target, artifact_dir: Path, options: dict) -> dict:
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        model = ir.load(str(model_file))
        shapes = options["shapes"]
        for value in model.graph.inputs:
            value.shape = ir.Shape(shapes[value.name])
        onnxscript.optimizer.optimize(model)
        try:
            module = from_onnx(ir.to_proto(model), keep_params_in_input=False)
        except Exception as exc:  # the importer raises bare errors for operators it lacks
            raise UserError(
                f"TVM's ONNX importer cannot read this model: {exc}", "--debug for details"
            ) from exc
        tuning = self._tuning(target, options)
        spec = tvm_target(target)
        if tuning["trials"] > 0:
            # MetaSchedule sizes its parallel schedules by the core count of the machine it measures on.
            spec["num-cores"] = options.get("threads") or os.cpu_count()
        llvm = tvm.target.Target(spec)
        if tuning["trials"] > 0 or tuning["records_before"] > 0:
            cross = target.arch != platform.machine()
            executable = self._compile_tuned(module, llvm, tuning, options, cross)
            tuning["records_after"] = _record_count(tuning["database"])
        else:
            executable = tvm.compile(module, llvm, relax_pipeline=relax.get_default_pipeline(llvm))
        artifact_dir.mkdir(parents=True, exist_ok=True)
        export = {}
        if target.arch != platform.machine():
            export["fcompile"] = tvm.support.cc.cross_compiler(_CROSS_COMPILER)
        executable.export_library(str(artifact_dir / "model.so"), **export)
        return {
            "name": self.name,
            "version": tvm.__version__,
            "artifact": "artifact/model.so",
            "elf_machine": _elf_machine(artifact_dir / "model.so"),
            "precision": "fp32",
            "target": tvm_target(target),
            "tuning": {k: (str(v) if isinstance(v, Path) else v) for k, v in tuning.items()},
            "session": {
                "threads": options.get("threads") or 0,
                "input_order": [v.name for v in model.graph.inputs],
            },
            "static_shapes": {name: list(shape) for name, shape in shapes.items()},
        }

    def _tuning(self, target: Target, options: dict) -> dict:
        key = hashlib.sha256(json.dumps(tvm_target(target), sort_keys=True).encode()).hexdigest()[:12]
        database = Path(options.get("tuning_db") or TUNING_ROOT / f"{target.name}-{key}")
        trials = options.get("tune") or 0
        if trials and target.arch != platform.machine() and not options.get("rpc"):
            raise UserError(
                f"tuning for {target.arch} must measure on an {target.arch} board",
                "pass --rpc-tracker HOST:PORT --rpc-key KEY of a TVM RPC tracker with the board registered",
            )
        return {"trials": trials, "database": database, "records_before": _record_count(database)}

    def _compile_tuned(self, module, llvm, tuning: dict, options: dict, cross: bool):
        from tvm.s_tir import meta_schedule as ms
        from tvm.s_tir.meta_schedule.relax_integration import (
            compile_relax,
            extract_tasks,
            extracted_tasks_to_tune_contexts,
        )

        database_dir = tuning["database"]
        database_dir.mkdir(parents=True, exist_ok=True)
        if tuning["trials"] > 0:
            # Each builder and runner worker imports TVM's schedule intrinsics on start, which takes minutes
            # on a small machine: with the default 30 s timeouts every candidate would time out unmeasured.
            builder = ms.builder.LocalBuilder(timeout_sec=_WORKER_TIMEOUT_S)
            runner = ms.runner.LocalRunner(timeout_sec=_WORKER_TIMEOUT_S)
            if rpc := options.get("rpc"):
                host, _, port = rpc["tracker"].rpartition(":")
                if cross:
                    # MetaSchedule sends a .tar that the board would link itself; boards (and the emulated
                    # one) have no compiler, so each candidate is linked here.
                    builder = ms.builder.LocalBuilder(
                        timeout_sec=_WORKER_TIMEOUT_S, f_export=_export_aarch64_library
                    )
                runner = ms.runner.RPCRunner(
                    ms.runner.RPCConfig(host, int(port), rpc["key"], _WORKER_TIMEOUT_S)
                )
            tasks, per_iteration = _tasks_for_budget(
                extract_tasks(_fused(module, llvm), llvm), tuning["trials"]
            )
            small = tuning["trials"] < _EVOLUTIONARY_MIN_TRIALS
            # MetaSchedule configures its loggers from the names of the handlers on its logger; a handler
            # someone added without a name (a test harness's, an application's) makes that fail.
            scheduler_log = logging.getLogger("tvm.s_tir.meta_schedule")
            scheduler_log.handlers = [handler for handler in scheduler_log.handlers if handler.get_name()]
            contexts, weights = extracted_tasks_to_tune_contexts(
                tasks, str(database_dir), strategy="replay-trace" if small else "evolutionary", seed=0
            )
            database = ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=str(database_dir),
                max_trials_global=tuning["trials"],
                num_trials_per_iter=per_iteration,
                builder=builder,
                runner=runner,
                cost_model="random" if small else "xgb",
            )
        else:
            database = ms.database.JSONDatabase(work_dir=str(database_dir))
        return compile_relax(database, module, llvm, None)

    def emulate(self, stage: Path, target: Target) -> Emulation:
        """A runner for an aarch64 artifact under qemu-aarch64, or (None, why not)."""
        qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
        if target.arch != "aarch64" or qemu is None:
            return None, "no qemu-aarch64 (apt-get install qemu-user-static)"
        libraries = [AARCH64_RUNTIME_DIR / name for name in ("libtvm_runtime.so", "libtvm_ffi.so")]
        if not all(path.is_file() for path in libraries):
            return None, "no aarch64 TVM runtime (python tools/fetch_tvm_aarch64_runtime.py)"
        host = _build_host()
        manifest = json.loads((stage / "manifest.json").read_text())
        order = manifest["backend"]["session"]["input_order"]
        model = stage / manifest["backend"]["artifact"]

        def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            with tempfile.TemporaryDirectory() as scratch:
                specs = []
                for name in order:
                    array = np.ascontiguousarray(feeds[name])
                    array.tofile(Path(scratch) / f"{name}.bin")
                    dims = "x".join(str(d) for d in array.shape)
                    specs.append(f"{Path(scratch) / name}.bin:{_tvm_dtype(array.dtype)}:{dims}")
                completed = subprocess.run(
                    [qemu, "-L", str(_AARCH64_SYSROOT), str(host), str(model), scratch, *specs],
                    capture_output=True,
                    text=True,
                    timeout=_EMULATION_TIMEOUT_S,
                    check=False,
                )
                if completed.returncode != 0:
                    raise RuntimeError(f"tvm_host under qemu failed: {completed.stderr.strip()[-2000:]}")
                outputs = []
                for line in completed.stdout.splitlines():
                    index, dtype, dims = line.split()
                    shape = [int(d) for d in dims.split("x")]
                    outputs.append(
                        np.fromfile(Path(scratch) / f"output_{index}.bin", dtype=dtype).reshape(shape)
                    )
                return outputs

        return run, f"ran under {Path(qemu).name} with the aarch64 TVM runtime"


def _record_count(database: Path) -> int:
    """The measured schedules in a MetaSchedule database folder."""
    records = database / "database_tuning_record.json"
    return len(records.read_text().splitlines()) if records.is_file() else 0


def _export_aarch64_library(module) -> str:
    """MetaSchedule's builder export for an aarch64 board: a shared library linked by the cross compiler
    (the only one the backend cross-compiles for, see ``check_target``)."""
    import tvm.support.cc

    path = Path(tempfile.mkdtemp()) / "candidate.so"
    module.export_library(str(path), fcompile=tvm.support.cc.cross_compiler(_CROSS_COMPILER))
    return str(path)


def _tasks_for_budget(tasks: list, trials: int) -> tuple[list, int]:
    """The tasks a budget of ``trials`` is spent on, and the trials per task and round.

    A large budget tunes every task, evolutionary search with a cost model. A small one tunes only the
    heaviest compute-bound tasks (estimated FLOPs x occurrences), ``_SMALL_BUDGET_TRIALS_PER_TASK`` random
    schedules each: spread over every task it would buy one schedule of some trivial reshape, and each
    round costs a minute or more of worker start-up on a small machine.
    """
    if trials >= _EVOLUTIONARY_MIN_TRIALS:
        return tasks, 64
    from tvm.s_tir.analysis import estimate_tir_flops

    compute_bound = [t for t in tasks if any(fragment in t.task_name for fragment in _COMPUTE_BOUND)]
    ranked = sorted(compute_bound, key=lambda t: estimate_tir_flops(t.dispatched[0]) * t.weight, reverse=True)
    count = max(1, -(-trials // _SMALL_BUDGET_TRIALS_PER_TASK))
    return ranked[:count], min(trials, _SMALL_BUDGET_TRIALS_PER_TASK)


def _fused(module, llvm):
    """The module as compile_relax prepares it before applying a database (legalised, fused TIR), so that
    the tuned tasks are the ones the final build looks up."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline

    with llvm:
        return tvm.transform.Sequential(
            [
                *pipeline.library_dispatch_passes(llvm),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
            ]
        )(module)


def _tvm_dtype(dtype: np.dtype) -> str:
    return "bool" if dtype == np.bool_ else str(dtype)


def _elf_machine(path: Path) -> str:
    with path.open("rb") as handle:
        header = handle.read(20)
    machine = int.from_bytes(header[18:20], "little")
    return _ELF_MACHINES.get(machine, f"e_machine {machine}")


def _build_host() -> Path:
    """tvm_host for aarch64, linked against the fetched runtime; rebuilt when its source changes."""
    import tvm_ffi

    digest = hashlib.sha256(_HOST_SOURCE.read_bytes()).hexdigest()[:12]
    host = AARCH64_RUNTIME_DIR / f"tvm_host-{digest}"
    if not host.is_file():
        include = Path(tvm_ffi.__file__).parent / "include"
        subprocess.run(
            [
                _CROSS_COMPILER,
                "-std=c++17",
                "-O2",
                str(_HOST_SOURCE),
                f"-I{include}",
                f"-L{AARCH64_RUNTIME_DIR}",
                "-ltvm_runtime",
                "-ltvm_ffi",
                "-Wl,-rpath,$ORIGIN",
                "-o",
                str(host),
            ],
            check=True,
            capture_output=True,
        )
    return host
