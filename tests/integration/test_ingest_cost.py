"""What one received instance costs the node, COUNTED around real storescu sends to the real
listener (issue 11): one header parse from memory, no file read back, no pixel decode; and
the rows of parallel associations share SQLite commits (group commit) while every
acknowledged instance is in the database and, byte-exact to its recorded hash, in the spool.
"""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pydicom.pixels.decoders.base as decoders
import pytest
from conftest import free_port, require_tool
from helpers.counting import count_calls
from helpers.dicomfiles import make_image, write
from sqlalchemy import event, select

from dicom_node import ingest, tap, transport
from dicom_node.config import DicomSettings
from dicom_node.ingest import Ingestor
from dicom_node.scp import start_scp
from dicom_node.spool import Spool
from dicom_node.store import db

pytestmark = pytest.mark.integration


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[Ingestor, int]]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    ingestor = Ingestor(engine, Spool(tmp_path / "spool"), max_instance_bytes=50_000_000)
    settings = DicomSettings(ae_title="CXR_AI", port=free_port())
    servers = start_scp(settings, ingestor)
    yield ingestor, settings.port
    for server in servers:
        server.shutdown()


def _images(folder: Path, n: int, study: str | None = None) -> list[Path]:
    # 300 x 260 x 16 bit: the data set is longer than the 64 kB tap, as a real image is
    return [write(make_image(study_uid=study, seed=i), folder) for i in range(n)]


def _storescu(port: int, files: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen([require_tool("storescu"), "-v", "-xe", "-aec", "CXR_AI",
                             "-aet", "PACS", "127.0.0.1", str(port), *map(str, files)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _acknowledged(procs: list[subprocess.Popen[str]]) -> int:
    """C-STOREs answered Success, from storescu's own log."""
    n = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        n += out.count("Received Store Response (Success)")
    return n


def test_each_header_parsed_once_from_memory_and_no_pixel_decoded(
        listener: tuple[Ingestor, int], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ingestor, port = listener
    files = _images(tmp_path / "in", 6)
    calls: Counter[str] = Counter()
    count_calls(monkeypatch, calls, ingest, "parse_header", "header parse")
    count_calls(monkeypatch, calls, ingest, "_parse_file", "header read from the file")
    count_calls(monkeypatch, calls, ingest, "file_sha256", "file read back to hash")
    count_calls(monkeypatch, calls, pydicom, "dcmread", "dcmread")
    count_calls(monkeypatch, calls, pydicom.filereader, "dcmread", "dcmread")
    count_calls(monkeypatch, calls, pydicom.dataset.Dataset, "convert_pixel_data", "decode")
    count_calls(monkeypatch, calls, pydicom.pixels, "pixel_array", "decode")
    count_calls(monkeypatch, calls, pydicom.pixels, "iter_pixels", "decode")
    count_calls(monkeypatch, calls, decoders.Decoder, "as_array", "decode")
    count_calls(monkeypatch, calls, decoders.Decoder, "iter_array", "decode")

    assert _acknowledged([_storescu(port, files)]) == len(files)
    assert calls == Counter({"header parse": len(files)})
    monkeypatch.undo()
    with ingestor.engine.connect() as conn:
        rows = conn.execute(select(db.instances)).all()
    assert len(rows) == len(files) and all(r.selection for r in rows)  # parsed in full


def test_parallel_associations_share_commits_and_every_ack_is_durable(
        listener: tuple[Ingestor, int], tmp_path: Path) -> None:
    ingestor, port = listener
    files = _images(tmp_path / "in", 20, study="1.2.826.0.1.3680043.8.498.11")
    writer_commits: list[int] = []

    @event.listens_for(ingestor.engine, "commit")
    def _commit(_conn: Any) -> None:  # the instance rows' transactions, not the audit ones
        if threading.current_thread().name == ingestor.writer.name:
            writer_commits.append(1)

    # the writer waits for data sets in transfer at most linger_s (2 ms by default, what the
    # benchmark measures); longer here, so sharing does not hang on this machine's scheduling
    ingestor.writer.linger_s = 0.2
    procs = [_storescu(port, files[i::4]) for i in range(4)]
    assert _acknowledged(procs) == len(files)

    assert 1 <= len(writer_commits) < len(files), writer_commits
    assert len(writer_commits) == ingestor.writer.commits
    with ingestor.engine.connect() as conn:
        rows = {r.sop_instance_uid: r for r in conn.execute(select(db.instances))}
        [study] = conn.execute(select(db.studies)).all()
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert set(rows) == sent and study.state == "receiving"
    for row in rows.values():
        data = ingestor.spool.path(row.path).read_bytes()
        assert len(data) == row.size and hashlib.sha256(data).hexdigest() == row.sha256
    assert not any(ingestor.spool.tmp_dir.iterdir())
    assert ingestor.writer.announced == 0  # every data set's announcement withdrawn


def test_large_instances_hashed_beside_the_receiver_and_written_back_early(
        listener: tuple[Ingestor, int], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An 11 MB DX image through storescu: hashed in a thread of its own (not the thread
    reading the socket), its bytes handed to the disk's writeback every 4 MB as they arrive,
    and still fsynced before the ACK, byte-exact to its recorded hash."""
    ingestor, port = listener
    files = [write(make_image(seed=i, rows=2600, cols=2200), tmp_path / "in") for i in range(2)]
    calls: Counter[str] = Counter()
    count_calls(monkeypatch, calls, ingest, "file_sha256", "file read back to hash")
    count_calls(monkeypatch, calls, tap.Tap, "_start_hasher", "hashing thread")
    count_calls(monkeypatch, calls, ingestor.spool, "sync_received", "fsync before the ACK")
    ranges: list[tuple[int, int, bool]] = []
    real_writeback = transport.start_writeback

    def writeback(fd: int, offset: int, length: int) -> bool:
        asked = real_writeback(fd, offset, length)
        ranges.append((offset, length, asked))
        return asked

    monkeypatch.setattr(transport, "start_writeback", writeback)

    assert _acknowledged([_storescu(port, files)]) == len(files)
    assert calls == Counter({"hashing thread": 2, "fsync before the ACK": 2})
    deadline = time.monotonic() + 10  # each ended with its data set
    while any(t.name == "tap-hash" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a hashing thread outlived its data set"
        time.sleep(0.01)
    # per file: contiguous ranges from its first byte, each at least WRITEBACK_BYTES
    sizes = sorted(f.stat().st_size for f in files)
    starts = [i for i, (offset, _, _) in enumerate(ranges) if offset == 0]
    assert len(starts) == len(files), ranges
    for begin, end in zip(starts, [*starts[1:], len(ranges)], strict=True):
        covered = 0
        for offset, length, asked in ranges[begin:end]:
            assert offset == covered and length >= transport.WRITEBACK_BYTES and asked
            covered += length
        assert sizes[0] - transport.WRITEBACK_BYTES < covered <= sizes[-1] + 1024, ranges
    with ingestor.engine.connect() as conn:
        rows = conn.execute(select(db.instances)).all()
    assert len(rows) == len(files)
    for row in rows:
        data = ingestor.spool.path(row.path).read_bytes()
        assert len(data) == row.size and hashlib.sha256(data).hexdigest() == row.sha256
