"""One exception root for everything a user can get wrong.

The CLI turns any ``ProbeError`` into one line on stderr and exit code 1; anything else is a bug and
keeps its traceback.
"""


class ProbeError(Exception):
    """A problem with the user's model, data or options; the message names it and the fix."""


class ModelError(ProbeError):
    """The model file cannot be read, validated or run."""


class LayerSelectionError(ProbeError):
    """A requested layer, pattern or op type matches nothing probe-able."""


class DataError(ProbeError):
    """The data file is missing, malformed, or does not fit the model."""


class ReductionError(ProbeError):
    """A layer cannot be reduced as asked (e.g. too large with reduction disabled)."""


class CacheError(ProbeError):
    """The feature cache cannot be used as asked (busy, out of space, unsupported setting)."""


class OutputError(ProbeError):
    """The results cannot be written where asked."""


class ExtraNotInstalledError(ProbeError):
    """A framework adapter was asked for, but its framework (an optional extra) is not installed."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a note on what was kept for the next run (the features already in the cache)."""
