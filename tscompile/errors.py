"""Errors the CLI turns into exit codes: UserError -> 2 (bad input), GoalMissed -> 1 (verification)."""


class UserError(Exception):
    """Bad input (usage, spec, checkpoint, data). The message is one line naming what and where."""
    exit_code = 2


class GoalMissed(Exception):
    """A verification goal from the spec was missed; the message is a table of what missed."""
    exit_code = 1
