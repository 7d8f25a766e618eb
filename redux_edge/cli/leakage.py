"""``leakage``: simulated or captured EM traces of a protected first layer, attacked and tested."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from rich.table import Table

from redux_edge.cli.common import AT_LEAST_ONE, FINITE, NON_NEGATIVE, SEED, FiniteFloatRange, emit_json, out
from redux_edge.errors import UserError
from redux_edge.leakage import calibrate, campaign, simulate

__all__ = ["leakage"]


@click.group()
def leakage() -> None:
    """EM side-channel analysis of a mac-prune bundle's first layer (compiled with --emit-c).

    \b
    Examples:
      redux-edge leakage simulate --bundle build/protected --traces 1000 -o traces/protected.ets
      redux-edge leakage simulate --bundle build/protected --unprotected -o traces/plain.ets
      redux-edge leakage attack traces/plain.ets --bundle build/protected -o reports/plain
      redux-edge leakage attack traces/hidden.ets --attack integrated --bundle build/hidden -o reports/i
      redux-edge leakage attack capture.cwp -o reports/capture
      redux-edge leakage tvla traces/fixed.ets traces/random.ets -o reports/tvla
      redux-edge leakage noise
      redux-edge leakage noise capture.cwp --aes-key 2b7e151628aed2a6abf7158809cf4f3c
    """


@leakage.command("simulate")
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle with c/layer.npz.")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="ETS file.")
@click.option("--traces", "count", type=AT_LEAST_ONE, default=1000, show_default=True)
@click.option(
    "--noise",
    type=FiniteFloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Gaussian noise sigma per sample.",
)
@click.option(
    "--leak",
    type=click.Choice(["product", "accumulator"]),
    default="product",
    show_default=True,
    help="Hamming weight of the product or of the accumulator after each MAC.",
)
@click.option(
    "--jitter",
    type=NON_NEGATIVE,
    default=0,
    show_default=True,
    help="Up to this many idle samples before each MAC.",
)
@click.option(
    "--control-flow",
    type=FiniteFloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Amplitude of the keep/skip branch leak (Double Strike); 0: a balanced branch.",
)
@click.option("--unprotected", is_flag=True, help="The same layer without MACPruning: every MAC runs.")
@click.option(
    "--shuffle-span",
    type=AT_LEAST_ONE,
    help="Hiding: shuffle within spans of N MACs instead of all of an output position's (a weaker "
    "shuffle, to test attacks).",
)
@click.option("--no-masking", is_flag=True, help="Hiding: keep every pixel (the shuffle alone).")
@click.option("--fixed", is_flag=True, help="One fixed input for every trace (a TVLA fixed set).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def leakage_simulate(
    bundle: Path,
    output: Path,
    count: int,
    noise: float,
    leak: str,
    jitter: int,
    control_flow: float,
    unprotected: bool,
    shuffle_span: int | None,
    no_masking: bool,
    fixed: bool,
    seed: int,
    as_json: bool,
) -> None:
    """Simulate EM traces of the kernel's MAC loop (a labelled simulation: no probe here)."""

    model = simulate.LeakageModel(leak, noise, jitter, control_flow)
    described = campaign.simulate_file(
        bundle, output, count, model, not unprotected, seed, fixed, shuffle_span, not no_masking
    )
    if as_json:
        emit_json(described)
        return
    out.print(
        f"wrote {described['file']}: {count} simulated traces x {described['samples']} samples, "
        f"{described['slots']} MACs attacked per trace ({_defence(described)}, "
        f"{leak} Hamming weight, noise {noise}, jitter {jitter}, control-flow leak {control_flow}); "
        f"MACs executed {described['keep_rate']:.1%}"
    )


@leakage.command("attack")
@click.argument("traces_file", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Report folder."
)
@click.option("--inputs", type=click.Path(path_type=Path), help="Inputs .npy for plain .npy traces.")
@click.option("--bundle", type=click.Path(path_type=Path), help="Score against this bundle's true weights.")
@click.option(
    "--realign",
    type=FINITE,
    metavar="THRESHOLD",
    help="Double Strike: parse each trace by its branch samples (above THRESHOLD = MAC ran) first; on "
    "traces of the kernel with hiding, read the keep bits its select leaks (integrated, second-order).",
)
@click.option(
    "--attack",
    "statistic",
    type=click.Choice(["windowed", "integrated", "second-order", "accumulator"]),
    default="windowed",
    show_default=True,
    help="windowed: best sample where the MAC can be; integrated: the window's sum; second-order: the "
    "sum of squared centred samples; accumulator: the running sum, weight by weight (aligned traces).",
)
@click.option("--checkpoints", help="Trace counts to report ranks at, e.g. 100,1000,10000.")
@click.option("--limit", type=AT_LEAST_ONE, help="Use only the first N traces.")
@click.option("--json", "as_json", is_flag=True)
def leakage_attack(
    traces_file: Path,
    output: Path,
    inputs: Path | None,
    bundle: Path | None,
    realign: float | None,
    statistic: str,
    checkpoints: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """CPA/DEMA recovery of first-layer weights (Hamming weight of weight x input, equivalence classes)."""

    try:
        counts = [int(c) for c in checkpoints.split(",")] if checkpoints else None
    except ValueError as exc:
        raise UserError(f"cannot read --checkpoints {checkpoints}", "e.g. 100,1000,10000") from exc
    result = campaign.attack_file(traces_file, output, inputs, bundle, realign, counts, limit, statistic)
    if as_json:
        emit_json({key: value for key, value in result.items() if key != "checkpoints"})
        return
    table = Table("traces", "best peak (median)", "weights recovered" if bundle else "scored")
    for entry in result["checkpoints"]:
        recovered = (
            f"{entry['recovered']} of {result['weights']}" if "recovered" in entry else "no truth given"
        )
        table.add_row(str(entry["traces"]), f"{np.median(entry['best_peak']):.3f}", recovered)
    out.print(table)
    out.print(f"  {statistic} CPA, windows {result['windows']}; report {', '.join(result['files'])}")


def _defence(described: dict) -> str:
    if not described["protected"]:
        return "unprotected"
    if described["hiding"] == "none":
        return "MACPruning"
    masking = "MACPruning + " if described["masking"] else ""
    return f"{masking}shuffle over {described['shuffle_span']} MACs, constant time"


@leakage.command("tvla")
@click.argument("fixed", type=click.Path(path_type=Path))
@click.argument("random", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Report folder."
)
@click.option("--json", "as_json", is_flag=True)
def leakage_tvla(fixed: Path, random: Path, output: Path, as_json: bool) -> None:
    """Fixed-vs-random Welch t-test per sample; |t| > 4.5 is flagged."""

    result = campaign.tvla_files(fixed, random, output)
    if as_json:
        emit_json({key: value for key, value in result.items() if key != "t"})
        return
    verdict = "LEAKS" if result["leaks"] else "no sample over the threshold"
    out.print(
        f"TVLA {result['traces']['fixed']} fixed vs {result['traces']['random']} random traces: max |t| "
        f"{result['max_abs_t']:.1f} at sample {result['at_sample']}, {result['samples_over_threshold']} "
        f"samples over {result['threshold']}: {verdict}; report {', '.join(result['files'])}"
    )


@leakage.command("noise")
@click.argument("traces_file", required=False, type=click.Path(path_type=Path))
@click.option("--inputs", type=click.Path(path_type=Path), help="Inputs .npy for plain .npy traces.")
@click.option("--aes-key", metavar="HEX", help="The capture ran AES-128 under this key on its inputs.")
@click.option("--values", type=click.Path(path_type=Path), help="Known intermediate values .npy [traces, k].")
@click.option("--json", "as_json", is_flag=True)
def leakage_noise(
    traces_file: Path | None, inputs: Path | None, aes_key: str | None, values: Path | None, as_json: bool
) -> None:
    """The noise of a capture in Hamming-weight bits: the --noise that makes simulate match it.

    Without TRACES_FILE: the packaged ChipWhisperer-Lite capture of an STM32F303 (Cortex-M4).
    """

    if traces_file is None and (inputs or aes_key or values):
        raise UserError(
            "--inputs, --aes-key and --values describe a TRACES_FILE", "give the capture file too"
        )
    result = calibrate.measure(traces_file, inputs, aes_key, values)
    if as_json:
        emit_json(result)
        return
    low, high = result["noise_range"]
    out.print(
        f"{result['source']}: {result['traces']} traces, {result['values']} known values; noise "
        f"{result['noise']} HW bits (range {low}-{high}), SNR {result['snr_median']}, |correlation| "
        f"{result['correlation_median']} (medians at each value's best sample): simulate with "
        f"--noise {result['noise']}"
    )
