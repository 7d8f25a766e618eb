"""``redux-edge``: the command line. Thin: parse, call ``redux_edge.api``, print with rich.

Verbs are the user's words (compile, run, bench, inspect, targets, models, passes, devices, flash,
rollback, profile, leakage, train); one module per command group. Reports go to stdout (``--json`` for
scripts), progress to stderr. A user's mistake is one line and exit code 2; a bug is exit code 1;
``--debug`` shows the traceback of either.
"""

from __future__ import annotations

import logging
import sys

import click

from redux_edge.cli import compile as compile_group
from redux_edge.cli import devices, leakage, listings, run, train
from redux_edge.cli.common import err
from redux_edge.errors import UserError

__all__ = ["cli", "entry_point", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(package_name="redux-edge")
def cli(debug: bool) -> None:
    """Compile compressed PyTorch and ONNX models into verified bundles for edge devices.

    \b
    Examples:
      redux-edge compile --model minilm-l6 --target host -o build/minilm
      redux-edge run build/minilm sentences.txt
      redux-edge bench build/minilm --json
    """
    # Libraries' warnings (exporter, converters) are not actionable for a user; ours are.
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR, format="%(name)s: %(message)s")
    logging.getLogger("redux_edge").setLevel(logging.DEBUG if debug else logging.WARNING)


for command in (
    compile_group.compile_command,
    train.train_adapter_command,
    train.learn_masks_command,
    train.train_command,
    run.run,
    run.bench,
    run.inspect,
    listings.targets,
    listings.models,
    listings.passes,
    leakage.leakage,
    devices.devices,
    devices.flash,
    devices.rollback,
    devices.profile,
):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        # Without standalone mode click returns the code of click.exceptions.Exit instead of exiting.
        code = cli.main(args=argv, prog_name="redux-edge", standalone_mode=False)
    except UserError as exc:
        if debug:
            err.print_exception()
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()} (see redux-edge --help)", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:
        if debug:
            err.print_exception()
        click.echo(
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)", err=True
        )
        return 1
    return code if isinstance(code, int) else 0


def entry_point() -> None:
    sys.exit(main())
