"""Errors caused by the user's input or environment. The entry point prints them as one line (no
traceback), records the run as failed and exits non-zero."""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do."""


class TrainingDivergedError(UserError):
    """A training loss became NaN or Inf."""
