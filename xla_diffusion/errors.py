"""The errors a user sees as one `error: ...` line (never a traceback), and the one helper that turns a list of
(bad, message) rules into the first failing one.

Every CLI runs its main through `xla_diffusion.cli.run_cli`, which prints a `UserError` as one line and exits
with its `exit_code`: 2 for bad input (flags, files, data), 1 for a run that could not go on.
"""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """An error whose message is complete on one line for the user."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A configuration value or an input (flag, path, dataset) that cannot work."""


class EvalError(UserError, ValueError):
    """Bad input to sampling or evaluation."""


class ModelLoadError(UserError, RuntimeError):
    """The pretrained model cannot be loaded."""

    exit_code = 1


class TooManyCompilations(UserError, RuntimeError):
    """The training step graph changed between steps (a recompilation past --max_compilations)."""

    exit_code = 1


class DataError(UserError, RuntimeError):
    """The training data stopped: no usable sample left, or a loader worker died (the message names the cause)."""

    exit_code = 1


class StoreUnreachable(UserError, ConnectionError):
    """The object store (gs://) cannot be reached at all. An OSError, so code that reports failed reads and
    writes reports it too; a UserError, so wherever it is not caught the CLI prints it as one line."""

    exit_code = 1


def check(rules: Iterable[tuple[object, str]], error: type[UserError] = ConfigError) -> None:
    """Raise `error(message)` for the first `(bad, message)` whose `bad` is true; the validation of every
    config dataclass (`__post_init__`) goes through here."""
    for bad, message in rules:
        if bad:
            raise error(message)
