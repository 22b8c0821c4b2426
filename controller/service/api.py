"""HTTP+JSON on a UNIX socket: the daemon's server side and the client.

Requests are ``POST /`` with ``{"Action": "<EC2 action>", ...parameters}``
(or ``POST /<Action>`` with the parameters as the body). Success is 200 with
the action's result plus ``RequestId``; failure is 4xx/5xx with
``{"Error": {"Code": ..., "Message": ...}, "RequestId": ...}``, the EC2 error
shape. ``GET /healthz`` answers ``{"ok": true}``. See docs/api.yaml.
"""

from __future__ import annotations

import grp
import http.client
import http.server
import json
import os
import socket
import socketserver
import threading
import uuid
from typing import Any, Callable, Dict, Optional, Tuple

from controller.policy.errors import ApiError

DEFAULT_SOCKET = "/run/sgctl/api.sock"
MAX_BODY = 64 << 20  # bytes of one request body (a document travels inside one)
MAX_CONNECTIONS = 64  # served at once; one more is answered 503 and closed
IDLE_TIMEOUT = 30.0  # seconds a connection may sit between (or inside) requests

Handler = Callable[[str, Dict[str, Any]], Dict[str, Any]]


_BUSY_BODY = json.dumps({"Error": {"Code": "ServiceUnavailable",
                                   "Message": "too many connections; retry"}}).encode()
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class BoundedThreads(socketserver.ThreadingMixIn):
    """One thread per connection, at most MAX_CONNECTIONS of them; one more
    is answered ``busy`` (a whole HTTP response) and closed."""
    daemon_threads = True
    busy = _BUSY

    def init_slots(self) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(self.busy)
            except OSError:
                pass
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Server(BoundedThreads, socketserver.UnixStreamServer):
    handle_action: Handler
    health: Callable[[], Dict[str, Any]]

    def __init__(self, path: str, handler: Any) -> None:
        super().__init__(path, handler)
        self.init_slots()


def read_body(handler: http.server.BaseHTTPRequestHandler, limit: int) -> bytes:
    """A request body, by an exact, bounded Content-Length (no chunked: a
    body whose end two parsers could see differently is refused)."""
    if handler.headers.get("Transfer-Encoding") is not None:
        raise ApiError("InvalidRequest", "Transfer-Encoding is not accepted; send "
                       "Content-Length", 411)
    values = handler.headers.get_all("Content-Length") or []
    if len(values) > 1:
        raise ApiError("InvalidRequest", "Content-Length is given more than once")
    text = values[0].strip() if values else "0"
    if not text.isdigit() or not text.isascii() or len(text) > 12:
        raise ApiError("InvalidRequest", f"Content-Length {text!r} is not a byte count")
    length = int(text)
    if length > limit:
        raise ApiError("RequestTooLarge", f"body of {length} bytes exceeds {limit}", 413)
    raw = handler.rfile.read(length) if length else b""
    if len(raw) != length:
        raise ApiError("InvalidRequest", f"body ended after {len(raw)} of {length} bytes")
    return raw


class _RequestHandler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT  # StreamRequestHandler sets it on the socket

    def address_string(self) -> str:  # a UNIX peer has no host/port
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:  # the daemon logs actions itself
        pass

    def _reply(self, status: int, body: Dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:  # whatever of the request is unread must not be taken as the next one
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path == "/healthz":
            self._reply(200, self.server.health())
        else:
            self._reply(404, {"Error": {"Code": "NotFound", "Message": self.path}})

    def do_POST(self) -> None:  # noqa: N802
        rid = str(uuid.uuid4())
        try:
            raw = read_body(self, MAX_BODY)
            try:
                params = json.loads(raw or b"{}")
            except RecursionError:
                raise ApiError("MalformedQueryString", "body is nested too deeply") from None
            except ValueError as exc:
                raise ApiError("MalformedQueryString", f"body is not JSON: {exc}") from None
            if not isinstance(params, dict):
                raise ApiError("MalformedQueryString", "body must be a JSON object")
            action = self.path.strip("/") or params.pop("Action", None)
            params.pop("Action", None)
            if not action or not isinstance(action, str):
                raise ApiError("MissingAction", "give the action as the path or as Action")
            result = self.server.handle_action(action, params)
            self._reply(200, {**result, "RequestId": rid})
        except ApiError as exc:
            self._reply(exc.status, {"Error": {"Code": exc.code, "Message": exc.message},
                                     "RequestId": rid})
        except Exception as exc:  # a bug: report it, keep serving
            self._reply(500, {"Error": {"Code": "InternalError",
                                        "Message": f"{type(exc).__name__}: {exc}"},
                              "RequestId": rid})


def serve(path: str, handle_action: Handler, health: Callable[[], Dict[str, Any]],
          mode: int = 0o600, group: Optional[str] = None) -> _Server:
    """Bind the socket (replacing a stale one) and return the server; the
    caller runs ``serve_forever`` in a thread and ``shutdown`` to stop."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        if ping(path):
            raise OSError(f"{path}: another daemon is already serving this socket")
        os.unlink(path)
    old = os.umask(0o177)
    try:
        srv = _Server(path, _RequestHandler)
    finally:
        os.umask(old)
    if group is not None:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    os.chmod(path, mode)
    srv.handle_action = handle_action
    srv.health = health
    return srv


# --------------------------------------------------------------------------- client


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Client:
    """One connection to the daemon, reused for many calls."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float = 120.0) -> None:
        self.path = path
        self.conn = _UnixConnection(path, timeout)

    def request(self, method: str, url: str, body: Optional[Dict[str, Any]] = None
                ) -> Tuple[int, Dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self.conn.request(method, url, body=data, headers=headers)
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")

    def call(self, action: str, params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Run an action; raise ApiError with the daemon's code on failure."""
        status, out = self.request("POST", "/", {"Action": action, **(params or {})})
        if status != 200:
            err = out.get("Error", {})
            raise ApiError(err.get("Code", "InternalError"), err.get("Message", ""), status)
        out.pop("RequestId", None)
        return out

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ping(path: str) -> bool:
    """True when a daemon answers on ``path``."""
    try:
        with Client(path, timeout=2.0) as c:
            return c.request("GET", "/healthz")[0] == 200
    except OSError:
        return False
