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


# What the operating system says about a file, with the way out; any other OSError is a file the user
# named or a state of their machine too (a missing file, a file-size limit), named by its own message.
_FILE_SYSTEM_HINTS = {
    errno.ENOSPC: "free space there, or set TMPDIR to a file system with room",
    errno.EDQUOT: "free space within your quota, or set TMPDIR elsewhere",
    errno.EROFS: "choose a writable place",
    errno.EACCES: "fix the permissions there, or choose another place",
    errno.ENOENT: "check the path",
    errno.EFBIG: "a file-size limit (the file system's, or ulimit -f) stops it: raise it or write elsewhere",
}


def _user_state(exc: BaseException) -> tuple[str, str] | None:
    """(message, hint) for an exception that is the user's input or machine and not a bug of ours: the
    operating system's answer about a file, input nested deeper than a parser recurses, or more memory
    than the machine has; None for everything else."""
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}", _FILE_SYSTEM_HINTS.get(exc.errno or 0, "check that file")
    if isinstance(exc, RecursionError):
        return "an input file is nested too deeply to read", "no real model, recipe or manifest is; fix it"
    if isinstance(exc, MemoryError):
        return "this input needs more memory than the machine has", "give a smaller input"
    return None


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
        # Where the code knows the file it names it (a UserError above); this is the rest, e.g. a
        # library's temporary file on a full TMPDIR.
        if (state := _user_state(exc)) is not None:
            click.echo(f"error: {state[0]} ({state[1]})", err=True)
            return 2
        click.echo(
            f"internal error: {type(exc).__name__}: {exc} (a bug in redux-edge: please report it with "
            "the output of the same command with --debug)",
            err=True,
        )
        return 1
    return code if isinstance(code, int) else 0


def _terminated(signum: int, _frame: object) -> None:
    # As for Ctrl-C: unwind, so that staging directories and half-sent files are removed on the way out.
    raise SystemExit(128 + signum)


def entry_point() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())
