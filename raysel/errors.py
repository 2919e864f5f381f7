"""The exceptions raysel raises on purpose.

    RayselError
    ├── ConfigError     the run's configuration is invalid (names the field path)
    ├── InputError      the corpus cannot be used at all (no files, no text column...)
    ├── ModelError      a model cannot be found or loaded
    ├── ScorerError     a scorer failed on a batch it was given
    ├── SinkError       the output cannot be written or committed (or another run owns the folder)
    └── RunFailed       a pass failed for a reason that is not the user's; says which pass, the run
                        id, and how to continue (`raysel run` exits 1 for it, 2 for the others)

Row-level problems (a malformed line, an empty text) are not exceptions: those rows are
quarantined with a reason and appear in the ledger.
"""


class RayselError(Exception):
    """Base class of every error raysel raises on purpose."""


class ConfigError(RayselError):
    """The configuration is invalid; the message names the field path and the fix."""


class InputError(RayselError):
    """The input corpus cannot be used as a whole."""


class ModelError(RayselError):
    """A model cannot be found or loaded."""


class ScorerError(RayselError):
    """A scorer failed on a batch."""


class SinkError(RayselError):
    """The output cannot be written or committed."""


class RunFailed(RayselError):
    """A pass failed for a reason that is not the user's; the message names the pass and how to continue."""
