"""Errors that mean "the input or the situation is wrong", shown to the user as one line, not a traceback."""


class UserError(Exception):
    """A problem the user can fix (a flag, a file, the machine); its message says what and where."""


class TrainingError(UserError):
    """A problem that stops training with a clear message instead of a traceback."""


class TrainingInterrupted(Exception):
    """Raised after the state was saved; ``exit_code`` follows the shell convention 128 + signal."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number
