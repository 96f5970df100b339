"""The agent's error tiers.

1. Misuse (a programming error, a bad argument) raises `ValueError`/`TypeError` at the call site.
2. Transient states (broker away, connection refused) are retried with jittered backoff and
   never surface as exceptions here.
3. Fatal states (unusable base model, missing data, unwritable state dir, refused credentials)
   raise a `FatalError`; the CLI prints its message and exits with its distinct code.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes, following BSD sysexits.h so init systems and shells know them."""

    OK = 0
    USAGE = 64  # EX_USAGE: bad command line or configuration values
    DATA_UNUSABLE = 66  # EX_NOINPUT: the device data file is missing or malformed
    BASE_MODEL_UNUSABLE = 65  # EX_DATAERR: the base model file is missing or malformed
    STATE_DIR_UNUSABLE = 73  # EX_CANTCREAT: the state dir cannot be created or written
    BROKER_REFUSED = 77  # EX_NOPERM: the broker refused our credentials
    INTERNAL = 70  # EX_SOFTWARE: a bug; the traceback is in the log


class FatalError(Exception):
    """An error the agent cannot recover from by retrying; ends the process."""

    exit_code: ExitCode = ExitCode.INTERNAL


class ConfigError(FatalError):
    exit_code = ExitCode.USAGE


class DataUnusable(FatalError):
    exit_code = ExitCode.DATA_UNUSABLE


class BaseModelUnusable(FatalError):
    exit_code = ExitCode.BASE_MODEL_UNUSABLE


class StateDirUnusable(FatalError):
    exit_code = ExitCode.STATE_DIR_UNUSABLE


class BrokerRefused(FatalError):
    exit_code = ExitCode.BROKER_REFUSED
