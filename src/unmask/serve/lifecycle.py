"""Running the app: the listening socket, and a shutdown that loses no request.

uvicorn's own SIGTERM handling closes the listening socket first and then waits for open
connections, so while requests finish /health is refused instead of answering 503, requests
still running when its timeout ends are cut off, and it re-raises the signal at the end (exit
status 143). `run` handles the first SIGTERM or SIGINT itself: the server keeps listening while
`Server.drain` answers 503 to new requests and to /health, lets accepted ones finish for up to
the grace, and ends the rest cleanly; only then does uvicorn stop, and the process exits 0.
A second signal stops at once, cutting what is still running, and `run` says so (the process
then exits non-zero).

uvicorn times out only idle keep-alive connections; `TimedH11Protocol` also closes a connection
whose request headers have not all arrived within --header-timeout (nothing sent, or headers
trickled a byte at a time), the app refuses a body slower than --body-timeout (408), and
--max-connections caps open connections (uvicorn answers 503 beyond it).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from contextlib import contextmanager

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("uvicorn.error")   # uvicorn's own lifecycle messages go there too


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, made before the model loads, so a bad or taken port is one line."""
    if type(port) is not int or not 1 <= port <= 65535:
        raise ValueError(f"--port must be between 1 and 65535 (got {port})")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} is in use: pick another with --port") from None
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete
    `header_timeout_s` after it opened or after its previous response (set per server by
    `uvicorn_config`)."""

    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.header_timer = self.loop.call_later(self.header_timeout_s, self.headers_too_slow)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.header_timer.cancel()
            self.header_timer = self.loop.call_later(self.header_timeout_s, self.headers_too_slow)

    def connection_lost(self, exc) -> None:
        self.header_timer.cancel()
        super().connection_lost(exc)

    def headers_too_slow(self) -> None:
        """Close the connection if it is still waiting for (the rest of) a request's headers."""
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("Closing a connection whose request headers took over %g s", self.header_timeout_s)
            self.transport.close()


def uvicorn_config(app, **kwargs) -> uvicorn.Config:
    """uvicorn's settings for `app` (from `create_app`), with its --header-timeout and
    --max-connections."""
    config = app.state.server.config
    protocol = type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout_s": config.header_timeout_s})
    return uvicorn.Config(app, http=protocol, limit_concurrency=config.max_connections,
                          timeout_graceful_shutdown=5, **kwargs)


class GracefulServer(uvicorn.Server):
    """uvicorn, with the first SIGTERM/SIGINT draining the app instead of closing the listener."""

    def __init__(self, config: uvicorn.Config, grace_s: float):
        super().__init__(config)
        self.app_server = config.app.state.server
        self.grace_s = grace_s
        self.drain_requested = False
        self.drain_task: asyncio.Task | None = None
        self.cut = False   # a second signal stopped the server with work still running

    def handle_exit(self, sig, frame) -> None:
        """The signal handler: only flags (the drain starts on the next tick of uvicorn's loop).
        The signal is not recorded for re-raising, so a drained server exits 0."""
        if self.drain_requested:
            self.should_exit = self.force_exit = True
            self.cut = self.app_server.scheduler is not None and self.app_server.scheduler.busy
        self.drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and self.drain_task is None:
            self.drain_task = asyncio.create_task(self.drain())
        return await super().on_tick(counter)

    async def drain(self) -> None:
        log.info("Draining: no new requests; up to %g s for the ones in flight (a second signal stops at once)",
                 self.grace_s)
        ended = await self.app_server.drain(self.grace_s)
        if ended:
            log.warning("Ended %d request(s) still unfinished after the %g s grace with a 503", ended, self.grace_s)
        self.should_exit = True


def run(app, sock: socket.socket, grace_s: float, log_level: str = "info") -> bool:
    """Serve `app` (from `create_app`) on the bound `sock` until a signal has drained it. Returns
    whether it ended cleanly: False when a second signal cut requests still running."""
    server = GracefulServer(uvicorn_config(app, log_level=log_level), grace_s)
    server.run(sockets=[sock])
    if server.cut:
        log.warning("Stopped by a second signal with requests still running: they were cut off")
    return not server.cut


@contextmanager
def serve_in_thread(app, timeout_s: float = 30.0, log_level: str = "warning"):
    """Serve `app` from a background thread on a free loopback port; yields the base URL and stops
    the server on exit. For a process that drives its own server (tests, scripts/serve_speed.py):
    no signal handling, which only the main thread may install."""
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=0, log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
