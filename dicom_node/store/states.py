"""The node's state machines, one ``StrEnum`` per table (values are what the database holds).

``StrEnum`` members compare equal to their strings, so rows read back as plain text and
code written against the strings keep working while callers move to the names.

Instances::

    pending -> selected -> analysed | failed
            -> ignored                          (selection rules said no, with a reason)

Studies::

    receiving -> queued -> analysing -> done | failed
              -> ignored
    done -> receiving  (a late image: the next job supersedes the result)

Jobs::

    queued -> running -> done
                      -> queued   (retry after a backoff, attempts counted across restarts)
                      -> failed   (permanent error, or attempts exhausted: dead letter)

Deliveries (one per output object and destination; nothing one does blocks another)::

    pending -> sending -> sent          (stored; final unless the destination commits)
                       -> committed     (storage commitment confirmed the object)
                       -> not_accepted  (the destination does not take this SOP class /
                                         transfer syntax: terminal, with the reason)
                       -> retrying      (transient failure, next try after a backoff)
                       -> dead          (attempts exhausted or unrecoverable: dead letter)
    sent -> retrying   (storage commitment not confirmed in time, or refused: re-sent)
    dead | not_accepted -> pending   (manual resubmit)

Evaluation runs::

    running -> succeeded | failed     (failed also when the process running it ended)
"""

from __future__ import annotations

from enum import StrEnum


class InstanceState(StrEnum):
    PENDING = "pending"
    SELECTED = "selected"
    IGNORED = "ignored"
    ANALYSED = "analysed"
    FAILED = "failed"


class StudyState(StrEnum):
    RECEIVING = "receiving"
    QUEUED = "queued"
    ANALYSING = "analysing"
    DONE = "done"
    IGNORED = "ignored"
    FAILED = "failed"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class RunState(StrEnum):
    """Evaluation runs: running -> succeeded | failed (one running row per job, enforced by
    a partial unique index)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    COMMITTED = "committed"
    NOT_ACCEPTED = "not_accepted"
    RETRYING = "retrying"
    DEAD = "dead"


# Jobs still to run (a study with one of these is not settled).
ACTIVE_JOBS = (JobState.QUEUED, JobState.RUNNING)

# Deliveries a sender may pick up once ``next_attempt_at`` has passed.
DELIVERY_DUE = (DeliveryState.PENDING, DeliveryState.RETRYING)
