"""User-facing errors: problems with a user's input, reported as one line without a traceback."""


class InputError(ValueError):
    """A problem with a user's file, folder or option; its message names the file and the reason."""
