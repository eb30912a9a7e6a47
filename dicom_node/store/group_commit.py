"""Group commit: the instance rows of every association in one transaction, one fsync.

On SQLite the node's study assembler hands its writes (a study's job) to the same writer, so
within a process the rows and the assembly never wait for each other's write lock.

With SQLite ``synchronous=FULL`` each commit is an fsync of the WAL, the largest single cost
of a small C-STORE. Callers (the C-STORE handlers of all associations) hand their statements
to one writer thread; it runs what has queued up since its last commit in ONE transaction
and wakes each caller only once that transaction is durable, so an ACK still follows its
row's commit (ACK subset of DURABLE) while N concurrent instances cost one fsync.

No caller waits for a batch to fill: the writer takes what is queued, and lingers (at most
``linger_s``) only while other callers have announced themselves
(:meth:`GroupCommit.announce`: the listener does so when a data set starts to arrive) and
not yet submitted, the way PostgreSQL's ``commit_delay`` waits for ``commit_siblings``.
One association alone therefore pays no delay; a small instance committed while a large
one is still in transfer on another association pays at most ``linger_s`` (2 ms).

Each piece of work runs in its own SAVEPOINT: one that raises is rolled back alone and its
caller gets the exception; the others commit. A failed COMMIT fails every caller of the
batch. Work may register directories to fsync (:meth:`Batch.fsync_dir`): they are fsynced
once per batch, before the COMMIT, so a row is never durable before the rename of its file.

The thread starts on demand and ends after ``idle_s`` without work, so an owner needs no
stop call.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine

from dicom_node.spool import fsync_dir

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Batch:
    """What one transaction's work shares: the directories to fsync before its COMMIT."""

    def __init__(self) -> None:
        self.dirs: set[Path] = set()

    def fsync_dir(self, path: Path) -> None:
        self.dirs.add(path)


Work = Callable[[Connection, Batch], T]


@dataclass
class _Item(Generic[T]):
    work: Work[T]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class Announcement:
    """One caller announced to a :class:`GroupCommit`; :meth:`withdraw` is idempotent."""

    def __init__(self, owner: GroupCommit) -> None:
        self._owner: GroupCommit | None = owner

    def withdraw(self) -> None:
        owner = self._owner
        if owner is None:
            return
        with owner._lock:
            if self._owner is not None:
                self._owner = None
                owner._announced -= 1


class GroupCommit:
    """One writer thread batching the transactions of many callers (see the module doc)."""

    def __init__(self, engine: Engine, *, max_batch: int = 64, linger_s: float = 0.002,
                 idle_s: float = 2.0, name: str = "group-commit") -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.linger_s = linger_s
        self.idle_s = idle_s
        self.name = name
        self.commits = 0  # transactions committed (tests and benchmarks read it)
        self._queue: queue.Queue[_Item[Any]] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._announced = 0  # live announcements: callers on their way to run()

    @property
    def announced(self) -> int:
        """Callers announced and not yet submitted or withdrawn."""
        return self._announced

    def announce(self) -> Announcement:
        """A caller that will probably submit soon: the writer may wait for it (at most
        ``linger_s``) until it submits or withdraws."""
        with self._lock:
            self._announced += 1
        return Announcement(self)

    @contextmanager
    def expect(self, announcement: Announcement | None = None) -> Iterator[Announcement]:
        """``announcement`` (a new one when None) for the block, withdrawn at its end."""
        announced = announcement or self.announce()
        try:
            yield announced
        finally:
            announced.withdraw()

    def run(self, work: Work[T], timeout_s: float | None = None,
            announcement: Announcement | None = None) -> T:
        """Run ``work(conn, batch)`` in the next batch; return once that batch is committed.

        Raises what ``work`` raised, or what the COMMIT raised, or TimeoutError.
        """
        item: _Item[T] = _Item(work)
        self._queue.put(item)
        if announcement is not None:  # after the put: never neither queued nor announced
            announcement.withdraw()
        self._ensure_thread()
        if not item.done.wait(timeout_s):
            raise TimeoutError(f"{self.name}: no commit within {timeout_s} s")
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[no-any-return]

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            self._commit(self._gather(first))

    def _gather(self, first: _Item[Any]) -> list[_Item[Any]]:
        batch = [first]
        deadline = time.monotonic() + self.linger_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if left <= 0 or self._announced == 0:  # nobody else on the way
                break
            try:
                batch.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _commit(self, items: list[_Item[Any]]) -> None:
        batch = Batch()
        try:
            with self.engine.begin() as conn:
                for item in items:
                    savepoint = conn.begin_nested()
                    try:
                        item.result = item.work(conn, batch)
                        savepoint.commit()
                    except Exception as exc:  # noqa: BLE001 - the caller gets it, others go on
                        savepoint.rollback()
                        item.error = exc
                for path in sorted(batch.dirs):
                    fsync_dir(path)
            self.commits += 1
        except Exception as exc:  # noqa: BLE001 - the COMMIT (or a dir fsync): all of them
            logger.error("%s: batch of %d failed: %s", self.name, len(items),
                         type(exc).__name__)
            for item in items:
                item.error = item.error or exc
        finally:
            for item in items:
                item.done.set()
