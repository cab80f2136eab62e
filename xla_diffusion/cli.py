"""What every command line of the project shares: a parser whose errors are one line, and the main wrapper
that turns a `UserError` into one `error:` line and its exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from .errors import UserError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one `error:` line (exit 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Call `main(argv)` with logging set up; a `UserError` becomes one `error:` line and its exit code."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        main(argv)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return e.exit_code
    return 0
