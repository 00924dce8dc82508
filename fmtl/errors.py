"""User-facing errors: the CLI prints their message on one line and exits non-zero.

Every error a user can cause or meet (a bad option, bad data, a damaged file, a full disk,
a diverging run) derives from ``FmtlError``; anything else reaching the user is a bug.
Torch-free, so the runtime shares it. The families:

- ``ConfigError``: options and config files;
- ``DataError`` (and ``MissingSplitError``): datasets;
- ``ModelConfigError``: architectures, weights, freeze policies;
- ``StateError``: a saved training state that cannot be resumed;
- ``WriteError``: a save that failed (disk full, I/O error, read-only folder);
- ``DivergenceError``: a run whose loss or weights stopped being finite;
- elsewhere: ``fmtl.runtime.images.DecodeError``, ``fmtl.runtime.classifier.ModelError``,
  ``fmtl.runtime.infer.InferError``, ``fmtl.training.export.ExportError``.
"""


def one_line(error: BaseException | str, limit: int | None = 300) -> str:
    """An exception's message (its type name if it has none), or a text, on one line of at most ``limit``
    characters (None: no cut): runs of whitespace, line breaks among them, become one space, and other
    unprintable characters (from a file name, say) backslash escapes. How a library's error, or an
    untrusted name, is quoted inside an fmtl message."""
    text = " ".join(str(error).split())
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


#: How the command line reports an FmtlError: this prefix, the message, this exit status.
ERROR_PREFIX = "fmtl: error: "
EXIT_USER_ERROR = 2


class FmtlError(Exception):
    """A mistake in what the user asked for or supplied; its message is the whole story."""


class ConfigError(FmtlError):
    """An option or config file value that is unknown, of the wrong type or out of range."""


class DataError(FmtlError):
    """The data cannot be found or read as asked."""


class MissingSplitError(DataError):
    """The source has no such split (e.g. a folder with no test/ subfolder)."""


class ModelConfigError(FmtlError):
    """An unknown model, unusable weights or an impossible freeze policy."""


class ExportError(FmtlError):
    """The export failed a check (or could not be made); nothing was published."""


class StateError(FmtlError):
    """A saved training state that is missing, damaged or refused; the message names the file."""


class WriteError(FmtlError, OSError):
    """A file could not be written (disk full, quota, I/O error); the message names it and the free space."""


class DivergenceError(FmtlError):
    """The loss or the weights became NaN or infinite."""
