"""``redux-edge``: the command line. Thin: parse, call ``redux_edge.api``, print with rich.

Verbs are the user's words (compile, run, bench, inspect, targets, models, passes, devices, flash,
rollback, profile, leakage, train); one module per command group. Reports go to stdout (``--json`` for
scripts), progress to stderr. A user's mistake is one line and exit code 2; a bug is exit code 1;
``--debug`` shows the traceback of either.
"""

from __future__ import annotations

import errno
import logging
import signal
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
      redux-edge compile --model minilm-l6 --target jetson -o build/jetson
      redux-edge compile --model minilm-l6 --target host -o build/minilm
      redux-edge run build/minilm sentences.txt
      redux-edge bench build/minilm --json
    """
    # Libraries' warnings (exporter, converters) are not actionable for a user; ours are.
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR, format="%(name)s: %(message)s")
    ours = logging.getLogger("redux_edge")
    ours.setLevel(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        # Our warnings are notes to the user (e.g. an input cast without loss), one line each.
        note = logging.StreamHandler()
        note.setFormatter(logging.Formatter("note: %(message)s"))
        ours.handlers[:], ours.propagate = [note], False


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


# Errors that are the state of the user's file systems, not a bug: full, over quota, read-only, no access.
_FILE_SYSTEM_STATES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


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
    except OSError as exc:
        if exc.errno not in _FILE_SYSTEM_STATES:
            raise
        # Where the code knows the file it names it (UserError above); this is the rest, e.g. a
        # library's temporary file on a full TMPDIR.
        if debug:
            err.print_exception()
        where = f" writing {exc.filename}" if exc.filename else ""
        click.echo(
            f"error: {exc.strerror}{where} (free space or fix permissions there, or set TMPDIR to a "
            "file system with room)",
            err=True,
        )
        return 2
    except Exception as exc:
        if debug:
            err.print_exception()
        click.echo(
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)", err=True
        )
        return 1
    return code if isinstance(code, int) else 0


def _terminated(signum: int, _frame: object) -> None:
    # As for Ctrl-C: unwind, so that staging directories and half-sent files are removed on the way out.
    raise SystemExit(128 + signum)


def entry_point() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())
