"""The spool: received instances written durably, byte for byte, before the ACK.

Layout under ``<data_dir>/spool``::

    tmp/                  partial writes and C-STORE data sets in transfer (pynetdicom
                          streams each received data set here, so adopting it is a rename
                          on the same filesystem); removed at start-up
    instances/ab/<h>.<t>.dcm  accepted instances; <h> = sha256 of the SOP Instance UID,
                          <t> a random token of the receipt, so two receipts of one UID
                          (two receivers, the same UID with other bytes) never share a
                          name and none can overwrite an acknowledged file; the row keeps
                          the name (``instances.path``): older spools' ``<h>.dcm`` rows stay
                          valid
    quarantine/<h>.dcm    unusable or conflicting input, kept with a reason in the DB
    results/ab/<h>.dcm    result objects (SR, SC, GSPS) waiting for or after delivery

File names never come from DICOM values: they are hashes, so a UID such as ``../x``
cannot escape the spool.

Watermarks: once the spool filesystem is fuller than the high watermark the spool stops
accepting instances (C-STORE answers Out of Resources) and accepts again only below the low
watermark, so a disk hovering at the limit does not flap between refusing and accepting.
The disk-usage source (:mod:`dicom_node.disk`, the node's one measurement) is injectable:
tests fake a full disk.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dicom_node import disk
from dicom_node.disk import DiskUsage, DiskUsageSource
from dicom_node.errors import SpoolError, SpoolFullError
from dicom_node.tap import Tap

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredFile:
    relpath: str
    size: int
    sha256: str


class Watermarks:
    """Refuse above ``high_pct`` used, accept again only below ``low_pct`` (hysteresis)."""

    def __init__(self, high_pct: float = 100.0, low_pct: float = 100.0) -> None:
        if low_pct > high_pct:
            raise ValueError(f"low watermark {low_pct} % is above the high one {high_pct} %")
        self.high_pct = high_pct
        self.low_pct = low_pct
        self.refusing = False
        self._lock = threading.Lock()

    def update(self, used_pct: float) -> bool:
        """Feed the current usage; returns True while instances must be refused."""
        with self._lock:
            if not self.refusing and used_pct > self.high_pct:
                self.refusing = True
                logger.warning("spool %.1f %% used, above the high watermark %.1f %%: "
                               "refusing instances (Out of Resources)", used_pct, self.high_pct)
            elif self.refusing and used_pct < self.low_pct:
                self.refusing = False
                logger.warning("spool %.1f %% used, below the low watermark %.1f %%: "
                               "accepting instances again", used_pct, self.low_pct)
            return self.refusing


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """fsync a directory: the renames into it are durable after this."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Linux sync_file_range(2): start writing a range of a file back without waiting for it
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux: no early writeback
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range_fn = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``offset`` to disk,
    without waiting (``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so the fsync that makes
    the file durable later finds little left to write. Durability is still that fsync's:
    this only moves the disk's work earlier. False where it is unavailable or refused."""
    fn = _sync_file_range_fn
    if fn is None or length <= 0:
        return False
    return fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0


class Spool:
    """Durable file store for received instances and quarantined input."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0,
                 watermarks: Watermarks | None = None,
                 disk_usage: DiskUsageSource | None = None) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.watermarks = watermarks or Watermarks()
        self.disk_usage: DiskUsageSource = disk_usage or (lambda: disk.measure(self.root))
        for sub in ("tmp", "instances", "quarantine", "results"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def tmp_dir(self) -> Path:
        """Where data sets in transfer are written: the spool's filesystem, cleaned at start."""
        return self.root / "tmp"

    def usage(self) -> DiskUsage:
        return self.disk_usage()

    def refusing(self) -> bool:
        """True while the spool filesystem is above its watermarks (see :class:`Watermarks`)."""
        return self.watermarks.update(self.usage().used_pct)

    def clean_tmp(self, older_than_s: float = 0.0) -> int:
        """Remove partial writes left by a crash; returns how many were removed. With
        ``older_than_s`` only files not modified for that long: other processes sharing the
        spool (roles apart) may be writing the younger ones."""
        n = 0
        cutoff = time.time() - older_than_s
        for p in (self.root / "tmp").iterdir():
            try:
                if older_than_s and p.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue  # its writer renamed it meanwhile
            p.unlink(missing_ok=True)
            n += 1
        if n:
            logger.info("removed %d partial spool files", n)
        return n

    def free_bytes(self) -> int:
        return self.usage().free_bytes

    @staticmethod
    def name_for(sop_instance_uid: str) -> str:
        return hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()[:40]

    def _write(self, chunks: Iterable[bytes], final: Path) -> StoredFile:
        tmp = self.root / "tmp" / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._error(exc, final.name) from exc
        return StoredFile(str(final.relative_to(self.root)), size, digest.hexdigest())

    def write_tmp(self, chunks: Iterable[bytes], tap: Tap | None = None) -> Path:
        """Write bytes to a new file under ``tmp/`` (not yet durable: see :meth:`adopt`),
        feeding them to ``tap`` too."""
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    if tap is not None:
                        tap.feed(chunk)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._error(exc, tmp.name) from exc
        return tmp

    def adopt(self, tmp: Path, sop_instance_uid: str, sha256: str) -> StoredFile:
        """Make a received file under ``tmp/`` a durable instance: fsync, rename, fsync dir."""
        return self._move(tmp, self.instance_path(sop_instance_uid), sha256)

    def instance_path(self, sop_instance_uid: str, token: str | None = None) -> Path:
        """Where an instance lives: a hash of its UID (never the UID itself), with the
        ``token`` of its receipt (see the layout above; None: the name without one)."""
        name = self.name_for(sop_instance_uid)
        leaf = f"{name}.{token}.dcm" if token else f"{name}.dcm"
        return self.root / "instances" / name[:2] / leaf

    def sync_received(self, tmp: Path) -> int:
        """First half of :meth:`adopt`, in the caller's thread: the file under ``tmp/`` is
        checked, room for it checked and its bytes fsynced; returns its size.

        The second half, :meth:`place`, runs in the group commit's writer, so the directory
        fsync is shared by a batch (see :mod:`dicom_node.store.group_commit`).
        """
        if self.tmp_dir.resolve() != tmp.resolve().parent:
            raise SpoolError(f"{tmp.name} is not a file under the spool's tmp/")
        try:
            size = tmp.stat().st_size
            self.check_space(size)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if isinstance(exc, SpoolError):
                raise
            raise self._error(exc, tmp.name) from exc
        return size

    def place(self, tmp: Path, sop_instance_uid: str, sha256: str, size: int
              ) -> tuple[StoredFile, list[Path]]:
        """Rename a file synced by :meth:`sync_received` to a new instance name of its own
        (a fresh token: it cannot replace any other file, an acknowledged one least of
        all); returns it and the directories the caller must fsync before the file counts
        as durable (its own, and ``instances/`` when that directory was new)."""
        final = self.instance_path(sop_instance_uid, secrets.token_hex(8))
        dirs = [final.parent]
        try:
            if not final.parent.is_dir():
                final.parent.mkdir(parents=True, exist_ok=True)
                dirs.append(final.parent.parent)
            os.replace(tmp, final)
        except OSError as exc:
            raise self._error(exc, final.name) from exc
        return StoredFile(str(final.relative_to(self.root)), size, sha256), dirs

    def unplace(self, relpath: str) -> Path:
        """Take a placed instance file whose row was never written (its receipt lost the
        insert) back under ``tmp/``, to be quarantined or removed from there."""
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            os.replace(self.path(relpath), tmp)
        except OSError as exc:
            raise self._error(exc, tmp.name) from exc
        return tmp

    def quarantine_file(self, tmp: Path) -> StoredFile:
        """Keep an unusable received file (under ``tmp/``) for inspection, durably."""
        return self._move(tmp, self.root / "quarantine" / f"{uuid.uuid4().hex}.dcm",
                          file_sha256(tmp))

    def _move(self, tmp: Path, final: Path, sha256: str) -> StoredFile:
        if self.tmp_dir.resolve() != tmp.resolve().parent:
            raise SpoolError(f"{tmp.name} is not a file under the spool's tmp/")
        try:
            size = tmp.stat().st_size
            self.check_space(size)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, SpoolError):
                raise
            raise self._error(exc, final.name) from exc
        return StoredFile(str(final.relative_to(self.root)), size, sha256)

    @staticmethod
    def _error(exc: OSError, name: str) -> SpoolError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return SpoolFullError(f"spool is full while writing {name}")
        return SpoolError(f"cannot write {name}: {exc.strerror}")

    def check_space(self, incoming: int) -> None:
        free = self.free_bytes()
        if free < self.min_free_bytes + incoming:
            raise SpoolFullError(
                f"spool free space {free} B is below the floor {self.min_free_bytes} B "
                f"plus the incoming {incoming} B"
            )

    def store(self, sop_instance_uid: str, chunks: Iterable[bytes], incoming: int) -> StoredFile:
        """Write an accepted instance durably (file fsynced, directory fsynced)."""
        self.check_space(incoming)
        name = self.name_for(sop_instance_uid)
        return self._write(chunks, self.root / "instances" / name[:2] / f"{name}.dcm")

    def quarantine(self, chunks: Iterable[bytes], incoming: int) -> StoredFile:
        """Keep unusable input for inspection under a random name."""
        self.check_space(incoming)
        return self._write(chunks, self.root / "quarantine" / f"{uuid.uuid4().hex}.dcm")

    def store_result(self, sop_instance_uid: str, data: bytes) -> StoredFile:
        """Write a result object (SR, SC, GSPS); same UID, same name, so re-runs overwrite."""
        name = self.name_for(sop_instance_uid)
        return self._write([data], self.root / "results" / name[:2] / f"{name}.dcm")

    def path(self, relpath: str) -> Path:
        p = (self.root / relpath).resolve()
        if self.root.resolve() not in p.parents:
            raise SpoolError(f"path {relpath!r} is outside the spool")
        return p
