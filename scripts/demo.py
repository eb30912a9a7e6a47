"""``make demo``: a real PACS (Orthanc) auto-routes phantom chest radiographs to the node and
receives the SR, secondary capture and GSPS back into each study.

Starts a private Orthanc (ports 8042/4242 when free), ``dicom-node serve`` with
config/node.yaml and the data dir var/demo, uploads a few phantom studies to Orthanc, waits
for the results and prints what each study now holds. Runs until Ctrl-C, or exits once the
results are back with ``--exit-when-done``.

The demo bundles are the ones ``make run`` uses (``var/models/demo``, or the configured
``models.demo_dir``): built once by whichever of the two runs first. When they are missing,
this script builds them in the foreground, with the build's stages and progress bars on the
console, before it starts the node.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from orthanc import (  # noqa: E402 - after the path set-up above
    DEFAULT_DICOM_PORT,
    DEFAULT_HTTP_PORT,
    OrthancError,
    OrthancServer,
    free_port,
    port_is_free,
)

logger = logging.getLogger("demo")

# Analysable variants, each with another photometry / transfer syntax.
DEMO_VARIANTS = ("dx_mono2_explicit", "cr_mono1_jpeg_lossless", "dx_mono1_j2k",
                 "cr_mono2_jpegls", "dx_mono2_rle")
MODEL_ERROR = "model could not be loaded"  # dicom_node.service logs this when loading fails


class DemoError(RuntimeError):
    """The demo cannot go on (message for the user)."""


class Stop(Exception):
    """SIGTERM: stop like Ctrl-C."""


def pick_port(preferred: int) -> int:
    """``preferred`` when free, else any free port."""
    return preferred if port_is_free(preferred) else free_port()


class NodeProcess:
    """``dicom-node serve`` as a subprocess with its output in a log file."""

    def __init__(self, config: Path, data_dir: Path, port: int, destination: str,
                 log_path: Path, web_port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        cmd = [sys.executable, "-m", "dicom_node", "serve", "--config", str(config),
               "--data-dir", str(data_dir), "--port", str(port), "--destination", destination]
        if web_port is not None:
            cmd += ["--web-port", str(web_port)]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as fh:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1",
                                              **(env or {})},
                                         start_new_session=True)
        logger.info("node started (pid %d, DICOM port %d, log %s)", self.proc.pid, port,
                    log_path)

    def log(self) -> str:
        """What this run wrote to the log so far."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def check(self) -> None:
        """Raise DemoError when the node died or could not load its model."""
        if self.proc.poll() is not None:
            raise DemoError(f"the node exited with status {self.proc.returncode}; log "
                            f"{self.log_path}:\n{self.tail()}")
        for line in self.log().splitlines():
            if MODEL_ERROR in line:
                raise DemoError(f"the node has no model: {line.strip()}\n(log: {self.log_path})")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("node did not stop within %.0f s: killing it", timeout)
            self.proc.kill()
            self.proc.wait()


def wait_for_port(port: int, proc: NodeProcess, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check()
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DemoError(f"the node does not listen on port {port} after {timeout:.0f} s")


def make_studies(out_dir: Path, count: int, seed: int, rows: int, columns: int) -> list[Path]:
    """One phantom radiograph per study, variants in turn; returns the files."""
    from training.synth import make_dataset

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        variant = DEMO_VARIANTS[i % len(DEMO_VARIANTS)]
        ds = make_dataset(variant, seed=seed + i, rows=rows, columns=columns)
        path = out_dir / f"{seed + i}_{variant}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def wait_for_results(pacs: OrthancServer, studies: list[str], expected: int,
                     node: NodeProcess, timeout: float, started: float) -> None:
    """Until every study has ``expected`` series in Orthanc (prints progress, and the time
    from ``started`` (monotonic) to the first complete result)."""
    deadline = time.monotonic() + timeout
    last: list[int] = []
    first = False
    while True:
        node.check()
        counts = [len(pacs.study_series(s)) for s in studies]
        if counts != last:
            done = sum(c >= expected for c in counts)
            print(f"  results back for {done}/{len(studies)} studies "
                  f"(series per study: {counts}, expecting {expected})", flush=True)
            if done and not first:
                first = True
                print(f"  first result back {time.monotonic() - started:.1f} s after the "
                      "demo started", flush=True)
            last = counts
        if all(c >= expected for c in counts):
            return
        if time.monotonic() > deadline:
            raise DemoError(f"results not back after {timeout:.0f} s; node log: "
                            f"{node.log_path}, Orthanc log: {pacs.log_path}")
        time.sleep(1.0)


def print_summary(pacs: OrthancServer, studies: list[str]) -> None:
    print(f"\nOrthanc web UI: {pacs.explorer_url}")
    for n, study_id in enumerate(studies, 1):
        tags = pacs.study(study_id)["MainDicomTags"]
        print(f"\nStudy {n}: {tags.get('StudyDescription', '')} "
              f"(StudyInstanceUID {tags.get('StudyInstanceUID')})")
        print(f"  {pacs.explorer_url}#study?uuid={study_id}")
        for modality, description, count in pacs.series_summary(study_id):
            print(f"  series {modality:<3} {count} instance(s)  {description or '(source)'}")
    print(flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "config" / "node.yaml")
    p.add_argument("--data-dir", type=Path, default=ROOT / "var" / "demo",
                   help="node data dir; Orthanc lives in <data-dir>/orthanc")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="demo bundle folder (default: the one `make run` uses, "
                   "models.demo_dir or <storage.data_dir>/models/demo of --config)")
    p.add_argument("--studies", type=int, default=3, help="phantom studies to upload")
    p.add_argument("--seed", type=int, default=None, help="default: new studies each run")
    p.add_argument("--size", type=int, nargs=2, default=(1024, 896), metavar=("ROWS", "COLS"))
    p.add_argument("--stable-age", type=int, default=3, help="Orthanc StableAge (seconds)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds to wait for results (the first run trains the demo model)")
    p.add_argument("--exit-when-done", action="store_true",
                   help="stop everything once the results are back (exit status 0)")
    args = p.parse_args(argv)
    if args.studies < 1:
        p.error("--studies must be at least 1")
    return args


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise Stop


def shared_bundle_dir(config: Path, override: Path | None) -> Path:
    """The demo bundle folder ``make run`` uses with ``config`` (relative paths: against the
    repository root, where make runs), or ``override``."""
    from dicom_node.config import load_settings

    folder = override if override is not None else load_settings(config).demo_bundle_dir
    return folder if folder.is_absolute() else (ROOT / folder)


def ensure_bundles(folder: Path, quick: bool) -> None:
    """Build the demo bundles into ``folder`` unless they are there (console output)."""
    if folder.is_dir() and any((p / "configs" / "metadata.json").is_file()
                               for p in folder.iterdir()):
        print(f"DEMO bundles: {folder} (already built, reused)", flush=True)
        return
    print(f"No model yet: building the DEMO bundles into {folder} (once; `make run` uses "
          "the same folder).", flush=True)
    cmd = [sys.executable, "-m", "training", "demo-bundles", "--out", str(folder)]
    if quick:
        cmd.append("--quick")
    if subprocess.run(cmd, cwd=ROOT, check=False).returncode != 0:
        raise DemoError(f"building the demo bundles failed (command: {' '.join(cmd)})")


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    # the demo's own lines only: urllib3 (connection retries), PIL, pydicom stay quiet
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    for name in ("demo", "orthanc"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    from dicom_node.config import load_settings

    data_dir = args.data_dir.resolve()
    settings = load_settings(args.config, overrides={"storage.data_dir": str(data_dir)})
    o = settings.outputs
    expected = 1 + int(o.sr) + int(o.sc) + int(o.gsps)
    node_port = pick_port(settings.dicom.port)
    web_port = None if port_is_free(settings.web.port) else free_port()
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    node_env: dict[str, str] = {}

    pacs = OrthancServer(data_dir / "orthanc", node_port=node_port,
                         node_ae=settings.dicom.ae_title,
                         http_port=pick_port(DEFAULT_HTTP_PORT),
                         dicom_port=pick_port(DEFAULT_DICOM_PORT), stable_age=args.stable_age)
    node: NodeProcess | None = None
    try:
        if not settings.models.bundles:
            models = shared_bundle_dir(args.config, args.models_dir)
            ensure_bundles(models, quick=settings.models.demo_build == "quick")
            node_env["CXR_NODE__MODELS__DEMO_DIR"] = str(models)
        pacs.start()
        print(f"Orthanc running: web UI {pacs.explorer_url}, DICOM {pacs.destination}",
              flush=True)
        node = NodeProcess(args.config, data_dir, node_port, pacs.destination,
                           data_dir / "node.log", web_port, env=node_env)
        wait_for_port(node_port, node, 120)
        print(f"CXR AI node running: {settings.dicom.ae_title}@127.0.0.1:{node_port} "
              f"(log {node.log_path})", flush=True)

        files = make_studies(data_dir / "phantoms", args.studies, seed, *args.size)
        studies = [pacs.upload(f)["ParentStudy"] for f in files]
        print(f"Uploaded {len(studies)} phantom studies to Orthanc; it routes each to the node "
              f"{args.stable_age} s after its last image.", flush=True)
        wait_for_results(pacs, studies, expected, node, args.timeout, started)
        print_summary(pacs, studies)
        if args.exit_when_done:
            print("Done (--exit-when-done).", flush=True)
            return 0
        print("Running; browse the studies in Orthanc. Ctrl-C stops.", flush=True)
        while True:
            node.check()
            if pacs.proc is None or pacs.proc.poll() is not None:
                raise DemoError(f"Orthanc exited; log: {pacs.log_path}")
            time.sleep(1.0)
    except (KeyboardInterrupt, Stop):
        print("\nStopping.", flush=True)
        return 0
    except (DemoError, OrthancError, OSError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if node is not None:
            node.stop()
        pacs.stop()

if __name__ == "__main__":
    sys.exit(main())
