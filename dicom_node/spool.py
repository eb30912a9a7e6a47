"""The spool: received instances written durably, byte for byte, before the ACK.

Layout under ``<data_dir>/spool``::

    tmp/                  partial writes (removed at start-up)
    instances/ab/<h>.dcm  accepted instances; <h> = sha256 of the SOP Instance UID
    quarantine/<h>.dcm    unusable or conflicting input, kept with a reason in the DB
    results/ab/<h>.dcm    result objects (SR, SC, GSPS) waiting for or after delivery

File names never come from DICOM values: they are hashes, so a UID such as ``../x``
cannot escape the spool.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import SpoolError, SpoolFullError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredFile:
    relpath: str
    size: int
    sha256: str


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable file store for received instances and quarantined input."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        for sub in ("tmp", "instances", "quarantine", "results"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def clean_tmp(self) -> int:
        """Remove partial writes left by a crash; returns how many were removed."""
        n = 0
        for p in (self.root / "tmp").iterdir():
            p.unlink(missing_ok=True)
            n += 1
        if n:
            logger.info("removed %d partial spool files", n)
        return n

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

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
            _fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError(f"spool is full while writing {final.name}") from exc
            raise SpoolError(f"cannot write {final.name}: {exc.strerror}") from exc
        return StoredFile(str(final.relative_to(self.root)), size, digest.hexdigest())

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
