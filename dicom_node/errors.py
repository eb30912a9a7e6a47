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


class SchemaTooNewError(NodeError, RuntimeError):
    """The database was migrated by a newer version of the node than this one.

    Running older code on a newer schema could write rows the newer code misreads, so the
    node refuses to start; the message names the revision and what to do.
    """


class DatabaseUnavailableError(NodeError, ConnectionError):
    """The database could not be reached at start-up (server down, wrong host or password).

    Reported as a message without a traceback; a supervisor (systemd, compose) restarts the
    node, which tries again.
    """
