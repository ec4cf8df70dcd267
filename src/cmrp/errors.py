"""One exception type for every problem a user can fix.

The CLI prints a `CmrpError` as one clear message (no traceback) and exits with status 2.
Messages name the file and key/field involved and say how to fix it.
"""

from __future__ import annotations

__all__ = ["CmrpError", "ConfigError", "DataError", "WeightsError"]


class CmrpError(Exception):
    """A user-fixable problem; `str(err)` is the whole message shown to the user."""


class ConfigError(CmrpError):
    """A recipe, backbone card or reward preset is invalid."""


class DataError(CmrpError):
    """Character data is missing or malformed."""


class WeightsError(CmrpError):
    """Model weights are missing, incomplete or do not match the architecture."""
