import os
from pathlib import Path

"""The error type for bad user input: the CLIs print it as one line and exit non-zero, without a traceback."""


class XLabError(Exception):
    """A problem with the user's input (config value, path, file) rather than a bug in XLab."""


def check_writable_dir(path: object, key: str) -> None:
    """Fail with one line, before any work, when directory `path` (config key `key`) cannot be created or written."""
    p = Path(str(path)).expanduser().absolute()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        raise XLabError(f"{key}={str(path)!r} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise XLabError(f"{key}={str(path)!r} is not writable ({existing} does not allow writing)")
