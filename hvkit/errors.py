"""The one exception type a user sees.

Every failure a user can cause or fix (bad input, a missing tool, a VM that died)
becomes an HvkitError with a message that says what is wrong and what to do. The CLI
prints it as one line and exits non-zero; anything else is a bug and gets a traceback.
"""

from __future__ import annotations


class HvkitError(Exception):
    """A failure with a message fit for the user, and optionally what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class VMNotFound(HvkitError):
    pass


class VMDied(HvkitError):
    pass
