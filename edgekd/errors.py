"""User-facing errors: the CLI prints these as one line and exits non-zero, never a traceback."""


class EdgekdError(Exception):
    """A problem with the user's input (config, data, checkpoint); exit code 1."""

    exit_code = 1


class ConfigError(EdgekdError):
    """An invalid pipeline file or override; exit code 2, message names the key path."""

    exit_code = 2
