"""Mistakes a user can make, as the one line `mmjax` prints before exit 2 (a config key,
a value, a path, a missing extra); anything else is a bug, and its traceback shows."""

from __future__ import annotations

from mmjax.errors import ConfigError


def _os_error(e: OSError) -> str:
    """'Not a directory: workdirs/x/wd (a path above it is a regular file)' and the like."""
    hints = {
        NotADirectoryError: " (a path above it is a regular file, not a directory)",
        IsADirectoryError: " (a directory where a file was expected)",
        FileExistsError: " (a regular file where a directory was expected)",
        PermissionError: " (no permission: a read-only workdir or file?)",
    }
    if e.filename is None or not e.strerror:  # raised with mmjax's own message
        return str(e)
    hint = next((h for cls, h in hints.items() if isinstance(e, cls)), "")
    return f"{e.strerror}: {e.filename}{hint}"


# Packages of the `data` extra: a raw ModuleNotFoundError of one becomes one line.
_EXTRA_MODULES = {
    "tensorflow": "TensorFlow",
    "tensorflow_datasets": "TensorFlow Datasets",
    "av": "PyAV (video decoding)",
    "array_record": "array-record (ArrayRecord shards; TensorFlow Datasets brings it)",
}


def _missing_extra(e: ImportError, command) -> str | None:
    """The one-line message for a missing `data` extra, or None for another ImportError."""
    try:
        from mmjax.data import MissingExtraError
    except ImportError:
        MissingExtraError = ()
    if MissingExtraError and isinstance(e, MissingExtraError):
        return str(e)
    root = (e.name or "").split(".")[0]
    if root not in _EXTRA_MODULES:
        return None
    what = f"mmjax {command}" if command else "this command"
    return f"{what} needs {_EXTRA_MODULES[root]} ({e}): pip install -e '.[data]' (or pip install 'mmjax[data]')"


def user_error(e: Exception, command) -> str | None:
    """The one line for a mistake a user made, or None (a bug: its traceback shows)."""
    if isinstance(e, (ConfigError, FileNotFoundError, ValueError)):
        return str(e)  # ValueError: a variant name, a shape or a path a user gave; the message names it
    if isinstance(e, (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)):
        return _os_error(e)  # a read-only workdir, a workdir under (or at) a regular file
    if isinstance(e, ImportError):
        return _missing_extra(e, command)
    return None
