"""The log filter of the entry points: every record a configured handler writes, pydicom's
warnings included, carries no identifying value, whatever the message format."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator

import pydicom
import pytest
from pydicom.dataset import Dataset
from test_phi import malformed_header

from dicom_node import logs
from dicom_node.cli import main
from dicom_node.phi import REDACTED, remember_values

CANARY_NAME = "Qlx^Canarylogname"
CANARY_ID = "CANARYLOGPID31"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """``configure_logging`` at DEBUG into a string; the global logging state restored."""
    stream = io.StringIO()
    with logs.logging_configured("DEBUG", logging.StreamHandler(stream)):
        yield stream


def test_an_in_process_command_leaves_logging_as_it_was(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The CLI called in-process (tests, tools) must not leave its stderr handler, levels or
    warnings capture behind: a later test's closed capture stream would get its records."""
    root = logging.getLogger()
    before = (list(root.handlers), root.level, logging.getLogger("highdicom").level,
              logging._warnings_showwarning)  # type: ignore[attr-defined]
    assert main(["status", "--data-dir", str(tmp_path / "node")]) == 0
    after = (list(root.handlers), root.level, logging.getLogger("highdicom").level,
             logging._warnings_showwarning)  # type: ignore[attr-defined]
    assert after == before


def test_messages_arguments_and_tracebacks_are_scrubbed(log_stream: io.StringIO) -> None:
    remember_values([CANARY_ID], names=[CANARY_NAME])
    log = logging.getLogger("dicom_node.test")
    log.debug("study of %s (%s)", CANARY_NAME, CANARY_ID.lower())
    try:
        raise ValueError(f"bad header of {CANARY_NAME.replace('^', ' ')}")
    except ValueError:
        log.exception("job %d crashed", 7)
    log.warning("format %s %s", "too few")  # a broken call is shown, not raised
    text = log_stream.getvalue().lower()
    for value in (CANARY_ID, "canarylogname", "qlx"):
        assert value.lower() not in text, text
    assert text.count(REDACTED) >= 3 and "job 7 crashed" in text and "traceback" in text
    assert "valueerror: bad header of [redacted]" in text


def test_pydicom_warnings_become_scrubbed_records(log_stream: io.StringIO) -> None:
    """A path that does not use read_untrusted: plain dcmread, values copied into a new
    dataset (as output building does): pydicom warns, quoting the value."""
    source = malformed_header()  # never seen by remember_phi: only the patterns protect
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        target = Dataset()
        target.PatientBirthDate = source.PatientBirthDate
        target.PatientID = source.PatientID
    text = log_stream.getvalue()
    assert "Invalid value for VR DA: [redacted]" in text, text  # the warning did arrive
    assert "py.warnings" in text and "canary" not in text.lower()


def test_every_handler_of_the_root_gets_the_filter() -> None:
    root = logging.getLogger()
    other = logging.StreamHandler(io.StringIO())
    root.addHandler(other)
    mine = None
    try:
        mine = logs.configure_logging("INFO", logging.StreamHandler(io.StringIO()))
        again = logs.configure_logging("INFO", logging.StreamHandler(io.StringIO()))
        assert mine not in root.handlers and again in root.handlers  # replaced, not stacked
        assert any(isinstance(f, logs.PhiRedactingFilter) for f in other.filters)
        assert logging.getLogger("pydicom").level == logging.ERROR
        mine = again
    finally:
        logging.captureWarnings(False)
        root.removeHandler(other)
        if mine is not None:
            root.removeHandler(mine)


def test_cli_configures_the_scrubbing_handler(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from dicom_node import cli

    root = logging.getLogger()
    before = list(root.handlers)
    seen: list[logging.Handler] = []
    command = cli._run

    def spy(settings, args):  # type: ignore[no-untyped-def]
        seen.extend(h for h in root.handlers if h not in before)  # while the command runs
        return command(settings, args)

    monkeypatch.setattr(cli, "_run", spy)
    assert main(["check-config", "--data-dir", str(tmp_path), "--log-level", "DEBUG"]) == 0
    assert len(seen) == 1
    assert any(isinstance(f, logs.PhiRedactingFilter) for f in seen[0].filters)
    assert pydicom.__version__  # the CLI imported nothing that broke pydicom's state


def test_third_party_info_is_held_back_unless_debug() -> None:
    """highdicom says ~26 INFO lines per result, waitress, APScheduler and urllib3 theirs:
    at INFO the node's handler sees none of them, at DEBUG all (pynetdicom: WARNING)."""
    root = logging.getLogger()
    levels = {n: logging.getLogger(n).level for n in ("pydicom", *logs.THIRD_PARTY)}
    stream = io.StringIO()
    try:
        logs.configure_logging("INFO", logging.StreamHandler(stream))
        for name in ("highdicom.base", "waitress", "apscheduler.scheduler",
                     "urllib3.connectionpool", "matplotlib.font_manager", "PIL.PngImagePlugin",
                     "monai", "pynetdicom.assoc"):
            logging.getLogger(name).info("library chatter from %s", name)
        logging.getLogger("highdicom.sr").warning("a library warning")
        logging.getLogger("dicom_node.worker").info("study 1.2.3 analysed")
        lines = stream.getvalue().splitlines()
        assert [line.split(None, 3)[3] for line in lines] == [
            "highdicom.sr [MainThread] a library warning",
            "dicom_node.worker [MainThread] study 1.2.3 analysed"]
        logs.configure_logging("DEBUG", logging.StreamHandler(stream))
        logging.getLogger("highdicom.base").info("copy attributes of module")
        logging.getLogger("pynetdicom.assoc").info("pdu dump")
        text = stream.getvalue()
        assert "copy attributes of module" in text and "pdu dump" not in text
    finally:
        logging.captureWarnings(False)
        for h in [h for h in root.handlers if getattr(h, "_cxr_node", False)]:
            root.removeHandler(h)
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)
