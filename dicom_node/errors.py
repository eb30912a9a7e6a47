"""The node's exceptions: one base, subclasses that also inherit the matching builtin."""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(NodeError, ValueError):
    """A configuration key has a bad value; the message names the key and the value."""


class SpoolError(NodeError, OSError):
    """The spool could not store an instance durably."""


class SpoolFullError(SpoolError):
    """Not enough free space on the spool filesystem (answered as Out of Resources)."""


class InvalidInstanceError(NodeError, ValueError):
    """A received instance is unusable (bad UID, too large, unreadable header)."""


class DeliveryError(NodeError, RuntimeError):
    """A result could not be delivered to a destination (transient unless said otherwise)."""
