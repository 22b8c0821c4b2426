"""The EC2 endpoint: HTTP or HTTPS on a TCP address, EC2 Query requests
(``POST /`` with a form body, or ``GET /?Action=...``), signed with SigV4,
answered by the same actions as the JSON API (``Daemon.handle``)."""

from __future__ import annotations

import http.server
import logging
import socket
import ssl
import uuid
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple
from urllib.parse import parse_qsl, urlsplit

from controller.policy.actions import ACTIONS
from controller.policy.errors import ApiError
from controller.service.api import IDLE_TIMEOUT, BoundedThreads, Handler, read_body
from controller.service.ec2 import sigv4, wire
from controller.service.metrics import host_port

log = logging.getLogger("sgctl")

MAX_BODY = 4 << 20  # bytes of one request (EC2's own limit is smaller)
FORM = "application/x-www-form-urlencoded"

Observer = Callable[[str, str], None]  # (action or "other", "OK" or the error code)


@dataclass
class Ec2Config:
    address: str  # HOST:PORT
    credentials: str  # the credentials file (sigv4)
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None

    def check(self) -> None:
        """Raise ValueError naming what is wrong (before the daemon starts)."""
        host_port(self.address, "--ec2-endpoint")
        try:
            sigv4.read_credentials(self.credentials)
        except sigv4.CredentialsError as exc:
            raise ValueError(f"--ec2-credentials {exc}") from None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--ec2-tls-cert and --ec2-tls-key go together")

# the JSON API's actions that are EC2 operations (the others are sgctl's own)
SERVED = sorted(a for a in ACTIONS if a in set(wire.service().operation_names))

_BUSY_BODY = wire.error("RequestLimitExceeded", "too many connections; retry", "-")
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/xml\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class Ec2Server(BoundedThreads, http.server.HTTPServer):
    busy = _BUSY
    handle_action: Handler
    observe: Optional[Observer] = None
    keys: sigv4.Keys
    tls: Optional[ssl.SSLContext] = None

    def __init__(self, address: Tuple[str, int], handler: Any) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, handler)
        self.init_slots()

    def get_request(self) -> Tuple[Any, Any]:
        sock, addr = self.socket.accept()
        if self.tls is not None:  # the handshake happens in the connection's thread
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Ec2Server
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK wait

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:  # the daemon logs actions itself
        pass

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/xml;charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        if status >= 400:  # what is left unread of the request is not the next one
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._serve(b"")

    def do_POST(self) -> None:  # noqa: N802
        self._serve(None)

    def _serve(self, body: Optional[bytes]) -> None:
        rid = str(uuid.uuid4())
        self.action = "other"  # known once the request is parsed and served
        code = "OK"
        try:
            raw = read_body(self, MAX_BODY) if body is None else body
            status, out = 200, self._act(raw, rid)
        except ApiError as exc:
            code = exc.code
            status, out = exc.status, wire.error(exc.code, exc.message, rid)
        except Exception as exc:  # a bug: report it, keep serving
            log.exception("EC2 endpoint: %s", exc)
            code = "InternalError"
            status, out = 500, wire.error("InternalError", f"{type(exc).__name__}: {exc}", rid)
        if self.server.observe is not None:
            self.server.observe(self.action, code)
        self._reply(status, out)

    def _act(self, raw: bytes, rid: str) -> bytes:
        url = urlsplit(self.path)
        if url.path != "/":
            raise ApiError("InvalidRequest", f"the EC2 endpoint answers on /, not {url.path}")
        host = self.headers.get("Host")
        if not host:
            raise ApiError("InvalidRequest", "the request has no Host header")
        sigv4.verify(self.server.keys, self.command, host, self.path,
                     dict(self.headers.items()), raw)
        if self.command == "POST":
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != FORM:
                raise ApiError("InvalidRequest", f"the body must be {FORM}, not {ctype!r}")
            if url.query:
                raise ApiError("InvalidRequest", "give the parameters in the body or in the "
                               "query string, not both")
        pairs = _pairs(raw if self.command == "POST" else url.query.encode())
        action, version, rest = wire.action_of(pairs)
        if version != wire.API_VERSION:
            raise ApiError("NoSuchVersion", f"API version {version!r} is not served here; "
                           f"use {wire.API_VERSION}")
        if action not in SERVED:
            raise ApiError("InvalidAction", f"The action {action} is not valid for this web "
                           "service")
        self.action = action  # a label from a fixed set: hostile names stay "other"
        op = wire.operation(action)
        params = wire.parse(rest, op)
        result = self.server.handle_action(action, params)
        return wire.answer(op, result, rid)


def _pairs(raw: bytes) -> List[Tuple[str, str]]:
    try:
        text = raw.decode("utf-8")
        return parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text),
                         max_num_fields=wire.MAX_PARAMS, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError("MalformedQueryString", f"the parameters are not a form: {exc}") from None


def serve(cfg: Ec2Config, handle_action: Handler,
          observe: Optional[Observer] = None) -> Ec2Server:
    """Bind the endpoint; the caller runs ``serve_forever`` in a thread."""
    keys = sigv4.Keys(cfg.credentials)
    tls = None
    if cfg.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    srv = Ec2Server(host_port(cfg.address, "--ec2-endpoint"), _Handler)
    srv.handle_action = handle_action
    srv.observe = observe
    srv.keys = keys
    srv.tls = tls
    return srv
