"""The real node as ``make run`` starts it, a timestamping destination, and a PACS that sends.

Why a separate process: ``make run`` runs ``dicom-node serve --config config/node.yaml``, one
process (or several, once workers are processes) that the benchmark must not share a GIL or
torch's thread pool with. :class:`NodeProcess` starts exactly that command with the embedded
defaults of ``config/node.yaml`` plus the overrides a benchmark names (data folder, port,
destination, demo bundle folder), so whatever main's node does today is what is measured;
nothing of the node is re-implemented here.

:class:`Destination` is a pynetdicom Storage SCP in the benchmark process that stamps the
wall-clock time of each C-STORE just before it answers (the moment the node's sender gets
its RSP); :func:`store` is the PACS side and returns the wall-clock time of its last
C-STORE-RSP. Both clocks are the same ``time.time()``, so a latency is a plain difference.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common as c

NODE_CONFIG = c.ROOT / "config" / "node.yaml"


def settings_has(dotted: str) -> bool:
    """Whether main's node knows a configuration key (helpers add keys while this runs)."""
    from dicom_node.config import load_settings

    node: Any = load_settings(None, environ={})
    for part in dotted.split("."):
        if not hasattr(node, part):
            return False
        node = getattr(node, part)
    return True


def settings_value(dotted: str) -> Any:
    """The embedded default of ``dotted`` (None when main's node has no such key)."""
    from dicom_node.config import load_settings

    node: Any = load_settings(None, environ={})
    for part in dotted.split("."):
        node = getattr(node, part, None)
    return node


def env_for(overrides: dict[str, Any]) -> dict[str, str]:
    """``{"studies.quiet_period_s": 0}`` -> ``CXR_NODE__STUDIES__QUIET_PERIOD_S=0`` (YAML)."""
    import yaml

    out = {}
    for key, value in overrides.items():
        name = "CXR_NODE__" + "__".join(p.upper() for p in key.split("."))
        out[name] = yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()
    return out


class NodeProcess:
    """``dicom-node serve --config config/node.yaml`` plus overrides, in its own process."""

    def __init__(self, data_dir: Path, *, destination: str | None, log: Path,
                 overrides: dict[str, Any] | None = None, start_timeout: float = 600) -> None:
        self.data_dir, self.port = data_dir, c.free_port()
        if threading.current_thread() is threading.main_thread():
            # a benchmark stopped with SIGTERM (timeout, run_all) still stops its node
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        values = {"web.enabled": False, **(overrides or {})}
        unknown = [k for k in values if not settings_has(k)]
        if unknown:
            raise SystemExit(f"main's node has no configuration key {unknown}")
        # the checkout first, then whatever PYTHONPATH this process had (packages installed
        # with pip --target, as on a bare GPU machine, must reach the node too)
        path = os.pathsep.join([str(c.ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        env = {**os.environ, "PYTHONPATH": path, **env_for(values)}
        cmd = [sys.executable, "-m", "dicom_node", "serve", "--config", str(NODE_CONFIG),
               "--data-dir", str(data_dir), "--port", str(self.port)]
        if destination:
            cmd += ["--destination", destination]
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("ab")
        self._log_path, self._log_from = log, log.stat().st_size  # this run's lines only
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=c.ROOT)
        try:
            self._wait_listening(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node exited with {self.proc.returncode} at start-up; "
                                   f"see {self._log.name}")
            try:
                c.wait_for_port(self.port, timeout=1.0)
                return
            except TimeoutError:
                continue
        raise TimeoutError(f"the node did not listen within {timeout} s; see {self._log.name}")

    def wait_models(self, timeout: float) -> float:
        """Wait until the node logs that its models are loaded (after the worker's warm-up,
        where the node has one); the seconds waited."""
        start = time.monotonic()
        while True:
            with self._log_path.open("rb") as fh:
                fh.seek(self._log_from)
                text = fh.read()
            if b"models loaded: " in text:
                return time.monotonic() - start
            if b"model could not be loaded: " in text:  # the node keeps receiving: say it now
                raise RuntimeError(f"the node could not load its models; see {self._log.name}")
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node exited with {self.proc.returncode} before its "
                                   f"models were loaded; see {self._log.name}")
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"no models loaded within {timeout} s; see {self._log.name}")
            time.sleep(0.1)

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'node.db'}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Memory of a process tree (the node's workers may be processes of their own)


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            out[ppid].append(int(entry.name))
    return out


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every descendant (0 once it is gone)."""
    kids, total, todo = _children(), 0, [pid]
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class PeakRSS:
    """Samples :func:`tree_rss` every ``period`` s in a thread; ``peak`` is the largest."""

    def __init__(self, pid: int, period: float = 0.02) -> None:
        self.pid, self.period, self.peak, self.samples = pid, period, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self.samples += 1
            self._stop.wait(self.period)

    def __enter__(self) -> PeakRSS:
        self.peak = tree_rss(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))


# --------------------------------------------------------------------------------------------
# The PACS (sends) and the destination (receives results, stamps the time)


def store(port: int, files: Sequence[Path], called: str, calling: str = "PACS") -> float:
    """Send ``files`` on one association; wall-clock time of the last C-STORE-RSP."""
    import pydicom
    from pynetdicom import AE

    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    ae = AE(calling)
    for ctx in {(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in heads}:
        ae.add_requested_context(*ctx)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"the node refused the association ({called}@127.0.0.1:{port})")
    try:
        last = 0.0
        for f in files:
            status = assoc.send_c_store(f)
            last = time.time()
            if not status or int(status.Status) not in (0x0000, 0xB000, 0xB007, 0xB006):
                raise RuntimeError(f"C-STORE of {f.name} answered {status!r}")
        return last
    finally:
        assoc.release()


class Destination:
    """A pynetdicom Storage SCP (every storage class and transfer syntax) that stamps RSPs.

    ``received[study_uid]`` lists ``(sop_instance_uid, time)``; files are written only for
    the studies in ``keep`` (the floor re-sends them with DCMTK).
    """

    def __init__(self, out: Path, ae_title: str = "DEST") -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.out, self.ae_title, self.port = out, ae_title, c.free_port()
        out.mkdir(parents=True, exist_ok=True)
        self.received: dict[str, list[tuple[str, float]]] = defaultdict(list)
        self.keep: set[str] = set()
        self.files: dict[str, Path] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title)
        ae.maximum_pdu_size = 0
        syntaxes = _all_syntaxes()
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    @staticmethod
    def _study_of(event: Any) -> tuple[str, str, Any]:
        ds = event.dataset
        ds.file_meta = event.file_meta
        return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), ds

    def _on_store(self, event: Any) -> int:
        study, sop, ds = self._study_of(event)
        if study in self.keep:
            path = self.out / f"{sop}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.files[sop] = path
        with self._lock:
            self.received[study].append((sop, time.time()))
        return 0x0000

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def last(self, study_uid: str) -> float:
        with self._lock:
            return max(t for _, t in self.received[study_uid])

    def stop(self) -> None:
        self._server.shutdown()


def _all_syntaxes() -> list[str]:
    from pydicom.uid import AllTransferSyntaxes

    return [str(u) for u in AllTransferSyntaxes]
