"""The error classes of the one error policy (`mobillm.common.errors` runs commands under it).

They live here, in the lowest layer, so the codec can raise `BadInput` without importing
`common/` (which imports `kernels/`); `mobillm.common.errors` re-exports the same classes."""

from __future__ import annotations

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
