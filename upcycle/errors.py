"""Exception types for user mistakes. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class UpcycleError(Exception):
    """Base class of every error caused by input the user can fix."""

    exit_code = 2


class SourceNotFoundError(UpcycleError):
    """The dense source is missing or is not a model."""


class UnsupportedArchitectureError(UpcycleError):
    """The dense family, or the family/target pair, cannot be converted (exactly)."""


class RecipeError(UpcycleError):
    """The recipe (flags or file) is invalid."""


class CorruptCheckpointError(UpcycleError):
    """A weight file is truncated or malformed."""


class OutputExistsError(UpcycleError):
    """The output folder exists and is not empty."""


class WriteError(UpcycleError):
    """Writing the output failed (disk full, permissions, ...)."""


class VerificationError(UpcycleError):
    """A model that claims exactness failed verification."""

    exit_code = 1


class IncompleteOutputError(UpcycleError):
    """A folder to push is not a complete upcycle output (missing or truncated files)."""


class HubError(UpcycleError):
    """Talking to the Hugging Face Hub failed: no token, bad repo id, network or server error.

    The message is ``reason``, then ``; hint`` when there is one (what to do next, e.g. how to resume),
    so that a caller can say something else around the same ``reason``.
    """

    def __init__(self, reason: str, hint: str | None = None):
        self.reason, self.hint = reason, hint
        super().__init__(f"{reason}; {hint}" if hint else reason)


class DataError(RecipeError):
    """Text data (training, routing, calibration, prompts) is missing, empty or malformed.

    A :class:`RecipeError`, as calibration text and prompts files were reported before the one reader.
    """
