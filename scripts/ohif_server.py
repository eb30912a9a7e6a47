"""OHIF Viewer v3 for a person or a test: the built site from npm, served same-origin with
Orthanc's DICOMweb behind it.

``@ohif/app`` on npm ships the built viewer in ``package/dist/`` (``index.html``,
``app-config.js``, bundles, WebAssembly codecs). :func:`install_ohif` fetches that one
tarball with ``npm pack`` (no dependency tree: the site is already built) into a cache
folder and unpacks it once; later runs reuse it and need no network.

:class:`OhifServer` serves ``dist/`` (app routes such as ``/viewer`` fall back to
``index.html``) and forwards ``/dicom-web/`` to Orthanc with the browser's ``Host`` header,
so the retrieve URLs Orthanc writes into its metadata point back at this same origin: no
CORS, and the browser talks to one loopback port only.

Why 3.13.2: it is npm's ``latest``, and 3.14.0-beta.6 (the newest) fixes nothing we need:
both throw "Invalid VOI LUT function" for VOI LUT Function LINEAR (the image loader keeps
the first character, "L"; see README, "Look at the results in OHIF").
"""

from __future__ import annotations

import http.client
import logging
import mimetypes
import os
import shutil
import subprocess
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

logger = logging.getLogger("ohif")

OHIF_VERSION = "3.13.2"
CACHE = Path(os.environ.get("CXR_AI_CACHE", Path.home() / ".cache" / "cxr-ai-node"))
DICOMWEB_ROOT = "/dicom-web"
NPM_TIMEOUT_S = 600
_HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                "trailers", "transfer-encoding", "upgrade", "content-length"}
_CHUNK = 1 << 16

APP_CONFIG = """/** Written by scripts/ohif_server.py: one DICOMweb source, same origin. */
window.config = {
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  maxNumberOfWebWorkers: 2,
  defaultDataSourceName: 'dicomweb',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicomweb',
      configuration: {
        friendlyName: 'Orthanc (CXR AI node)',
        name: 'orthanc',
        wadoUriRoot: '@ROOT@',
        qidoRoot: '@ROOT@',
        wadoRoot: '@ROOT@',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""


class OhifError(RuntimeError):
    """OHIF could not be installed or served."""


def install_ohif(version: str = OHIF_VERSION, cache: Path = CACHE) -> Path:
    """The ``dist/`` folder of ``@ohif/app@version``, fetched once into ``cache``.

    Raises OhifError (with npm's own message) when npm is missing or the registry cannot
    be reached and nothing is cached yet."""
    dist = cache / "ohif" / version / "package" / "dist"
    if (dist / "index.html").is_file() and (dist.parent / ".unpacked").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise OhifError("npm is not installed (Debian package npm; run "
                        "scripts/install-system-deps.sh --test): needed to fetch @ohif/app")
    packs = cache / "npm"
    packs.mkdir(parents=True, exist_ok=True)
    tarball = packs / f"ohif-app-{version}.tgz"
    if not tarball.is_file():
        logger.info("fetching @ohif/app@%s with npm pack into %s", version, packs)
        try:
            res = subprocess.run([npm, "pack", f"@ohif/app@{version}", "--pack-destination",
                                  str(packs), "--prefer-offline"],  # npm's cache first
                                 capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise OhifError(f"npm pack @ohif/app@{version} took over {NPM_TIMEOUT_S} s") \
                from exc
        if res.returncode != 0 or not tarball.is_file():
            raise OhifError(f"npm could not fetch @ohif/app@{version} (exit "
                            f"{res.returncode}):\n{res.stderr.strip()[-2000:]}")
    # Unpacked beside the target, then renamed: a run that stopped half-way, or another
    # test process unpacking at the same time, never leaves a half site behind.
    target = cache / "ohif" / version
    partial = target.with_name(f"{version}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(partial, filter="data")
    if not (partial / "package" / "dist" / "index.html").is_file():
        shutil.rmtree(partial, ignore_errors=True)
        raise OhifError(f"@ohif/app@{version} has no package/dist/index.html ({tarball})")
    (partial / "package" / ".unpacked").write_text(version, encoding="utf-8")
    if (target / "package" / ".unpacked").is_file():  # another process was quicker
        shutil.rmtree(partial, ignore_errors=True)
    else:
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt
        partial.rename(target)
    return dist


def write_app_config(dist: Path) -> Path:
    """Point the installed viewer at ``/dicom-web`` on its own origin."""
    path = dist / "app-config.js"
    path.write_text(APP_CONFIG.replace("@ROOT@", DICOMWEB_ROOT), encoding="utf-8")
    return path


def _handler(dist: Path, orthanc: tuple[str, int]) -> type[BaseHTTPRequestHandler]:
    root = dist.resolve()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            logger.debug("ohif %s", format % args)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self._dispatch()

        def do_HEAD(self) -> None:  # noqa: N802
            self._dispatch()

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch()

        def _dispatch(self) -> None:
            path = urlsplit(self.path).path
            if path == DICOMWEB_ROOT or path.startswith(DICOMWEB_ROOT + "/"):
                self._proxy()
            elif self.command == "POST":
                self.send_error(405)
            else:
                self._static(path)

        def _static(self, path: str) -> None:
            file = (root / path.lstrip("/")).resolve()
            if not file.is_relative_to(root) or not file.is_file():
                file = root / "index.html"  # app routes (/viewer, /) are the SPA's
            body = file.read_bytes()
            kind = "application/wasm" if file.suffix == ".wasm" else (
                mimetypes.guess_type(file.name)[0] or "application/octet-stream")
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _proxy(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            conn = http.client.HTTPConnection(*orthanc, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
            except OSError as exc:
                self.send_error(502, f"Orthanc: {exc}")
                return
            finally:
                conn.close()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in _HOP_HEADERS:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler


class OhifServer:
    """``with OhifServer(dist, orthanc_port) as viewer: viewer.url`` (loopback only)."""

    def __init__(self, dist: Path, orthanc_port: int, *, port: int = 0,
                 orthanc_host: str = "127.0.0.1") -> None:
        self.dist = Path(dist)
        write_app_config(self.dist)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port),
                                         _handler(self.dist, (orthanc_host, orthanc_port)))
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def viewer_url(self, study_uid: str) -> str:
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"

    def start(self) -> OhifServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-http",
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(5)

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
