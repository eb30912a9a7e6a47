"""The log a PACS engineer reads: a real ``dicom-node serve`` process at INFO builds its
(quick) demo bundles, receives 5 studies from ``storescu`` (two images each), analyses them
and delivers the results to a real ``storescp``. Its log file says what the node did, one
line per event, and nothing else:

* per study at most ``PER_STUDY`` lines: association accepted, received (one summary line
  when the association is released), study ready, analysed (with its findings count),
  delivered (one line per destination);
* at most ``FIXED`` other lines (start-up, the demo build's stage lines and figures,
  shut-down, signal);
* no INFO line from a third-party logger (highdicom, pynetdicom, waitress, ...);
* no carriage return: progress bars only on a terminal, never in a log file;
* the signal logged once.
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import StoreSCP, free_port, storescu, wait_for_port, wait_until
from helpers.dicomfiles import write_phantom_study
from helpers.node import node_settings, query, spawn_node, write_config
from sqlalchemy import select

from dicom_node.store import db

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUDIES = 5
IMAGES_PER_STUDY = 2
PER_STUDY = 5
FIXED = 40
VARIANTS = ("dx_mono2_explicit", "cr_mono1_jpeg_lossless", "dx_mono2_rle", "cr_mono2_jpegls",
            "dx_mono2_explicit")
# asctime level logger [thread] message: dicom_node.logs.FORMAT
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) +(?P<name>\S+) "
                    r"\[[^\]]*\] (?P<message>.*)$")
OWN_LOGGERS = ("dicom_node", "ai", "training", "__main__")


def _run_node(tmp_path: Path) -> tuple[str, list[str]]:
    dest = StoreSCP(tmp_path / "dest", free_port())
    settings = node_settings(
        tmp_path / "node", quiet=0.5, destinations=[dest.destination],
        **{"models.demo_dir": str(tmp_path / "models"), "models.demo_build": "quick",
           "models.device": "cpu", "logging.level": "INFO", "web.enabled": True,
           "web.port": free_port()})
    log = tmp_path / "node.log"
    proc = spawn_node(write_config(settings, tmp_path / "node.yaml"), log)
    uids = []
    try:
        wait_for_port(settings.dicom.port, timeout=60)
        for index in range(STUDIES):
            uid, files = write_phantom_study(tmp_path / "in" / f"s{index}", IMAGES_PER_STUDY,
                                             seed=7100 + index, rows=384, cols=320,
                                             variant=VARIANTS[index], seed_step=10)
            uids.append(uid)
            assert storescu(settings.dicom.port, files).returncode == 0
        wait_until(lambda: len(query(settings, select(db.jobs).where(
            db.jobs.c.state == "done"))) == STUDIES, 180, what="every study analysed")
        wait_until(lambda: len(r := query(settings, select(db.deliveries))) == len(
            query(settings, select(db.outputs))) and all(d.state == "sent" for d in r), 60,
            what="every result delivered")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        dest.stop()
    return log.read_text(encoding="utf-8", errors="replace"), uids


def test_a_run_of_five_studies_logs_one_line_per_event(tmp_path: Path) -> None:
    text, uids = _run_node(tmp_path)
    assert "\r" not in text, "progress bar output in the log file"
    lines = text.splitlines()
    records = [m for m in map(RECORD.match, lines) if m]
    foreign = [m.group(0) for m in records if m.group("level") in ("INFO", "DEBUG")
               and not m.group("name").startswith(OWN_LOGGERS)]
    assert not foreign, "third-party INFO lines:\n" + "\n".join(foreign[:10])
    per_study = {uid: [line for line in lines if uid in line] for uid in uids}
    study_lines = {line for found in per_study.values() for line in found}
    other = [line for line in lines if line not in study_lines]
    counts = {uid[-12:]: len(found) for uid, found in per_study.items()}
    print(f"\nlog lines: {len(lines)} in all, per study {counts}, other {len(other)}")
    for uid, found in per_study.items():
        joined = "\n".join(found)
        assert len(found) <= PER_STUDY, f"study {uid}: {len(found)} lines\n{joined}"
        assert f"received {IMAGES_PER_STUDY} image(s) of study {uid}" in joined, joined
        assert f"study {uid} ready" in joined, joined
        assert re.search(rf"study {re.escape(uid)} analysed \(job \d+\): 2 image\(s\), \d+ "
                         r"positive finding\(s\)", joined), \
            joined
        assert re.search(rf"delivered \d object\(s\) of study {re.escape(uid)} to DEST", joined), \
            joined
    assert len(other) <= FIXED, "\n".join(other)
    assert len(lines) <= FIXED + PER_STUDY * STUDIES
    assert sum("stopping" in line for line in lines) == 1, "\n".join(other)
    assert any("[1/2] demo classifier" in line for line in lines), "\n".join(other)
