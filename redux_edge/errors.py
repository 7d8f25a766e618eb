"""The user-error contract: a mistake a user can make is one line, exit code 2, and no partial output.

Everything a user can cause (a name that does not exist, a file that is not what it claims, a directory
that cannot be written) raises ``UserError`` with a message saying what is wrong and a hint saying how to
fix it. The CLI prints ``error: <message> (<hint>)`` and exits 2; any other exception is a bug in
redux-edge and exits 1, with a traceback only under ``--debug``.
"""

from __future__ import annotations

__all__ = ["UserError", "VerificationError", "first_line"]


class UserError(Exception):
    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class VerificationError(UserError):
    """A compiled artifact computes something other than its reference, beyond tolerance."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (the rest is its traceback or detail), or the
    exception's type where it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
