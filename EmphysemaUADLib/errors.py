"""The one exception type that carries a message meant for the user."""


class InputError(Exception):
    """Bad input or a failed precondition; its message is shown as is, without a traceback."""
