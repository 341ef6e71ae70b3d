"""The user-facing error type.

Every mistake a user can make (bad path, bad image, bad parameter) raises
:class:`EmbedpinError` (or a subclass); the CLI prints ``error: <message>`` on one
line and exits with code 2. Library code never calls ``sys.exit``.
"""


class EmbedpinError(Exception):
    """A user mistake, reported as one line ``error: ...`` with exit code 2."""

    exit_code = 2


class ConfigError(EmbedpinError):
    """An invalid option or parameter range."""


class InputError(EmbedpinError):
    """A missing, unreadable or malformed input file (image, checkpoint, run folder)."""


class ModelError(EmbedpinError):
    """A model that cannot be found or loaded."""


class WorkerError(EmbedpinError):
    """Scale-out workers that cannot do the work: a Ray cluster that cannot be joined or is too
    small, or no worker left alive."""


class StoreError(EmbedpinError):
    """The run folder cannot be written (disk full, read-only, gone): the run stops resumable."""
