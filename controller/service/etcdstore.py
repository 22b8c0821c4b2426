"""The fleet's datastore: the desired state in etcd, one key per object
(policy/formats/keyspace.py), through etcd's v3 JSON gateway with etcd3gw.

- **Writes** are compare-and-swap: ``commit(base, new)`` writes the keys that
  differ from ``base`` and bumps ``{prefix}meta/generation`` in one
  transaction that succeeds only if that key still has the revision ``base``
  read. Two writers that read the same base cannot both win: the loser gets
  ``Conflict`` and retries on a fresh read. Every write goes through this key,
  so writes are serialised fleet-wide (a control plane's rate, not a data
  plane's).
- **Watching** follows the prefix from a revision. etcd3gw's watcher drops
  both compaction notices and broken streams without a word, so the
  watch stream (gateway JSON lines) is read here: a compacted start revision
  raises ``Compacted`` (the caller re-reads everything) and a broken
  connection raises ``Unavailable`` (the caller retries from its revision).
- **Faults**: no endpoint answers → ``Unavailable``, a clear error for
  writes; readers keep their last snapshot.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception

from controller.policy.formats.keyspace import (
    DEFAULT_PREFIX,
    KeyValues,
    decode,
    diff,
    encode,
    is_state_key,
)
from controller.policy.model import State

GENERATION = "meta/generation"  # bumped by every write: the compare of every transaction
NODES = "nodes/"  # {prefix}nodes/<name>: a live agent, under its lease
PAGE = 5000  # keys per range read (one gateway answer stays small)
TXN_OPS = 128  # etcd's default --max-txn-ops


class Unavailable(RuntimeError):
    """No etcd endpoint answers."""


class Refused(RuntimeError):
    """etcd answered and refused the request (e.g. a transaction over its
    --max-txn-ops or --max-request-bytes)."""


class Conflict(RuntimeError):
    """Another write committed since the state this one was based on."""


class Compacted(RuntimeError):
    """The revision to watch from is no longer in etcd's history."""


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)


def _range_end(prefix: str) -> str:
    """The first key after every key with ``prefix`` (etcd's prefix range)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return bytes(raw).decode()


@dataclass
class Snapshot:
    """The desired state as of one etcd revision."""

    state: State
    revision: int  # the store's revision when read
    generation_rev: int  # mod revision of the generation key (0: never written)
    kvs: KeyValues  # the state's keys and values


@dataclass(frozen=True)
class Event:
    key: str
    value: Optional[bytes]  # None: deleted
    revision: int


class EtcdStore:
    def __init__(self, endpoints: Sequence[Tuple[str, int]], prefix: str = DEFAULT_PREFIX,
                 ca_cert: Optional[str] = None, cert: Optional[str] = None,
                 key: Optional[str] = None, timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        if not prefix.endswith("/"):
            raise ValueError(f"etcd prefix {prefix!r} must end with /")
        self.prefix = prefix
        self.timeout = timeout
        protocol = "https" if ca_cert or cert else "http"
        self.clients = [Etcd3Client(host=h, port=p, protocol=protocol, ca_cert=ca_cert,
                                    cert_key=key, cert_cert=cert, timeout=timeout,
                                    api_path="/v3/") for h, p in endpoints]
        self._current = 0  # the endpoint that answered last

    # ------------------------------------------------------------ transport

    def _post(self, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
        """One gateway call, on the first endpoint that answers."""
        errors = []
        for i in range(len(self.clients)):
            n = (self._current + i) % len(self.clients)
            client = self.clients[n]
            try:
                out = client.post(client.get_url(path), json=body)
                self._current = n
                return dict(out)
            except (ConnectionFailedError, ConnectionTimeoutError) as exc:
                errors.append(f"{client.host}:{client.port}: {type(exc).__name__}")
            except Etcd3Exception as exc:
                raise Refused(f"etcd refused {path}: {' '.join(map(str, exc.args))}") from None
        raise Unavailable("no etcd endpoint answers (" + "; ".join(errors) + ")")

    # ------------------------------------------------------------ reading

    def read(self) -> Snapshot:
        """The whole desired state as of one revision (pages of PAGE keys,
        all read at the first page's revision: one consistent snapshot)."""
        kvs: KeyValues = {}
        gen_rev, revision = 0, 0
        start, end = self.prefix, _range_end(self.prefix)
        while True:
            body: Dict[str, Any] = {"key": _b64(start), "range_end": _b64(end), "limit": PAGE}
            if revision:
                body["revision"] = revision
            out = self._post("/kv/range", body)
            revision = revision or int(out["header"]["revision"])
            page = out.get("kvs", [])
            for kv in page:
                k = _unb64(kv["key"]).decode()
                if k == self.prefix + GENERATION:
                    gen_rev = int(kv["mod_revision"])
                elif is_state_key(k, self.prefix):
                    kvs[k] = _unb64(kv.get("value", ""))
            if not out.get("more") or not page:
                break
            start = _unb64(page[-1]["key"]).decode() + "\0"
        return Snapshot(decode(kvs, self.prefix), revision, gen_rev, kvs)

    def stats(self) -> Dict[str, int]:
        """Keys under the prefix and the database's size in bytes."""
        count = self._post("/kv/range", {"key": _b64(self.prefix),
                                         "range_end": _b64(_range_end(self.prefix)),
                                         "count_only": True})
        status = self._post("/maintenance/status", {})
        return {"keys": int(count.get("count", 0)), "db_bytes": int(status.get("dbSize", 0))}

    # ------------------------------------------------------------ writing

    def commit(self, base: Snapshot, new: State) -> int:
        """Write ``new`` if nothing was written since ``base``; returns the
        revision of the write. Raises Conflict otherwise."""
        puts, deletes = diff(base.kvs, encode(new, self.prefix))
        gen_key = self.prefix + GENERATION
        ops: List[Dict[str, Any]] = [{"request_put": {"key": _b64(k), "value": _b64(v)}}
                                     for k, v in puts.items()]
        ops += [{"request_delete_range": {"key": _b64(k)}} for k in deletes]
        ops.append({"request_put": {"key": _b64(gen_key),
                                    "value": _b64(str(base.generation_rev))}})
        out = self._post("/kv/txn", {
            "compare": [{"key": _b64(gen_key), "result": "EQUAL", "target": "MOD",
                         "mod_revision": base.generation_rev}],
            "success": ops, "failure": []})
        if not out.get("succeeded"):
            raise Conflict("the desired state changed since it was read")
        return int(out["header"]["revision"])

    def put_raw(self, key: str, value: bytes, lease: Optional[int] = None) -> int:
        """One key outside the desired state (nodes/); returns the revision."""
        body: Dict[str, Any] = {"key": _b64(self.prefix + key), "value": _b64(value)}
        if lease is not None:
            body["lease"] = lease
        return int(self._post("/kv/put", body)["header"]["revision"])

    def get_raw(self, key_prefix: str) -> Dict[str, bytes]:
        """The keys (and values) under ``prefix + key_prefix``."""
        start = self.prefix + key_prefix
        out = self._post("/kv/range", {"key": _b64(start), "range_end": _b64(_range_end(start))})
        return {_unb64(kv["key"]).decode(): _unb64(kv.get("value", ""))
                for kv in out.get("kvs", [])}

    def grant(self, ttl: int) -> int:
        """A lease of ``ttl`` seconds; its id."""
        return int(self._post("/lease/grant", {"TTL": ttl})["ID"])

    def keepalive(self, lease: int) -> bool:
        """Renew a lease; False when it has expired."""
        out = self._post("/lease/keepalive", {"ID": lease})
        return int(out.get("result", {}).get("TTL", 0)) > 0

    def compact(self, revision: int) -> None:
        self._post("/kv/compaction", {"revision": revision, "physical": True})

    # ------------------------------------------------------------ watching

    def watch(self, start_revision: int, on_events: Callable[[List[Event]], None],
              stopping: threading.Event) -> None:
        """Deliver every change of the prefix from ``start_revision``, in
        batches of one revision's events, until ``stopping`` is set. Raises
        Compacted when that revision is gone, Unavailable when the stream
        breaks (the caller goes on from the last revision it got)."""
        client = self.clients[self._current]
        body: Dict[str, Any] = {"create_request": {
            "key": _b64(self.prefix), "range_end": _b64(_range_end(self.prefix)),
            "start_revision": start_revision, "progress_notify": True}}
        try:
            resp = client.session.post(client.get_url("/watch"), json=body, stream=True,
                                       timeout=(self.timeout, 15.0))
        except requests.exceptions.RequestException as exc:
            raise Unavailable(f"etcd watch: {exc}") from None
        try:
            for result in self._results(resp, stopping):
                if result.get("compact_revision") and int(result["compact_revision"]):
                    raise Compacted(f"revision {start_revision} compacted (now "
                                    f"{result['compact_revision']})")
                if result.get("canceled"):
                    raise Unavailable(f"etcd canceled the watch: {result.get('cancel_reason')}")
                events = [Event(_unb64(e["kv"]["key"]).decode(),
                                None if e.get("type") == "DELETE" else
                                _unb64(e["kv"].get("value", "")),
                                int(e["kv"]["mod_revision"])) for e in result.get("events", [])]
                if events:
                    on_events(events)
        finally:
            resp.close()

    @staticmethod
    def _results(resp: requests.Response, stopping: threading.Event
                 ) -> Iterator[Dict[str, Any]]:
        try:
            # chunk_size None: each chunk as it arrives (a number waits to fill it)
            for line in resp.iter_lines(chunk_size=None):  # type: ignore[call-overload]
                if stopping.is_set():
                    return
                if not line.strip():
                    continue
                chunk = json.loads(line)
                if "error" in chunk:
                    raise Unavailable(f"etcd watch: {chunk['error']}")
                yield chunk.get("result", {})
        except requests.exceptions.RequestException as exc:
            if not stopping.is_set():
                raise Unavailable(f"etcd watch broke: {exc}") from None
        if not stopping.is_set():
            raise Unavailable("etcd closed the watch")
