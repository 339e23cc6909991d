"""The one exception type the command line turns into a one-line message and exit code 2."""
from __future__ import annotations


class CliError(Exception):
    """A user-facing error: bad flag, missing or corrupt data, unreadable checkpoint."""
