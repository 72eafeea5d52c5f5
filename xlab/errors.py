"""The error type for bad user input: the CLIs print it as one line and exit non-zero, without a traceback."""


class XLabError(Exception):
    """A problem with the user's input (config value, path, file) rather than a bug in XLab."""
