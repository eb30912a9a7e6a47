"""Roles of a node process, and who a process is when it takes leases.

One code base, five roles (``dicom-node serve --role``): a *receiver* runs the DICOM
listener, ingest and study assembly (it never decodes pixels nor loads a model); a *worker*
claims analysis jobs; a *sender* delivers results; *web* serves the dashboard and API; the
*scheduler* runs the evaluation schedule, retention and audit forwarding, exactly once per
database (:mod:`dicom_node.singleton`). ``all`` is every role in one process, the default.
Each role runs on its own against the same database and the same spool directory
(``storage.data_dir`` on a shared filesystem).

Owner ids. Every lease a process takes starts with its :class:`ProcessIdentity`: host,
data directory, role label and a *slot* number, held with an ``flock`` on a file under
``<data_dir>/locks/`` for the life of the process. Two live processes of one role on one
host hold different slots, so their owner ids differ; a process that starts in a slot
proves, by taking its lock, that the previous holder of that slot is dead, so the jobs
leased under that slot's prefix are its own to re-queue at once (the kernel drops the lock
when a process dies, kill -9 included). Jobs of any other owner are left to their lease.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

ROLES = ("receiver", "worker", "sender", "web", "scheduler")
ALL = frozenset(ROLES)
MAX_SLOTS = 256  # processes of one role label on one host


def parse_roles(text: str) -> frozenset[str]:
    """``all`` or a comma list of roles (``receiver,web``); ValueError names a bad one."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("no role given (expected all or a comma list of "
                         f"{', '.join(ROLES)})")
    if "all" in names:
        return ALL
    unknown = [n for n in names if n not in ROLES]
    if unknown:
        raise ValueError(f"unknown role {', '.join(unknown)} (expected all or a comma list "
                         f"of {', '.join(ROLES)})")
    return frozenset(names)


def role_label(roles: frozenset[str]) -> str:
    """``all``, or the roles in their canonical order joined by ``+``."""
    return "all" if roles == ALL else "+".join(r for r in ROLES if r in roles)


@dataclass
class ProcessIdentity:
    """This process's owner id (``node_id``) and the slot lock that makes it its own."""

    node_id: str
    slot: int
    lock_path: Path
    _fd: int

    def release(self) -> None:
        """Give the slot up (the node's stop; a dead process's lock goes by itself)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def try_flock(path: Path) -> int | None:
    """An exclusive ``flock`` on ``path`` (created if needed) with this pid written in it;
    the open descriptor, or None while another process holds it. The kernel drops the lock
    when the holder dies, however it dies."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def data_dir_digest(data_dir: Path) -> str:
    return hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:8]


def claim_identity(data_dir: Path, roles: frozenset[str]) -> ProcessIdentity:
    """Take the lowest free slot of this host and role label; its owner id is
    ``host:digest:label.slot`` (the leases of its worker threads add ``:pid:n``)."""
    host = socket.gethostname()
    label = role_label(roles)
    folder = data_dir / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    for slot in range(MAX_SLOTS):
        path = folder / f"{host}.{label}.{slot}.lock"
        fd = try_flock(path)
        if fd is None:
            continue
        node_id = f"{host}:{data_dir_digest(data_dir)}:{label}.{slot}"
        return ProcessIdentity(node_id, slot, path, fd)
    raise OSError(f"more than {MAX_SLOTS} {label} processes on {host} share {data_dir}")
