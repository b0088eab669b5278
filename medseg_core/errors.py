"""Exception tree for medseg-fl.

Every message follows the house rule: what was wrong, the offending value,
what was expected, and the next step.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AdaptationLeakError",
    "CheckpointError",
    "ConfigError",
    "DataIntegrityError",
    "MedsegError",
    "PrivacyBudgetExceeded",
    "UpdateRejected",
]


class MedsegError(Exception):
    """Base class of every error raised on purpose by medseg-fl."""


class ConfigError(MedsegError, ValueError):
    """A configuration file or value is invalid."""


class DataIntegrityError(MedsegError):
    """A site's data failed its integrity check.

    Parameters
    ----------
    message
        Human-readable summary (the formatted report).
    report
        The :class:`medseg_core.data.integrity.IntegrityReport` (or ``None``
        when the problem was found before a report could be built, e.g. a
        missing ``dataset.json``).
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class PrivacyBudgetExceeded(MedsegError):
    """Training would take a site's spent epsilon past its cap."""


class UpdateRejected(MedsegError):
    """A client update failed validation and is excluded from aggregation."""


class CheckpointError(MedsegError):
    """A checkpoint is missing, corrupt or does not match the model."""


class AdaptationLeakError(MedsegError):
    """A site-private adaptation parameter would have left the site."""
