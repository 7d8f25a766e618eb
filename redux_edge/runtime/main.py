"""The runner's command line, what a device executes (``python3 runner/run.py`` or ``runner/run.pyz``)::

python runner/run.py --inputs x.npz --outputs y.npz
python runner/run.py --bench --iterations 100 --json
python runner/run.py --bench --duration 30 --layers 10 --latencies --json   # what `profile` runs
python runner/run.py --check          # health check: the sample inputs give the sample outputs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from .backend_tensorrt import EngineBuildError, build_engine
from .packed import expand_packed
from .session import BundleSession, InputError, refuse_unlisted_files
from .tegrastats import Tegrastats
from .tolerance import Tolerance, compare, mismatch

__all__ = ["health_check", "main"]


def health_check(session: BundleSession, outputs: list[np.ndarray], expected: list[np.ndarray]) -> dict:
    """Outputs against the recorded sample, by the compile's own rule and tolerance; outputs that a
    randomised bundle draws anew every run are compared by shape only."""
    random = set(session.manifest["verify"].get("random_outputs", []))
    names = session.output_names
    kept = [i for i, name in enumerate(names) if name not in random]
    report = compare([expected[i] for i in kept], [outputs[i] for i in kept], [names[i] for i in kept])
    shapes_match = all(got.shape == want.shape for got, want in zip(outputs, expected, strict=True))
    why = mismatch(report, Tolerance.from_json(session.manifest["verify"]["tolerance"]))
    worst = max((numbers["max_abs"] for numbers in report.values() if "max_abs" in numbers), default=None)
    return {
        "healthy": shapes_match and not why,
        "max_abs": worst,
        "why": why or ("" if shapes_match else "output shapes differ"),
        "shapes_only": sorted(random),
    }


def main(argv: list[str] | None = None, bundle: Path | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a redux-edge bundle")
    parser.add_argument("--bundle", type=Path, default=bundle)
    parser.add_argument("--inputs", type=Path, help=".npz with one array per input (default: the sample)")
    parser.add_argument("--outputs", type=Path, help="write outputs to this .npz")
    parser.add_argument(
        "--check", action="store_true", help="health check: sample inputs give sample outputs"
    )
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--duration", type=float, help="bench: run for this many seconds instead")
    parser.add_argument("--layers", type=int, default=0, help="bench: also profile layers over N runs")
    parser.add_argument("--latencies", action="store_true", help="bench: print every run's latency")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--adapter", help="load this task's adapter pack (bundles with swappable adapters)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--build-engine", action="store_true", help="TensorRT: build this device's engine")
    parser.add_argument(
        "--board", help="--build-engine of a family bundle: this device's target (flash gives it)"
    )
    parser.add_argument(
        "--expand", action="store_true", help="write the dense weights of packed 2:4 models for other tools"
    )
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EngineBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        EOFError,
        RecursionError,
        MemoryError,
        zipfile.BadZipFile,
    ) as exc:
        # The manifest, sample and --inputs are data this runner reads without a schema (it has numpy only).
        print(f"error: the bundle or --inputs cannot be read ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.expand:
        manifest = json.loads((args.bundle / "manifest.json").read_text())
        for path in expand_packed(args.bundle, manifest.get("storage", {})):
            print(path)
        return 0
    if args.build_engine:
        print(json.dumps(build_engine(args.bundle, board=args.board)))
        return 0
    refuse_unlisted_files(args.bundle)
    session = BundleSession(args.bundle, args.threads, args.adapter)
    feeds: dict[str, np.ndarray] = {}
    expected: list[np.ndarray] = []
    if not args.inputs or args.check:
        # Not with --inputs alone: the compile runs a bundle being built so, before its sample outputs exist.
        feeds, expected = session.sample()
    if args.inputs:
        with np.load(args.inputs, allow_pickle=False) as archive:
            feeds = {k: archive[k] for k in archive.files}
    if args.bench:
        started = time.time()
        with Tegrastats() as tegrastats:
            report = session.benchmark(feeds, args.warmup, args.iterations, args.duration)
        report |= {"started": started, "finished": time.time(), "tegrastats": tegrastats.summary}
        # An emulated board says so (redux_edge/deploy/emulated.py): its times are not a board's.
        report["emulated"] = os.environ.get("REDUX_EDGE_EMULATED")
        if args.layers:
            report["layers"] = session.layer_times(feeds, args.layers, args.threads)
        if not args.latencies:
            del report["latencies_ms"]
        if args.json:
            print(json.dumps(report))
        else:
            print("  ".join(f"{k}={v:.4g}" for k, v in report.items() if isinstance(v, float | int)))
        return 0
    outputs = session.run(feeds)
    if args.outputs:
        np.savez(args.outputs, **dict(zip(session.output_names, outputs, strict=True)))
    if args.check:
        verdict = health_check(session, outputs, expected)
        print(json.dumps(verdict))
        return 0 if verdict["healthy"] else 1
    return 0
