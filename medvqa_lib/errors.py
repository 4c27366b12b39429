"""Errors that name the problem and the fix."""

from __future__ import annotations


class MedVQAError(Exception):
    """Base class for every error the library raises on purpose."""


class DataError(MedVQAError, ValueError):
    """A dataset file or folder is missing, corrupt or malformed."""


class UnknownNameError(MedVQAError, KeyError):
    """An unknown dataset, split, profile or backend name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class HubUnavailableError(MedVQAError, RuntimeError):
    """The Hugging Face Hub cannot be reached (offline) and no local copy was given."""


class ConfigError(MedVQAError, ValueError):
    """A bad profile or parameter value."""


def unknown_name(kind: str, name: str, choices) -> UnknownNameError:
    """Build an :class:`UnknownNameError` listing the valid choices."""
    opts = ", ".join(sorted(map(str, choices)))
    return UnknownNameError(f"unknown {kind} {name!r}; choose one of: {opts}")
