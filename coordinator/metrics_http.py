"""/metrics over HTTP: prometheus_client's exposition of every metric but the per-device series,
which DeviceCollector writes as text itself (coordinator.device_metrics: a scrape of 10,000
devices 2.0 -> 0.3 s of CPU, `python -m skipfleet.bench_scrape`). prometheus_client still
chooses the format from the Accept header (its text format, or OpenMetrics, whose `# EOF` must
stay last) and restricts to `name[]`; the body is gzipped here (as prometheus_client does it),
after the device lines are in, when the scraper accepts gzip.
"""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.openmetrics import exposition as openmetrics

from coordinator.device_metrics import DeviceCollector

Environ = dict[str, Any]
StartResponse = Callable[..., object]
WsgiApp = Callable[[Environ, StartResponse], Iterable[bytes]]
OPENMETRICS_EOF = b"# EOF\n"
# The escapings under which prometheus_client writes our names (legacy-valid) as they are:
# not `dots` (skipfleet__device__online), nor `values` in OpenMetrics (U__skipfleet__...)
NAMES_AS_WRITTEN = frozenset({openmetrics.UNDERSCORES, openmetrics.ALLOWUTF8})


def metrics_app(
    whole: CollectorRegistry,
    others: CollectorRegistry,
    devices: DeviceCollector,
    refresh: Callable[[], None],
) -> WsgiApp:
    """`others` holds every collector of `whole` but `devices`. A scrape (a GET of anything but
    /favicon.ico) runs refresh() first (the fleet's snapshot, at most one every max_age_s), so
    both parts show the same one. A scraper asking for names escaped in a way that changes
    ours (`escaping=dots`, ...) gets `whole` through prometheus_client, which escapes each."""
    fast: WsgiApp = make_wsgi_app(others, disable_compression=True)
    slow: WsgiApp = make_wsgi_app(whole)  # its collect() refreshes

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        scrape = environ["REQUEST_METHOD"] == "GET" and environ.get("PATH_INFO") != "/favicon.ico"
        if not scrape:
            return fast(environ, start_response)
        _, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        if _escaping(content_type) not in NAMES_AS_WRITTEN:
            return slow(environ, start_response)
        refresh()
        answered: list[Any] = []
        body = b"".join(fast(environ, lambda status, headers: answered.extend((status, headers))))
        status, headers = answered
        if status.startswith("200"):
            body = _with_devices(body, content_type, devices, environ)
            if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
                body = gzip.compress(body)
                headers = [*headers, ("Content-Encoding", "gzip")]
        start_response(status, headers)
        return [body]

    return app


def _escaping(content_type: str) -> str:
    """The name escaping prometheus_client chose (`...; escaping=dots`), underscores if none."""
    for parameter in content_type.split(";"):
        key, _, value = parameter.strip().partition("=")
        if key == "escaping":
            return value
    return openmetrics.UNDERSCORES


def _with_devices(
    body: bytes, content_type: str, devices: DeviceCollector, environ: Environ
) -> bytes:
    names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
    om = content_type.startswith("application/openmetrics-text")
    lines = devices.exposition(None if names is None else set(names), openmetrics=om).encode()
    if om:
        if not body.endswith(OPENMETRICS_EOF):
            raise ValueError("an OpenMetrics exposition without its closing # EOF")
        return body[: -len(OPENMETRICS_EOF)] + lines + OPENMETRICS_EOF
    return body + lines


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up a stop


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Not a line on stderr per scrape."""


def serve(app: WsgiApp, addr: str, port: int) -> WSGIServer:
    """Serves `app` on a daemon thread (port 0: any free one); OSError if it cannot bind."""
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("MetricsServer", (_Server,), {"address_family": family})
    server: WSGIServer = make_server(addr, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
