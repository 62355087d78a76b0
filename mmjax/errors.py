"""Errors every layer raises; a leaf module, so that any part of the package can raise
them without importing another."""


class ConfigError(ValueError):
    """A config key or value a user got wrong (the CLI prints it in one line, exit 2)."""
