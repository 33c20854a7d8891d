"""User-facing errors: the CLI prints these as one line and exits non-zero, never a traceback.

Exit 2 means "fix your input" (a pipeline key, a file or folder given to edgekd); exit 1 means
the run itself failed (out of disk, a training loss that diverged, a file that failed its checks)."""


class EdgekdError(Exception):
    """A run that failed for a reason the message names; exit code 1.

    The message is one line whatever it quotes: a newline from the user's input shows as \\n."""

    exit_code = 1

    def __init__(self, message: object = ""):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class Diverged(EdgekdError):
    """A training run whose loss became NaN or infinite (train.fit); `what` says which run and
    where, so a stage that knows more about why can say so in place of the usual advice."""

    def __init__(self, what: str, advice: str):
        super().__init__(f"{what}; {advice}")
        self.what = what


class InputError(EdgekdError):
    """Bad input: a file, folder or dataset edgekd was pointed at; exit code 2, message names it."""

    exit_code = 2


class ConfigError(InputError):
    """An invalid pipeline file or override; exit code 2, message names the key path."""


def first_few(names: list[str], n: int = 3) -> str:
    """'a, b, c and 4 more': the names a one-line message can hold."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def did_you_mean(word: str, options) -> str:
    """' (did you mean 'x'?)' for the closest option, or ''."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
