"""The web server inside the node process: waitress, a production WSGI server, in one
thread, stopped by the node's stop hooks.

Why it cannot starve the DICOM listener: waitress reads requests in one asynchronous loop
(poll) and hands only *complete* requests to a fixed pool of ``web.threads`` workers, so a
client that sends half a request line and stalls costs a socket, not a thread; it is
dropped after ``web.channel_timeout_s`` without activity. At most ``web.connection_limit``
connections are open (more wait in the listen backlog); request bodies above
``web.max_request_body_bytes`` are refused with 413. The process's open-file limit is
raised (up to its hard limit) to hold that many connections next to the DICOM ones.

Its access log is this module's logger at DEBUG, path only: query strings stay out of it.
"""

from __future__ import annotations

import logging
import resource
import threading
from typing import Any

from waitress.channel import HTTPChannel
from waitress.server import create_server

from dicom_node.config import WebSettings
from dicom_node.errors import NodeError

logger = logging.getLogger(__name__)

FD_RESERVE = 512  # descriptors kept for DICOM associations, the database, spool files


class _AccessLog:
    """WSGI middleware: one DEBUG line per request (method, path, status), no query."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        def logged(status: str, headers: Any, *args: Any) -> Any:
            logger.debug("%s %s -> %s", environ.get("REQUEST_METHOD"),
                         environ.get("PATH_INFO"), status.split(" ", 1)[0])
            return start_response(status, headers, *args)
        return self.app(environ, logged)


def ensure_fd_limit(needed: int) -> int:
    """Raise the soft open-file limit towards ``needed`` (never above the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
        if soft < needed:
            logger.warning("open-file limit %d is below web.connection_limit + %d; lower "
                           "web.connection_limit or raise the limit (ulimit -n)", soft,
                           FD_RESERVE)
    return int(soft)


class WebServer:
    """A started server; ``port`` is the bound port (useful when configured as 0)."""

    def __init__(self, app: Any, web: WebSettings) -> None:
        ensure_fd_limit(web.connection_limit + FD_RESERVE)
        timeout = max(1, round(web.channel_timeout_s))
        try:
            self._server: Any = create_server(
                _AccessLog(app), host=web.host, port=web.port, threads=web.threads,
                connection_limit=web.connection_limit, channel_timeout=timeout,
                cleanup_interval=max(1, min(30, timeout // 2)),
                max_request_body_size=web.max_request_body_bytes,
                asyncore_use_poll=True,  # select() cannot watch descriptors above 1023
                ident="cxr-ai-node", expose_tracebacks=False,
                clear_untrusted_proxy_headers=True)
        except OSError as exc:
            raise NodeError(f"web server cannot listen on web.host {web.host!r}, web.port "
                            f"{web.port}: {exc.strerror or exc}") from exc
        self.host = web.host
        self.port = int(self._server.effective_port)
        self.threads = web.threads
        self._thread = threading.Thread(target=self._server.run, name="web", daemon=True)

    def start(self) -> WebServer:
        self._thread.start()
        logger.info("web API and dashboard on http://%s:%d/dashboard/ (%d threads)",
                    self.host, self.port, self.threads)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection in the server's own loop, then let the
        worker threads finish the requests they are serving."""
        server = self._server
        pulled = False
        if self._thread.is_alive():
            try:  # run the close in the server's loop, which owns the sockets
                server.trigger.pull_trigger(lambda: _close_all(server))
                pulled = True
            except OSError:  # the loop's wake-up pipe is already closed: close from here
                pass
        if pulled:
            self._thread.join(timeout)
        else:
            _close_all(server)
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=timeout)


def _close_all(server: Any) -> None:
    for dispatcher in list(server._map.values()):
        try:  # a channel's handle_close also wakes a worker waiting to write to it
            (dispatcher.handle_close if isinstance(dispatcher, HTTPChannel)
             else dispatcher.close)()
        except OSError:
            pass  # already closed by its peer


def start_web_server(node: Any) -> WebServer:
    """Build the app for ``node`` and serve it on ``node.settings.web.host/port``."""
    from dicom_node.web import create_app

    web = node.settings.web
    if web.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("web.host is %s: the API and dashboard are reachable from the "
                       "network; put TLS in front of it (README: web UI behind TLS)", web.host)
    return WebServer(create_app(node.settings, node), web).start()
