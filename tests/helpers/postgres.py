"""A throw-away PostgreSQL cluster for tests: ``initdb`` into a temp dir, ``pg_ctl start``.

No system service: Debian's ``postgresql`` package (installed by ``make test`` through
``scripts/install-system-deps.sh --test``) provides the binaries; the cluster listens on a
free TCP port of 127.0.0.1 with its unix socket in the temp dir, with ``fsync=off`` (a test
cluster need not survive a power cut) and small buffers, and is stopped and deleted on
:meth:`PostgresCluster.stop` or at interpreter exit. ``initdb`` refuses to run as root: when
the tests run as root (here and in CI) the cluster runs as the ``postgres`` user.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

INSTALL_HINT = ("PostgreSQL's initdb/pg_ctl were not found: run `make test` (it installs "
                "Debian's postgresql package through scripts/install-system-deps.sh --test)")


class PostgresUnavailable(RuntimeError):
    """The binaries are missing or the cluster did not start; the message says why."""


def find_bindir() -> Path:
    """The directory of initdb and pg_ctl: ``pg_config --bindir``, else Debian's layout."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb") or "").resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    raise PostgresUnavailable(INSTALL_HINT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    """One cluster; :meth:`create_database` hands out fresh empty databases of it."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_user: list[str] = []
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        if os.geteuid() == 0:  # initdb: "cannot be run as root"
            self.user = "postgres"
            self._as_user = ["runuser", "-u", "postgres", "--"]
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._started = False
        atexit.register(self.stop)

    def _run(self, *args: str) -> None:
        out = subprocess.run([*self._as_user, *args], capture_output=True, text=True,
                             timeout=60)
        if out.returncode != 0:
            raise PostgresUnavailable(f"{Path(args[0]).name} failed ({out.returncode}): "
                                      f"{out.stderr.strip() or out.stdout.strip()}")

    def start(self) -> PostgresCluster:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user,
                  "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions")
        for attempt in range(3):  # the free port may be taken between the probe and the bind
            options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                       f"-c unix_socket_directories={self.root} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off "
                       "-c shared_buffers=16MB -c max_connections=200")
            self._started = True
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                          str(self.root / "server.log"), "-o", options, "-w", "-t", "30",
                          "start")
                return self
            except PostgresUnavailable as exc:
                log = self.root / "server.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                if attempt == 2:
                    raise PostgresUnavailable(f"{exc}\nserver.log: {tail}") from exc
                self.port = _free_port()
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self._started:
            self._started = False
            subprocess.run([*self._as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data),
                            "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` over TCP (as a node on another host would connect)."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(host="127.0.0.1", port=self.port, user=self.user,
                               dbname="postgres", autocommit=True)

    def create_database(self, template: str | None = None) -> str:
        """A fresh database, empty or a copy of ``template``; returns its name."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with self._admin() as conn:
            conn.execute(query)
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, closing what a test left connected to it (WITH FORCE)."""
        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))
