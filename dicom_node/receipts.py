"""What each association brought, told once when it ends.

The C-STORE path notes every instance it stored (per study) under the association's peer
address; when the connection closes, :meth:`Receipts.close` logs one INFO line per study,
``received 2 image(s) of study 1.2.3 from 'PACS' (10.0.0.5:50346)``, instead of one line per
instance (those stay at DEBUG). UIDs, AE titles and addresses only: no patient data.

The same tallies tell study completion which studies an association's release completes
(:meth:`Receipts.release`): those it stored images of, unless another association that
stored images of them is still open, or one that did ended without a release (an abort, a
dropped connection) while this one was open. Those wait for the quiet period instead.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class _Tally:
    calling_ae: str
    stored: Counter[str] = field(default_factory=Counter)  # study UID -> new instances
    duplicates: Counter[str] = field(default_factory=Counter)  # identical bytes again
    released: bool = False  # A-RELEASE done: no longer holds its studies open
    # studies an overlapping association stored into and left without a release
    unsettled: set[str] = field(default_factory=set)


class Receipts:
    """Thread-safe per-connection tallies, keyed by the peer's ``address:port``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, _Tally] = {}

    def _tally(self, peer: str, calling_ae: str) -> _Tally:
        tally = self._open.get(peer)
        if tally is None:
            tally = self._open[peer] = _Tally(calling_ae)
        return tally

    def stored(self, peer: str | None, calling_ae: str, study_uid: str) -> None:
        if peer is None:
            return
        with self._lock:
            self._tally(peer, calling_ae).stored[study_uid] += 1

    def duplicate(self, peer: str | None, calling_ae: str, study_uid: str) -> None:
        if peer is None:
            return
        with self._lock:
            self._tally(peer, calling_ae).duplicates[study_uid] += 1

    def release(self, peer: str) -> list[str]:
        """The association from ``peer`` was released: the studies it stored images of that
        this release completes (see the module docstring), sorted."""
        with self._lock:
            tally = self._open.get(peer)
            if tally is None:
                return []
            tally.released = True
            still_open: set[str] = set()
            for other in self._open.values():
                if not other.released:
                    still_open.update(other.stored)
            return sorted(set(tally.stored) - still_open - tally.unsettled)

    def close(self, peer: str) -> int:
        """Log the summary of the connection from ``peer``; returns the images it stored.

        A connection that ends without a release leaves its studies unsettled for every
        association still open: their releases do not complete them."""
        with self._lock:
            tally = self._open.pop(peer, None)
            if tally is not None and not tally.released and tally.stored:
                for other in self._open.values():
                    other.unsettled.update(tally.stored)
        if tally is None:
            return 0
        for study_uid in sorted(set(tally.stored) | set(tally.duplicates)):
            new, again = tally.stored[study_uid], tally.duplicates[study_uid]
            extra = f" ({again} duplicate(s) with identical bytes, not analysed again)" \
                if again else ""
            logger.info("received %d image(s) of study %s from %r (%s)%s", new, study_uid,
                        tally.calling_ae, peer, extra)
        return sum(tally.stored.values())
