"""User-facing errors: each names what is wrong and what to do; the CLI prints one line."""
from __future__ import annotations


class KtError(Exception):
    """A mistake the user can fix (bad config, absent device, broken file)."""


class ConfigError(KtError):
    """The composed configuration is invalid."""


class DeviceUnavailable(KtError):
    def __init__(self, backend: str, reason: str, fix: str = "") -> None:
        self.backend, self.reason = backend, reason
        msg = f"device '{backend}' is unavailable: {reason}"
        super().__init__(f"{msg}; {fix}" if fix else msg)
