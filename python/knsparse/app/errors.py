"""The CLI's one error type for a user's mistake."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the command line: reported in one line, exit status 2."""
