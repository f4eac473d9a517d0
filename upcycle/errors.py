"""Exception types for user mistakes. The CLI prints them as one line and exits non-zero."""


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
    """Talking to the Hugging Face Hub failed: no token, bad repo id, network or server error."""


class DataError(UpcycleError):
    """Training or routing data is missing, empty or malformed."""
