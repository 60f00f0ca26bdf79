"""The few exception classes tessera raises on purpose.

Everything else propagates unchanged. Each message names the file, the field and the value,
and says what to do.
"""

from __future__ import annotations


class TesseraError(Exception):
    """Base class of every error tessera raises on purpose."""


class JobSpecError(TesseraError):
    """A job spec is malformed: the message names the file and the field."""


class ModelCardError(TesseraError):
    """A model card or checkpoint is missing, corrupt or does not fit the job."""


class InputError(TesseraError):
    """An input scene cannot be read or does not fit the model (names the file)."""


class OutputError(TesseraError):
    """An output location is unsafe or holds results of a different job fingerprint."""


class ClusterError(TesseraError):
    """A Ray cluster cannot be reached, refuses the credentials, does not know a job, or cannot
    take what a submission would upload (names the address or the file, never a token)."""
