"""The web server inside the node process: Werkzeug's threaded WSGI server in a daemon
thread, stopped by the node's stop hooks.

Its request log goes to this module's logger at DEBUG, path only: query strings stay out
of the log.
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from urllib.parse import urlsplit

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from dicom_node.errors import NodeError

logger = logging.getLogger(__name__)


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        logger.debug("%s %s -> %s", self.command, urlsplit(self.path).path, code)

    def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002 - Werkzeug's name
        logger.debug("web server %s: %s", type, message % args if args else message)


class WebServer:
    """A started server; ``port`` is the bound port (useful when configured as 0)."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        try:
            self._server: BaseWSGIServer = make_server(host, port, app, threaded=True,
                                                       request_handler=_QuietHandler)
        except OSError as exc:
            raise NodeError(f"web server cannot listen on web.host {host!r}, web.port "
                            f"{port}: {exc.strerror or exc}") from exc
        self.host = host
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="web",
                                        daemon=True)

    def start(self) -> WebServer:
        self._thread.start()
        logger.info("web API and dashboard on http://%s:%d/dashboard/", self.host, self.port)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._server.shutdown()
        self._thread.join(timeout)
        self._server.server_close()


def start_web_server(node: Any) -> WebServer:
    """Build the app for ``node`` and serve it on ``node.settings.web.host/port``."""
    from dicom_node.web import create_app

    web = node.settings.web
    if web.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("web.host is %s: the API and dashboard are reachable from the "
                       "network; put TLS in front of it", web.host)
    return WebServer(create_app(node.settings, node), web.host, web.port).start()
