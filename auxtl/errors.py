"""The errors auxtl raises on purpose, about a user's input, flags, files or data.

Each is also the matching built-in (an `InputError` is a `ValueError`, a
`MissingFileError` a `FileNotFoundError`, ...), so callers that catch the
built-ins keep working. The command line prints an `AuxtlError` as one line
naming the problem; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import pickle


class AuxtlError(Exception):
    """Base of the errors auxtl raises on purpose; its message names the problem."""

    def __str__(self) -> str:  # KeyError would repr-quote its message
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class InputError(AuxtlError, ValueError):
    """A value, flag, shape or configuration auxtl cannot use."""


class NonFiniteLossError(AuxtlError, FloatingPointError):
    """Training produced a NaN or infinite loss (or state); the run stopped before saving it."""


class Preempted(AuxtlError):
    """The run was asked to stop (SIGTERM) and saved a checkpoint to resume from."""

    exit_code = 143  # 128 + SIGTERM, what a scheduler expects from a terminated job


class MissingFileError(AuxtlError, FileNotFoundError):
    """A path the user named does not exist (or lacks a file a checkpoint needs)."""


class UnknownNameError(AuxtlError, KeyError):
    """A name (task, model, source) that no registry knows."""


class BadParameterError(AuxtlError, TypeError):
    """Parameters a registered class does not accept."""


class UnsafeFileError(AuxtlError, pickle.UnpicklingError):
    """A file refused because loading it would run code or trust an unsafe location."""


class AuxtlWarning(UserWarning):
    """A result auxtl can still produce but that may mislead; the command line prints it
    as one line."""
