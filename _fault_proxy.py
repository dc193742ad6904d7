"""A fault-injecting reverse proxy on 127.0.0.1 for hermetic resilience tests.

Standard library only (Python 3.8+).  Put it between a client and an
upstream HTTP server (usually ``_fake_registry.FakeRegistry``)::

    proxy = FaultProxy(upstream=registry.host)
    rule = proxy.add_rule("truncate", method="GET", path=digest, offset=100_000)
    ...pull from proxy.host...
    assert proxy.body_bytes(path=digest) <= size + 1024
    proxy.close()

Requests (method, path, headers, body) are forwarded upstream on a fresh
connection; responses are streamed back over HTTP/1.1 keep-alive.  Each
request is matched against the rules in order; the first rule that matches
applies to it.  A rule matches ``method`` (None: any) and ``path`` (a regular
expression searched in the request target, or a callable taking it); with
``nth`` it skips the first nth-1 matches; ``times`` is how often it applies
(default once, None: every time).  Actions:

    reset           close with a TCP RST before sending any header
    reset_body      send the body up to ``offset``, then RST
    truncate        send the body up to ``offset``, then close cleanly (FIN)
    flip            XOR the byte at ``offset`` with 0xFF
    stall           send the body up to ``offset``, then wait for ``event``
                    (or the proxy closing), then carry on
    stall_headers   wait for ``event`` before answering at all
    respond         answer ``status`` with ``headers`` and ``body`` (bytes, or
                    ``body_iter`` chunks sent lazily with ``length`` as
                    Content-Length; without ``length`` the body ends when the
                    proxy closes the connection)
    unauthorized    answer 401 with the upstream's own WWW-Authenticate
                    challenge (a token "expiring" mid-pull)
    strip_auth      forward without Authorization (upstream decides)
    redirect        answer ``status`` (307) with ``Location: location`` (a
                    string or a callable taking the request path)

``sndbuf_bytes`` shrinks the socket's send buffer for the requests a rule
applies to, so that ``body_bytes`` says how much the client actually took.

Body offsets are absolute positions in the resource: for a 206 answer they
count from the start of its Content-Range, so a rule keeps meaning the same
byte across resumed downloads.  Each rule has ``reached`` (an Event set when
the fault happens: the stall begins, the byte is flipped, ...) and ``fired``.

Every request is recorded in ``requests`` as a dict: method, path, headers
(as sent by the client, Range included), status (sent to the client),
body_bytes (body bytes written to the client socket), rule (action name or
None) and done (the handler finished with it).
"""

from __future__ import annotations

import http.client
import http.server
import json
import re
import socket
import struct
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

__all__ = ["FaultProxy", "Rule", "ACTIONS", "repeat_bytes"]

ACTIONS = ("reset", "reset_body", "truncate", "flip", "stall", "stall_headers", "respond",
           "unauthorized", "strip_auth", "redirect")

_BODY_ACTIONS = ("reset_body", "truncate", "flip", "stall")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
               "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade"}
_CHUNK_BYTES = 64 * 1024
_STALL_LIMIT_S = 120.0   # a forgotten Event must not keep a thread forever


def repeat_bytes(total: int, pattern: bytes = b"x" * _CHUNK_BYTES) -> Iterator[bytes]:
    """Yield ``total`` bytes of ``pattern`` lazily, one chunk at a time."""
    sent = 0
    while sent < total:
        chunk = pattern[: min(len(pattern), total - sent)]
        sent += len(chunk)
        yield chunk


class Rule:
    """One fault: which requests it applies to and what happens to them."""

    def __init__(self, action: str, *, method: Optional[str] = None,
                 path: Union[None, str, Callable[[str], bool]] = None,
                 nth: Optional[int] = None, times: Optional[int] = 1,
                 offset: int = 0, event: Optional[threading.Event] = None,
                 status: Optional[int] = None, headers: Optional[Dict[str, str]] = None,
                 body: Optional[bytes] = None,
                 body_iter: Optional[Callable[[], Iterable[bytes]]] = None,
                 length: Optional[int] = None,
                 location: Union[None, str, Callable[[str], str]] = None,
                 sndbuf_bytes: Optional[int] = None) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        self.action = action
        self.method = method
        self.path = path
        self.nth = nth
        self.times = times
        self.offset = offset
        self.event = event
        self.status = status
        self.headers = dict(headers or {})
        self.body = body
        self.body_iter = body_iter
        self.length = length
        self.location = location
        self.sndbuf_bytes = sndbuf_bytes
        self.matches = 0
        self.fired = 0
        self.reached = threading.Event()

    def __repr__(self) -> str:
        return (f"Rule({self.action!r}, method={self.method!r}, path={self.path!r}, "
                f"nth={self.nth}, times={self.times}, offset={self.offset}, fired={self.fired})")

    def _matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        if self.path is None:
            return True
        if callable(self.path):
            return bool(self.path(path))
        return re.search(self.path, path) is not None

    def _take(self, method: str, path: str) -> bool:
        """Count a match; tell whether the rule applies to it (caller holds the lock)."""
        if not self._matches(method, path):
            return False
        self.matches += 1
        if self.nth is not None and self.matches < self.nth:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: type, proxy: "FaultProxy") -> None:
        self.proxy = proxy
        self.connections = 0
        super().__init__(("127.0.0.1", 0), handler)

    def get_request(self) -> Any:
        sock, addr = super().get_request()
        self.connections += 1
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients vanish mid-body on purpose; no tracebacks on stderr


class _Abort(Exception):
    """Internal: the connection to the client was closed on purpose."""


class FaultProxy:
    """The proxy.  Add rules, then point a client at ``host`` (``127.0.0.1:PORT``)."""

    def __init__(self, upstream: str, *, upstream_timeout_s: float = 30.0,
                 keep_host: bool = False) -> None:
        self.upstream = upstream
        # keep_host: forward the client's Host header (an S3 signature covers it).
        self.keep_host = keep_host
        self.upstream_timeout_s = upstream_timeout_s
        self.rules: List[Rule] = []
        self.requests: List[Dict[str, Any]] = []
        self.release = threading.Event()   # default Event of stall rules; set by close()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._challenge: Optional[str] = None
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 60  # idle keep-alive connections end eventually

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        self.server = _Server(Handler, self)
        # A short poll interval: shutdown() waits up to one interval.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    # -- configuration and inspection --------------------------------------------

    @property
    def host(self) -> str:
        """Return ``127.0.0.1:PORT`` of the proxy."""
        return f"127.0.0.1:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def connections(self) -> int:
        """Return how many client connections were accepted."""
        return self.server.connections

    def add_rule(self, action: str, **kwargs: Any) -> Rule:
        """Create a rule, append it and return it."""
        rule = Rule(action, **kwargs)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self.rules.clear()

    def log(self, method: Optional[str] = None, path: Optional[str] = None) -> List[Dict[str, Any]]:
        """Return the recorded requests with this method and ``path`` substring."""
        with self._lock:
            return [dict(r) for r in self.requests
                    if (method is None or r["method"] == method)
                    and (path is None or path in r["path"])]

    def count(self, method: Optional[str] = None, path: Optional[str] = None) -> int:
        return len(self.log(method, path))

    def wait_until(self, predicate: Callable[["FaultProxy"], bool],
                    timeout_s: float = 10.0) -> bool:
        """Wait until ``predicate(proxy)`` holds (checked as requests start and end)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout_s)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def body_bytes(self, method: Optional[str] = "GET", path: Optional[str] = None) -> int:
        """Return the body bytes sent to clients for matching requests."""
        return sum(r["body_bytes"] for r in self.log(method, path))

    def close(self) -> None:
        """Release every stall, stop serving and close the listening socket."""
        self.release.set()
        with self._lock:
            for rule in self.rules:
                if rule.event is not None:
                    rule.event.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- handling --------------------------------------------------------------------

    def _choose(self, method: str, path: str) -> Optional[Rule]:
        with self._lock:
            for rule in self.rules:
                if rule._take(method, path):
                    return rule
        return None

    def _wait(self, rule: Rule) -> None:
        rule.reached.set()
        # close() sets every rule's Event and ``release``: a stall ends with the
        # test's Event or with the proxy, whichever comes first.
        (rule.event or self.release).wait(_STALL_LIMIT_S)

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        headers = {k: v for k, v in h.headers.items()}
        record: Dict[str, Any] = {"method": h.command, "path": h.path, "headers": headers,
                                  "status": None, "body_bytes": 0, "rule": None,
                                  "done": False}
        with self._lock:
            self.requests.append(record)
            self._changed.notify_all()
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        rule = self._choose(h.command, h.path)
        record["rule"] = rule.action if rule else None
        try:
            self._serve(h, record, rule, headers, body)
        except _Abort:
            pass
        except OSError:
            h.close_connection = True  # the client went away
        finally:
            record["done"] = True
            self._notify()

    def _serve(self, h: Any, record: Dict[str, Any], rule: Optional[Rule],
               headers: Dict[str, str], body: Optional[bytes]) -> None:
        action = rule.action if rule else None
        if rule is not None and rule.sndbuf_bytes:
            # A small send buffer keeps the kernel from accepting megabytes the
            # client never reads, so body_bytes is close to what it did read.
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rule.sndbuf_bytes)
        if action == "reset":
            rule.reached.set()
            self._reset(h)
        if action == "stall_headers":
            self._wait(rule)
        if action == "respond":
            rule.reached.set()
            self._respond(h, record, rule)
            return
        if action == "redirect":
            rule.reached.set()
            where = rule.location(h.path) if callable(rule.location) else rule.location
            self._send_simple(h, record, rule.status or 307, b"", {"Location": str(where)})
            return
        if action == "unauthorized":
            rule.reached.set()
            body_401 = json.dumps({"errors": [{"code": "UNAUTHORIZED",
                                               "message": "token expired"}]}).encode()
            self._send_simple(h, record, 401, body_401,
                              {"WWW-Authenticate": self._upstream_challenge()})
            return
        forward = {k: v for k, v in headers.items()
                   if k.lower() not in _HOP_BY_HOP and (k.lower() != "host" or self.keep_host)}
        if action == "strip_auth":
            rule.reached.set()
            forward = {k: v for k, v in forward.items() if k.lower() != "authorization"}
        self._forward(h, record, rule, forward, body)

    # -- answering ourselves -----------------------------------------------------------

    def _send_simple(self, h: Any, record: Dict[str, Any], status: int, body: bytes,
                     headers: Dict[str, str]) -> None:
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        if "Content-Type" not in headers:
            h.send_header("Content-Type", "application/json")
        for name, value in headers.items():
            h.send_header(name, value)
        h.end_headers()
        record["status"] = status
        if h.command != "HEAD" and body:
            h.wfile.write(body)
            record["body_bytes"] += len(body)

    def _respond(self, h: Any, record: Dict[str, Any], rule: Rule) -> None:
        status = rule.status or 200
        if rule.body_iter is None:
            body = rule.body
            if body is None:
                code = "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE"
                body = json.dumps({"errors": [{"code": code, "message": "fault"}]}).encode()
            self._send_simple(h, record, status, body, rule.headers)
            return
        h.send_response(status)
        names = {k.lower() for k in rule.headers}
        if rule.length is None or rule.length < 0:
            h.send_header("Connection", "close")  # the body ends when we close
            h.close_connection = True
        elif "content-length" not in names:
            h.send_header("Content-Length", str(rule.length))
        for name, value in rule.headers.items():
            h.send_header(name, value)
        h.end_headers()
        record["status"] = status
        if h.command == "HEAD":
            return
        try:
            for chunk in rule.body_iter():
                h.wfile.write(chunk)
                record["body_bytes"] += len(chunk)
        except OSError:
            h.close_connection = True

    def _upstream_challenge(self) -> str:
        """Return the upstream's WWW-Authenticate header (asked once, without credentials)."""
        if self._challenge is None:
            conn = http.client.HTTPConnection(self.upstream, timeout=self.upstream_timeout_s)
            try:
                conn.request("GET", "/v2/")
                response = conn.getresponse()
                response.read()
                self._challenge = response.getheader("WWW-Authenticate") or \
                    'Bearer realm="http://127.0.0.1:1/token"'
            finally:
                conn.close()
        return self._challenge

    # -- forwarding ------------------------------------------------------------------

    def _forward(self, h: Any, record: Dict[str, Any], rule: Optional[Rule],
                 headers: Dict[str, str], body: Optional[bytes]) -> None:
        conn = http.client.HTTPConnection(self.upstream, timeout=self.upstream_timeout_s)
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            response = conn.getresponse()
            self._relay(h, record, rule, response)
        finally:
            conn.close()

    def _relay(self, h: Any, record: Dict[str, Any], rule: Optional[Rule],
               response: http.client.HTTPResponse) -> None:
        length_header = response.getheader("Content-Length")
        prebuffered: Optional[bytes] = None
        if h.command != "HEAD" and (length_header is None or not length_header.isdigit()):
            prebuffered = response.read()  # chunked or close-delimited: buffer, then frame
            length_header = str(len(prebuffered))
        start = 0
        match = re.match(r"bytes (\d+)-", response.getheader("Content-Range") or "")
        if response.status == 206 and match:
            start = int(match.group(1))
        h.send_response(response.status)
        for name, value in response.getheaders():
            lower = name.lower()
            if lower in _HOP_BY_HOP or lower in ("content-length", "date", "server"):
                continue
            if lower == "location" and value.startswith(f"http://{self.upstream}"):
                value = f"http://{self.host}" + value[len(f"http://{self.upstream}"):]
            h.send_header(name, value)
        if length_header is not None:
            h.send_header("Content-Length", length_header)
        h.end_headers()
        record["status"] = response.status
        if h.command == "HEAD":
            return
        source: Iterable[bytes] = [prebuffered] if prebuffered is not None else \
            iter(lambda: response.read(_CHUNK_BYTES), b"")
        position = start
        pending = rule if rule is not None and rule.action in _BODY_ACTIONS else None
        for chunk in source:
            if pending is not None and self._applies(pending, position, len(chunk)):
                chunk, position = self._apply_body_rule(h, record, pending, chunk, position)
                pending = None
            self._write(h, record, chunk)
            position += len(chunk)

    @staticmethod
    def _applies(rule: Rule, position: int, size: int) -> bool:
        """Tell whether a body rule acts on the chunk [position, position + size).

        truncate/reset_body/stall act at ``rule.offset``, or at the first byte
        when the body starts past it (a resumed download); flip only when the
        offset lies inside the body.
        """
        if rule.action == "flip":
            return position <= rule.offset < position + size
        return rule.offset < position + size

    def _apply_body_rule(self, h: Any, record: Dict[str, Any], rule: Rule,
                         chunk: bytes, position: int) -> Tuple[bytes, int]:
        """Apply a body rule; return the rest of the chunk still to send and its position."""
        cut = max(rule.offset - position, 0)
        if rule.action == "flip":
            data = bytearray(chunk)
            data[cut] ^= 0xFF
            rule.reached.set()
            return bytes(data), position
        self._write(h, record, chunk[:cut])
        h.wfile.flush()
        if rule.action == "truncate":
            rule.reached.set()
            h.close_connection = True
            raise _Abort()
        if rule.action == "reset_body":
            rule.reached.set()
            self._reset(h)
        self._wait(rule)  # stall, then carry on with the rest
        return chunk[cut:], position + cut

    @staticmethod
    def _write(h: Any, record: Dict[str, Any], data: bytes) -> None:
        if data:
            h.wfile.write(data)
            record["body_bytes"] += len(data)

    @staticmethod
    def _reset(h: Any) -> None:
        """Close the client connection with a TCP RST (SO_LINGER 0), not a FIN."""
        h.close_connection = True
        sock = h.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            h.rfile.close()
        finally:
            sock.close()
        raise _Abort()

