"""``compile``: its own options, then the shortcut flags that every registered pass and backend declares.

The flags are read from the registries each time the command is parsed or its help is shown, so a pass
registered later (a plugin, a test) brings its flags with it; no pass or backend is named here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from redux_edge.cli.common import FINITE, THREADS, FiniteFloatRange, emit_json, parse_shapes, progress
from redux_edge.cli.report import print_report
from redux_edge.frontend.source import EVAL_TASKS
from redux_edge.interfaces import Flag
from redux_edge.ir.verify import Tolerance
from redux_edge.passes import PASSES
from redux_edge.recipe import load_recipe, parse_pass_flag, passes_from_flags

__all__ = ["compile_command"]


def _option(flag: Flag) -> click.Option:
    settings: dict[str, Any] = {"help": flag.help, "multiple": flag.multiple}
    if flag.type is bool:
        settings["is_flag"] = True
    elif flag.type == "path":
        settings["type"] = click.Path(path_type=Path)
    elif isinstance(flag.type, tuple):
        settings["type"] = click.Choice(flag.type)
    else:
        settings["type"] = FINITE if flag.type is float else flag.type
    if flag.metavar:
        settings["metavar"] = flag.metavar
    return click.Option([flag.option], **settings)


def shortcut_flags() -> list[Flag]:
    """Every registered pass's and backend's flags, each option once, in registry order."""
    from redux_edge.backends import BACKENDS

    declared = [flag for cls in PASSES.values() for flag in cls.flags]
    declared += [flag for backend in BACKENDS.values() for flag in backend.flags]
    return list({flag.option: flag for flag in reversed(declared)}.values())[::-1]


class _CompileCommand(click.Command):
    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        help_option = self.get_help_option(ctx)
        own = [param for param in params if param is not help_option]
        return [*own, *(_option(flag) for flag in shortcut_flags()), *params[len(own) :]]


@click.command("compile", cls=_CompileCommand)
@click.option(
    "-m",
    "--model",
    required=True,
    help="Zoo name (see `redux-edge models`), or the path of an .onnx file, a torch.export .pt2 archive or "
    "a Hugging Face model directory (config.json + safetensors).",
)
@click.option(
    "-t", "--target", default="host", show_default=True, help="Target name (see `redux-edge targets`)."
)
@click.option(
    "-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Bundle directory."
)
@click.option("--recipe", type=click.Path(path_type=Path), help="Recipe .toml, or a bundle's manifest.json.")
@click.option(
    "--pass",
    "extra_passes",
    multiple=True,
    metavar="NAME[:K=V,...]",
    help="Append a pass to the recipe (repeatable), e.g. --pass cleanup:iterations=3.",
)
@click.option("--backend", help="Override the target's preferred backend.")
@click.option(
    "--shapes",
    help="Input shapes, trtexec style (input:1x3x28x28,...): an ONNX file's verification inputs, "
    "and the fixed shapes of static-shape backends (TVM, TensorRT).",
)
@click.option(
    "--inputs",
    "inputs_file",
    type=click.Path(path_type=Path),
    help="Real inputs to verify on: .npz, .npy, or the model's text/image format.",
)
@click.option(
    "--eval-data",
    type=click.Path(path_type=Path),
    help="Your labelled data for the quality report: CSV/JSONL (text, label), a folder of class "
    "subfolders of images, or an .npz (images or the model's inputs, and labels).",
)
@click.option(
    "--eval-task",
    type=click.Choice(EVAL_TASKS),
    default="auto",
    show_default=True,
    help="What the first output is for the quality report: classification (logits: accuracy on the "
    "labels) or embedding (cosine to dense and a linear probe); auto: as the checkpoint or zoo card says.",
)
@click.option(
    "--calibration-data",
    type=click.Path(path_type=Path),
    help="Your data for passes that choose by data (same formats, labels optional).",
)
@click.option(
    "--weights",
    type=click.Path(path_type=Path),
    help="Zoo models: parameters to use instead of the package's (.safetensors, e.g. from `train recover`).",
)
@click.option("--threads", type=THREADS, help="Threads recorded for the device (default: all cores).")
@click.option(
    "--precision",
    help="fp32, fp16 or bf16 where the backend and CPU have it [fp32; TensorRT: fp16]; auto: time the "
    "target's backends and precisions here and take the fastest that matches fp32.",
)
@click.option(
    "--tolerance-cosine",
    type=FiniteFloatRange(0, 1),
    help="Minimum cosine vs the reference [0.9999; 0.999 below fp32].",
)
@click.option(
    "--tolerance-atol",
    type=FiniteFloatRange(min=0),
    help="Maximum abs difference vs the reference, scaled by its magnitude above 1 [1e-3; 5e-2 below fp32].",
)
@click.option(
    "--waive-gate",
    is_flag=True,
    help="Write a result whose outputs moved beyond the default gate of its lossy passes (quantize, "
    "embedding-tables, sparsity, mac-prune) from the float model; the report says the gate was waived.",
)
@click.option("-f", "--force", is_flag=True, help="Replace an existing bundle directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def compile_command(
    model: str,
    target: str,
    out: Path,
    recipe: Path | None,
    extra_passes: tuple[str, ...],
    backend: str | None,
    shapes: str | None,
    inputs_file: Path | None,
    eval_data: Path | None,
    eval_task: str,
    calibration_data: Path | None,
    weights: Path | None,
    threads: int | None,
    precision: str | None,
    tolerance_cosine: float | None,
    tolerance_atol: float | None,
    waive_gate: bool,
    force: bool,
    as_json: bool,
    **shortcuts: Any,
) -> None:
    """Compile MODEL for TARGET into a verified bundle.

    \b
    Examples:
      redux-edge compile --model minilm-l6 --target host -o build/minilm
      redux-edge compile --model minilm-l6 --target x86-64-avx2 --backend openvino -o build/ov
      redux-edge compile --model minilm-l6 --target x86-64-avx2 --backend tvm --shapes \\
          input_ids:1x128,attention_mask:1x128 --tune 64 -o build/tvm
      redux-edge compile --model minilm-l6 --target arm64-cortex-a72 -o build/a72
      redux-edge compile --model my.onnx --shapes x:1x3x224x224 -o build/my
      redux-edge compile --model minilm-l6 --recipe models/minilm-l6/edge.toml -o build/edge
      redux-edge compile --model minilm-l6 --prune-heads 0.5 --importance calibration -o build/half
      redux-edge compile --model my-hf-classifier/ --prune-heads 0.5 --eval-data held_out.csv -o build/mine
      redux-edge compile --model minilm-l6 --target jetson-orin-nano --sparsity 2:4 -o build/sparse
      redux-edge compile --model mnist-cnn --mac-prune 0.5 --mac-keep-top 0.4 --emit-c -o build/protected
      redux-edge compile --model minilm-l6 --recipe build/minilm/manifest.json -o build/again
      redux-edge compile --model minilm-l6 --weights build/recover/weights.safetensors \\
          --recipe build/recover/recipe.toml -o build/edge-recovered
    """
    from redux_edge import api
    from redux_edge.backends import BACKENDS

    options: dict[str, Any] = {"threads": threads, "precision": precision}
    for known in BACKENDS.values():
        options |= known.options_from_flags(shortcuts)
    tolerance = None  # the backend's precision decides, unless the user sets either bound
    if tolerance_cosine is not None or tolerance_atol is not None:
        default = Tolerance.for_precision(precision or "fp32")
        # An explicit 0 is a bound like any other (atol 0: bit-exact), never the default in disguise.
        tolerance = Tolerance(
            default.min_cosine if tolerance_cosine is None else tolerance_cosine,
            default.atol if tolerance_atol is None else tolerance_atol,
        )
    flags = [*(parse_pass_flag(flag) for flag in extra_passes), *passes_from_flags(shortcuts)]
    chosen = load_recipe(recipe).extended(flags)
    with api.native_output_to_stderr():
        bundle = api.compile_model(
            model,
            target,
            chosen,
            out,
            force=force,
            backend_name=backend,
            shapes=parse_shapes(shapes),
            inputs_file=inputs_file,
            eval_data=eval_data,
            eval_task=eval_task,
            calibration_data=calibration_data,
            weights=weights,
            tolerance=tolerance,
            backend_options=options,
            waive_gate=waive_gate,
            step=progress,
        )
    if as_json:
        emit_json(bundle.manifest)
    else:
        print_report(bundle.path, bundle.manifest, [])
