"""This agent's link to the fleet: the desired state in etcd (etcdstore.py),
followed by a watch and written in compare-and-swap transactions, and the
agent's own registration under a lease.

The agent enforces what it last got from etcd; while etcd is unreachable it
goes on enforcing it (and keeps it in its state dir, so a restart without
etcd enforces it too), answers reads from it marked stale, and refuses
writes. Back in touch, it reads the state again (one consistent range read)
and watches from there; a watch stream that merely went quiet is re-opened
from the last revision, and a compacted one makes it read everything again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import orjson

from controller.policy.formats.keyspace import (
    DEFAULT_PREFIX,
    KeyValues,
    is_state_key,
    patch,
)
from controller.policy.model import State, validate
from controller.service.etcdstore import (
    GENERATION,
    NODES,
    Compacted,
    Conflict,
    EtcdStore,
    Event,
    Snapshot,
    Unavailable,
)

log = logging.getLogger("sgctl")

LEASE_TTL = 10  # seconds a node stays listed after its agent stops renewing
RETRY_SECONDS = 0.5  # between attempts to reach etcd again
WRITE_ATTEMPTS = 5  # a write that keeps losing the compare-and-swap says Conflict


@dataclass
class EtcdConfig:
    endpoints: List[Tuple[str, int]]
    prefix: str = DEFAULT_PREFIX
    ca_cert: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None


def parse_datastore(text: str) -> Optional[EtcdConfig]:
    """``local`` -> None; ``etcd://HOST:PORT[,HOST:PORT...]`` -> its endpoints."""
    if text == "local":
        return None
    if not text.startswith("etcd://"):
        raise ValueError(f"--datastore {text!r}: local or etcd://HOST:PORT[,HOST:PORT...]")
    endpoints = []
    for part in text[len("etcd://"):].split(","):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--datastore: {part!r} is not HOST:PORT")
        endpoints.append((host.strip("[]"), int(port)))
    return EtcdConfig(endpoints)


@dataclass
class Health:
    revision: int = 0  # the revision of the state this agent enforces
    stale_since: Optional[float] = None  # wall clock: etcd unreachable since then
    last_error: str = ""
    nodes: Dict[str, Any] = field(default_factory=dict)


class Fleet:
    def __init__(self, cfg: EtcdConfig, node: str,
                 on_state: Callable[[State, int], None]) -> None:
        self.store = EtcdStore(cfg.endpoints, cfg.prefix, cfg.ca_cert, cfg.cert, cfg.key)
        self.node = node
        self.on_state = on_state  # enforce this state (of this revision); called by one thread
        self.health = Health()
        # what the watch has delivered: the state, its keys, the generation
        # key's revision (a write's first attempt starts from it)
        self.kvs: KeyValues = {}
        self.current: Optional[State] = None
        self.gen_rev = 0
        self.cache_lock = threading.Lock()
        self.applied = threading.Condition()
        self.lease: Optional[int] = None

    # ------------------------------------------------------------ following

    def sync(self) -> bool:
        """Read everything and enforce it; False when etcd is unreachable."""
        try:
            snap = self.store.read()
        except Unavailable as exc:
            self._unreachable(exc)
            return False
        with self.cache_lock:
            self.kvs, self.current, self.gen_rev = dict(snap.kvs), snap.state, snap.generation_rev
        self._reachable()
        self._enforce(snap.state, snap.revision)
        return True

    def run(self, stopping: threading.Event) -> None:
        """Follow etcd until ``stopping``: watch from the last revision,
        re-read after a compaction, retry while etcd is away."""
        while not stopping.is_set():
            if self.health.stale_since is not None and not self.sync():
                stopping.wait(RETRY_SECONDS)
                continue
            try:
                self.store.watch(self.health.revision + 1, self._events, stopping)
            except Compacted as exc:
                log.warning("fleet: %s; reading everything again", exc)
                self.health.stale_since = time.time()  # next turn re-reads
            except Unavailable as exc:
                if stopping.is_set() or self._alive():
                    continue  # a quiet stream timed out: watch again from where we are
                self._unreachable(exc)
                stopping.wait(RETRY_SECONDS)

    def _alive(self) -> bool:
        try:
            self.store.stats()
            return True
        except Unavailable:
            return False

    def _events(self, events: List[Event]) -> None:
        """One batch of the watch: only the changed keys are parsed
        (``keyspace.patch``), the rest of the state is shared."""
        changes: Dict[str, Optional[bytes]] = {}
        rev = self.health.revision
        gen_rev = None
        for e in events:
            rev = max(rev, e.revision)
            if e.key == self.store.prefix + GENERATION:
                gen_rev = e.revision
            elif is_state_key(e.key, self.store.prefix):
                changes[e.key] = e.value
        state = None
        if changes:
            try:
                base = self.current if self.current is not None else State()
                state = patch(base, changes, self.store.prefix)
            except ValueError as exc:  # (ValidationError) a writer bypassed sgctl: keep the last
                log.error("fleet: revision %d is not a valid state, not enforced: %s", rev, exc)
        with self.cache_lock:  # the raw keys follow etcd even when the state is refused
            for k, v in changes.items():
                if v is None:
                    self.kvs.pop(k, None)
                else:
                    self.kvs[k] = v
            if gen_rev is not None:
                self.gen_rev = gen_rev
            if state is not None:
                self.current = state
        if state is not None:
            self._enforce(state, rev)
        else:
            self._advance(rev)

    def _enforce(self, state: State, revision: int) -> None:
        try:
            self.on_state(state, revision)
        except Exception as exc:  # the agent's problem, not the fleet's: keep following
            log.error("fleet: revision %d could not be enforced here: %s", revision, exc)
        self._advance(revision)

    def _advance(self, revision: int) -> None:
        with self.applied:
            self.health.revision = max(self.health.revision, revision)
            self.applied.notify_all()

    def wait_applied(self, revision: int, timeout: float = 10.0) -> bool:
        """Until this agent enforces ``revision`` (or later)."""
        with self.applied:
            return self.applied.wait_for(lambda: self.health.revision >= revision, timeout)

    def _unreachable(self, exc: Exception) -> None:
        if self.health.stale_since is None:
            self.health.stale_since = time.time()
            log.error("fleet: etcd unreachable, enforcing revision %d: %s",
                      self.health.revision, exc)
        self.health.last_error = str(exc)

    def _reachable(self) -> None:
        if self.health.stale_since is not None:
            log.info("fleet: etcd reachable again after %.1f s",
                     time.time() - self.health.stale_since)
        self.health.stale_since = None
        self.health.last_error = ""

    # ------------------------------------------------------------ writing

    def write(self, change: Callable[[State], Tuple[State, Dict[str, Any]]]
              ) -> Tuple[Dict[str, Any], int]:
        """Apply ``change`` (state -> (new state, answer)) to the fleet's
        current state in one compare-and-swap transaction; on a concurrent
        write, again on the fresh state. Returns the answer and the revision
        written. Unavailable and Conflict say why nothing was written."""
        for attempt in range(WRITE_ATTEMPTS):
            snap = self._cached() if attempt == 0 else None
            if snap is None:
                snap = self.store.read()
            new, answer = change(snap.state.copy())
            validate(new)
            try:
                return answer, self.store.commit(snap, new)
            except Conflict:
                continue
        raise Conflict(f"the state kept changing under this write ({WRITE_ATTEMPTS} attempts)")

    def _cached(self) -> Optional[Snapshot]:
        """What the watch delivered, as a base for a write (a stale one
        loses the compare-and-swap and the write reads afresh)."""
        with self.cache_lock:
            if self.current is None or self.health.stale_since is not None:
                return None
            return Snapshot(self.current, self.health.revision, self.gen_rev, dict(self.kvs))

    # ------------------------------------------------------------ this node

    def register(self, interfaces: List[str]) -> None:
        """This node's key, under a lease that lapses when the agent stops."""
        if self.lease is None:
            self.lease = self.store.grant(LEASE_TTL)
        self.store.put_raw(NODES + self.node, orjson.dumps(
            {"node": self.node, "seen": time.time(), "interfaces": sorted(interfaces),
             "revision": self.health.revision}), lease=self.lease)

    def heartbeat(self, stopping: threading.Event, interfaces: Callable[[], List[str]]) -> None:
        while not stopping.wait(LEASE_TTL / 3):
            try:
                if self.lease is not None and not self.store.keepalive(self.lease):
                    self.lease = None  # expired (etcd was away longer than the TTL)
                self.register(interfaces())
            except Unavailable:
                self.lease = None  # it lapses while etcd is away: a new one next time
            except Exception as exc:  # (a lease that expired meanwhile)
                log.warning("fleet: node registration: %s", exc)
                self.lease = None

    def nodes(self) -> Dict[str, Any]:
        """The live nodes as they registered (empty when etcd is away)."""
        try:
            raw = self.store.get_raw(NODES)
        except Unavailable:
            return {}
        return {k.rsplit("/", 1)[-1]: orjson.loads(v) for k, v in raw.items()}
