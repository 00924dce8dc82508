"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class FmtlError(Exception):
    """A mistake in what the user asked for or supplied; its message is the whole story."""


class DataError(FmtlError):
    """The data cannot be found or read as asked."""


class MissingSplitError(DataError):
    """The source has no such split (e.g. a folder with no test/ subfolder)."""


class ModelConfigError(FmtlError):
    """An unknown model, unusable weights or an impossible freeze policy."""
