"""The project's exceptions. The CLI turns each into one line on stderr and its exit code."""

from __future__ import annotations


class SaigeError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(SaigeError):
    """Bad input from the user: flags, spec, database contents, paths (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """An invalid spec, flag combination or column mapping."""


class InputError(UsageError):
    """The data or the place it comes from cannot be used as asked."""


class NoExamplesError(InputError):
    """Nothing passed the filters; the message says which filter to relax."""


class ResourceError(UsageError):
    """The job as configured does not fit (out of memory); a retry as it is will fail again."""


class RuntimeFailure(SaigeError):
    """Something failed while running: I/O, a lost connection, a killed subprocess (exit 1)."""

    exit_code = 1


class CandidateRejected(SaigeError):
    """The gate kept the champion: an outcome of the loop, not a failure, so never retried (exit 3)."""

    exit_code = 3


class Interrupted(SaigeError):
    """Stopped by SIGTERM at a safe point (exit 143, as a process killed by SIGTERM)."""

    exit_code = 143
