"""Errors a user can cause: the CLI prints their message as one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, option, output or model: the message says what is wrong and what to do."""
