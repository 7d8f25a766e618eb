"""``devices``, ``flash``, ``rollback`` and ``profile``: bundles on devices over SSH."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from redux_edge.cli.common import (
    AT_LEAST_ONE,
    DEVICES_OPTION,
    NON_NEGATIVE,
    THREADS,
    FiniteFloatRange,
    emit_json,
    err,
    human_bytes,
    out,
    progress,
)
from redux_edge.deploy.devices import Device, load_registry
from redux_edge.errors import UserError
from redux_edge.profile.plot import plot_latencies
from redux_edge.profile.store import ProfileStore, compare

__all__ = ["devices", "flash", "profile", "rollback"]


@click.group()
def devices() -> None:
    """The device registry (devices.toml): devices, their targets and addresses, and groups (fleets).

    \b
    Examples:
      redux-edge devices add orin-1 --target jetson-orin-nano --address ssh://ubuntu@10.0.0.21 \\
          --key ~/.ssh/redux_ed25519 --root /opt/redux-edge --group lab
      redux-edge devices add bench-dir --target host --address local --root /tmp/fake-device
      redux-edge devices list
      redux-edge devices check orin-1 --bundle build/orin
    """


@devices.command("add")
@click.argument("name")
@click.option("--target", required=True, help="Target name (see redux-edge targets).")
@click.option("--address", required=True, help="ssh://user@host:port, or local (a directory here).")
@click.option("--root", required=True, help="Directory on the device that holds releases/ and current.")
@click.option("--key", help="Private key file (default: the ssh-agent's keys).")
@click.option("--known-hosts", help="known_hosts file that holds the device's host key [~/.ssh/known_hosts].")
@click.option("--python", default="python3", show_default=True, help="Python on the device.")
@click.option("--storage-limit", help="Most the root may hold, e.g. 2GiB (default: its free space).")
@click.option("--group", "groups", multiple=True, help="Add the device to this group (repeatable).")
@click.option("--replace", is_flag=True, help="Replace a device of the same name.")
@DEVICES_OPTION
def devices_add(
    name: str,
    target: str,
    address: str,
    root: str,
    key: str | None,
    known_hosts: str | None,
    python: str,
    storage_limit: str | None,
    groups: tuple[str, ...],
    replace: bool,
    registry_path: Path | None,
) -> None:
    """Register device NAME (nothing is contacted; `devices check` does that)."""

    registry = load_registry(registry_path)
    device = Device(name, target, address, root, key, known_hosts, python, storage_limit)
    registry.add(device, list(groups), replace)
    registry.save()
    out.print(f"registered {name} in {registry.path}")


@devices.command("remove")
@click.argument("name")
@DEVICES_OPTION
def devices_remove(name: str, registry_path: Path | None) -> None:
    """Remove device NAME from the registry and its groups (the device itself is not touched)."""

    registry = load_registry(registry_path)
    registry.remove(name)
    registry.save()
    out.print(f"removed {name} from {registry.path}")


@devices.command("list")
@DEVICES_OPTION
@click.option("--json", "as_json", is_flag=True)
def devices_list(registry_path: Path | None, as_json: bool) -> None:
    """List registered devices and groups."""
    import dataclasses

    registry = load_registry(registry_path)
    if as_json:
        emit_json(
            {
                "devices": [dataclasses.asdict(device) for device in registry.devices.values()],
                "groups": registry.groups,
            }
        )
        return
    table = Table("device", "target", "address", "root", "groups", title=str(registry.path))
    for device in registry.devices.values():
        member_of = [group for group, members in registry.groups.items() if device.name in members]
        table.add_row(device.name, device.target, device.describe(), device.root, ", ".join(member_of))
    out.print(table)


@devices.command("check")
@click.argument("name")
@click.option("--bundle", type=click.Path(path_type=Path), help="Warn when the device does not suit it.")
@DEVICES_OPTION
@click.option("--json", "as_json", is_flag=True)
def devices_check(name: str, bundle: Path | None, registry_path: Path | None, as_json: bool) -> None:
    """Connect to device NAME and report what it is: architecture, OS, Python, runtimes, JetPack, the
    release it serves; warn where it does not match its target (or --bundle)."""
    from redux_edge.deploy import inspect as device_inspect

    device = load_registry(registry_path).resolve(name, None)[0]
    with progress(f"connecting to {device.name} ({device.describe()})"):
        report = device_inspect.check(device, bundle)
    if as_json:
        emit_json(report)
        return
    facts = report["device"]
    for label, key in (("machine", "machine"), ("os", "os"), ("kernel", "kernel"), ("python", "python")):
        out.print(f"  {label:<9}{facts[key]}")
    runtimes = ", ".join(f"{k} {v}" for k, v in facts["runtimes"].items()) or "none"
    out.print(f"  runtimes {runtimes}")
    if facts["jetpack"] or facts["trtexec"]:
        out.print(f"  jetpack  {facts['jetpack'] or 'none'}; trtexec {facts['trtexec'] or 'none'}")
    if facts.get("emulated"):
        out.print(f"  emulated {facts['emulated']}")
    out.print(f"  current  {facts['current'] or 'nothing flashed'} ({len(facts['releases'])} release(s))")
    space = facts["storage"]
    releases = ", ".join(f"{r} {human_bytes(size)}" for r, size in space["releases"].items()) or "none"
    limit = f", limit {human_bytes(space['limit'])}" if space["limit"] is not None else ""
    out.print(
        f"  storage  {human_bytes(space['used'])} used (hard links once){limit}, "
        f"{human_bytes(space['free'])} free; releases: {releases}"
    )
    for warning in report["warnings"]:
        err.print(f"[yellow]warning:[/] {warning}")


def _flash_table(results: list) -> Table:
    table = Table("device", "status", "release", "previous", "sent", "stored", "health", "s")
    table.columns[0].no_wrap = True
    verdicts = {None: "", True: "passed", False: "failed"}
    for result in results:
        free = "" if result.free_bytes is None else f", {human_bytes(result.free_bytes)} free"
        table.add_row(
            result.device,
            "[green]ok[/]" if result.ok else "[red]failed[/]",
            result.release or "",
            result.previous or "",
            f"{len(result.uploaded)} ({human_bytes(result.uploaded_bytes)})",
            f"{human_bytes(result.release_bytes)}{free}" if result.release_bytes else "",
            verdicts[(result.health or {}).get("healthy")],
            f"{result.seconds:.1f}",
        )
    return table


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", help="Registered device name.")
@click.option("--group", help="Registered group: its devices are flashed concurrently.")
@click.option("--keep", type=AT_LEAST_ONE, default=3, show_default=True, help="Releases kept on each device.")
@click.option("--any-target", is_flag=True, help="Flash even when the device's target differs.")
@click.option("--with-ir", is_flag=True, help="Also store the portable model.onnx, which no runner reads.")
@DEVICES_OPTION
@click.option("--json", "as_json", is_flag=True)
def flash(
    bundle: Path,
    device: str | None,
    group: str | None,
    keep: int,
    any_target: bool,
    with_ir: bool,
    registry_path: Path | None,
    as_json: bool,
) -> None:
    """Flash BUNDLE to a device or a group over SSH: upload what the device lacks, verify every sha256
    there, switch `current` atomically, health-check, and roll back when anything fails.

    \b
    Examples:
      redux-edge flash build/orin --device orin-1
      redux-edge flash build/orin --group lab --keep 5 --json
    """
    import dataclasses

    from redux_edge.deploy.flash import flash as flash_devices

    targets = load_registry(registry_path).resolve(device, group)
    with err.status(f"flashing {bundle} to {len(targets)} device(s)") as status:
        results = flash_devices(
            bundle,
            targets,
            keep,
            any_target,
            progress=lambda name, message: status.update(f"{name}: {message}"),
            with_ir=with_ir,
        )
    if as_json:
        emit_json([dataclasses.asdict(result) | {"ok": result.ok} for result in results])
    else:
        out.print(_flash_table(results))
    failed = [result for result in results if not result.ok]
    if len(failed) == 1 and len(results) == 1:
        raise UserError(str(failed[0].error))
    if failed:
        first = failed[0].error
        raise UserError(
            f"{len(failed)} of {len(results)} devices failed; {first}",
            "the table shows each device; failed devices serve their previous release",
        )


@click.command()
@click.option("--device", required=True, help="Registered device name.")
@click.option("--to", "release", help="Release id to go back to (default: the one before the current).")
@DEVICES_OPTION
@click.option("--json", "as_json", is_flag=True)
def rollback(device: str, release: str | None, registry_path: Path | None, as_json: bool) -> None:
    """Point the device's `current` back at an earlier release and health-check it."""
    from redux_edge.deploy.flash import rollback as roll_back

    target = load_registry(registry_path).resolve(device, None)[0]
    with progress(f"rolling back {target.name}"):
        report = roll_back(target, release)
    if as_json:
        emit_json(report)
    else:
        out.print(f"{report['device']}: {report['from']} -> {report['to']} (health check passed)")


class _DefaultCommandGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to the default subcommand:
    ``profile BUNDLE --device X`` and ``profile compare A B`` both read naturally."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultCommandGroup)
def profile() -> None:
    """On-device latency: run a flashed bundle there, keep the record, compare runs, plot them.

    \b
    Examples:
      redux-edge profile build/orin --device orin-1 --duration 30
      redux-edge profile list
      redux-edge profile compare 20261129-101500-orin-1 20261129-102200-orin-1
      redux-edge profile plot RUN_A RUN_B -o latency.png
    """


_STORE_OPTION = click.option(
    "--store",
    type=click.Path(path_type=Path),
    help="Profile store directory [$REDUX_EDGE_PROFILES or ~/.local/share/redux-edge/profiles].",
)


@profile.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", required=True, help="Registered device (the bundle must be flashed there).")
@click.option("--warmup", type=NON_NEGATIVE, default=10, show_default=True)
@click.option("--iterations", type=AT_LEAST_ONE, default=100, show_default=True)
@click.option(
    "--duration",
    type=FiniteFloatRange(min=0, min_open=True),
    help="Measure for this many seconds instead of --iterations.",
)
@click.option(
    "--layer-runs",
    type=NON_NEGATIVE,
    default=10,
    show_default=True,
    help="Runs of the per-layer profile (0: none).",
)
@click.option("--threads", type=THREADS, help="intra-op threads (default: as recorded in the bundle).")
@click.option("--plot", "plot_file", type=click.Path(path_type=Path), help="Also write a latency PNG.")
@DEVICES_OPTION
@_STORE_OPTION
@click.option("--json", "as_json", is_flag=True)
def profile_run(
    bundle: Path,
    device: str,
    warmup: int,
    iterations: int,
    duration: float | None,
    layer_runs: int,
    threads: int | None,
    plot_file: Path | None,
    registry_path: Path | None,
    store: Path | None,
    as_json: bool,
) -> None:
    """Profile BUNDLE on a device with its own runner; the record goes into the profile store."""
    from redux_edge.profile.device import profile_on_device

    target = load_registry(registry_path).resolve(device, None)[0]
    runs = f"{duration:g} s" if duration else f"{iterations} runs"
    with progress(f"profiling {bundle} on {target.name} ({warmup} warm-up + {runs})"):
        record = profile_on_device(bundle, target, warmup, iterations, duration, layer_runs, threads)
    record = ProfileStore(store).add(record)
    if plot_file:
        plot_latencies([record], plot_file)
    if as_json:
        emit_json(record)
        return
    stats = record["stats"]
    emulated = f", EMULATED: {record['emulated']}" if record.get("emulated") else ""
    table = Table(
        title=f"{record['run']}: {record['model']} on {record['device']} ({record['backend']}{emulated})"
    )
    for column in ("p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "throughput /s", "peak RSS MB"):
        table.add_column(column, justify="right")
    table.add_row(
        *(f"{stats[key]:.3f}" for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms")),
        f"{stats['throughput_per_s']:.1f}",
        f"{stats['peak_rss_mb']:.0f}",
    )
    out.print(table)
    if record["layers"]:
        layers = record["layers"]
        out.print(f"  slowest layers ({layers['source']}, {layers['runs']} runs):")
        for layer in layers["layers"][:5]:
            out.print(f"    {layer['ms']:8.3f} ms  {layer['op']:<16} {layer['name']}")
    if record["tegrastats"]:
        power = record["tegrastats"]["power_mw"] or {}
        out.print(f"  power    {power.get('mean', 0):.0f} mW mean ({record['tegrastats']['power_rail']})")


@profile.command("list")
@_STORE_OPTION
@click.option("--json", "as_json", is_flag=True)
def profile_list(store: Path | None, as_json: bool) -> None:
    """List stored runs, oldest first."""

    records = ProfileStore(store).runs()
    if as_json:
        emit_json([{k: v for k, v in record.items() if k != "latencies_ms"} for record in records])
        return
    table = Table("run", "device", "model", "backend", "bundle", "p50 ms", "throughput /s")
    for record in records:
        stats = record["stats"]
        table.add_row(
            record["run"],
            record["device"],
            record["model"],
            record["backend"],
            record["bundle"],
            f"{stats['p50_ms']:.3f}",
            f"{stats['throughput_per_s']:.1f}",
        )
    out.print(table)


@profile.command("compare")
@click.argument("run_a")
@click.argument("run_b")
@_STORE_OPTION
@click.option("--json", "as_json", is_flag=True)
def profile_compare(run_a: str, run_b: str, store: Path | None, as_json: bool) -> None:
    """Ratios RUN_B / RUN_A for latency, throughput and peak memory (ids or unique prefixes)."""

    profiles = ProfileStore(store)
    a, b = profiles.get(run_a), profiles.get(run_b)
    rows = compare(a, b)
    if as_json:
        emit_json({"a": a["run"], "b": b["run"], "metrics": rows})
        return
    table = Table("metric", "A", "B", "B / A", title=f"A = {a['run']}, B = {b['run']}")
    for row in rows:
        colour = "green" if row["better"] else "red"
        table.add_row(
            row["metric"], f"{row['a']:.4g}", f"{row['b']:.4g}", f"[{colour}]{row['ratio']:.3f}x[/]"
        )
    out.print(table)


@profile.command("plot")
@click.argument("runs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="PNG file.")
@_STORE_OPTION
def profile_plot(runs: tuple[str, ...], output: Path, store: Path | None) -> None:
    """Plot the latency distributions of RUNS into one PNG."""

    profiles = ProfileStore(store)
    out.print(str(plot_latencies([profiles.get(run) for run in runs], output)))
