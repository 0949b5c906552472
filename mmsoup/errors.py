"""The one exception type a user can cause, and the argument parser that raises it.

The CLI prints its message as one sentence (exit 2).
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class MMSoupError(Exception):
    """A problem with the user's input (file, argument, data): the message names it and the fix."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one MMSoupError sentence (exit 2), not usage + message."""

    def error(self, message: str) -> NoReturn:
        """Raise a wrong or missing flag as an MMSoupError naming it and pointing to --help."""
        raise MMSoupError(f"{message}; see `{self.prog} --help`.")
