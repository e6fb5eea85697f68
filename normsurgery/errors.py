"""User-facing errors: one paragraph saying what went wrong and what to do, never a traceback."""

from __future__ import annotations


class NormSurgeryError(Exception):
    """An error caused by the user's input or environment; the CLI prints it and exits with `exit_code`."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(" ".join(message.split()))
        if exit_code is not None:
            self.exit_code = exit_code


class CheckFailed(NormSurgeryError):
    """A measured check or threshold failed (exit code 1, as CI gates expect)."""

    exit_code = 1
