"""One error policy for every mobillm command.

Every error a user can cause or fix derives from `MobillmError` and carries its exit status:
2 for bad input (a wrong flag, a missing file, a refused HELLO), 1 for a check that ran and
failed (an engine that does not verify). `run_command` turns them into one line on stderr and
that status, and an interrupt into 130. Anything else is a bug and keeps its traceback: no
command catches bare ValueError/OSError around its whole body.
"""

from __future__ import annotations

import sys
from typing import Callable

BAD_INPUT = 2
CHECK_FAILED = 1
INTERRUPTED = 130


class MobillmError(Exception):
    """An error the user can act on; `exit_code` is what the command exits with."""

    exit_code = BAD_INPUT


class BadInput(MobillmError):
    """Wrong arguments, files or data: nothing was done (exit 2)."""

    exit_code = BAD_INPUT


class CheckFailed(MobillmError):
    """A check ran to the end and did not pass (exit 1)."""

    exit_code = CHECK_FAILED


def run_command(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's body under the error policy; returns the exit status."""
    try:
        status = body()
    except MobillmError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0 if status is None else status
