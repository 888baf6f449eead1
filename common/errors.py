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

# The classes sit in the lowest layer (kernels/ raises BadInput too); these are the same objects.
from mobillm.kernels.errors import BAD_INPUT, CHECK_FAILED, INTERRUPTED, BadInput, CheckFailed, MobillmError

__all__ = ["BAD_INPUT", "CHECK_FAILED", "INTERRUPTED", "BadInput", "CheckFailed", "MobillmError", "run_command"]


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
