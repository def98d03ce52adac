"""The failures ast-label's commands report: library modules raise these, never click's errors.

pipeline.commands.cli_core maps each type to its exit status in one table (`ast-label --help` lists
it) and prints the message as one line, never a traceback. Messages never hold a credential.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, option, output, model, cluster address or token: the message says what is
    wrong and what to do."""


class WorkFailed(Exception):
    """The work ran and part of it failed: files that `predict` could not label, a cluster job
    that failed or was stopped. The details were reported as the work went."""


class RunIncomplete(Exception):
    """A run ended with work units that did not commit (storage faults, not the data's): the same
    command run again labels them."""


class Interrupted(Exception):
    """The user stopped the command (Ctrl-C); the message says what is left running, if
    anything."""
