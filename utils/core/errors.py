"""Errors that mean "the input or the situation is wrong", shown to the user as one line, not a traceback."""


class UserError(Exception):
    """A problem the user can fix (a flag, a file, the machine); its message says what and where."""
