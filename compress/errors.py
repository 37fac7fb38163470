"""One exception type for every mistake a user can make.

The CLI prints `str(err)` as a single line and exits 2; tracebacks only with --debug.
"""
import difflib


class UserError(Exception):
    """Bad input: the message says what was wrong and how to fix it."""


def closest(name: str, choices) -> str:
    """' (did you mean X?)' for the nearest valid name, or '' when nothing is close."""
    hit = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{hit[0]}'?)" if hit else ""
