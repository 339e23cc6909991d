"""The exception types the command line turns into a one-line message and exit code 2, and the
helper that turns other exceptions' messages into that one line."""
from __future__ import annotations


class CliError(Exception):
    """A user-facing error: bad flag, missing or corrupt data, unreadable checkpoint."""


class FlagError(CliError):
    """A mistake in the command line itself, found before any data or model work: every process of
    a torchrun job finds the same one, so only rank 0 reports it."""


def brief(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s message on one line (torch's load_state_dict puts the missing and unexpected keys
    on the lines after its first), cut to ``limit`` characters."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    text = text.removeprefix("fanet: ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
