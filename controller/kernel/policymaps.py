"""The classification maps as the dataplane writes them (bpf/lib/types.h):
``sg_plens``, ``sg_peers4`` and ``sg_peers`` (IPv4, IPv6), ``sg_ports`` and the
``sg_ports_lpm`` overflow.

- *Classes* are content-addressed and shared by every policy: a class id
  stands for one set of (rule, protocol, ports) forever, so identical rule
  sets are written once and a change writes only the classes it creates.
- *Images*: each group set has two policy ids. The endpoints use the active
  one; a change writes only its difference from the inactive one (which
  holds the version before last) into it, then the endpoints switch to it in
  one update each and the old active becomes the inactive.
  A packet that read the endpoint before the switch may still be in its
  lookups of the old image, so the next change writes into it (and a
  change deletes a policy that was active) only after an RCU grace period
  (``Dataplane.quiesce``; started in the background at each switch).
- A new process does not know the images and classes it finds in the maps:
  it keeps them until the policies using them are replaced, then removes
  them by scanning.
"""

from __future__ import annotations

import ctypes as ct
import socket
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple, Union

from controller import abi
from controller.abi import SEGS_INLINE
from controller.kernel import bpfsys
from controller.policy.compiler import (
    ClassContent,
    PeerPrefix,
    Policy,
    class_segments,
    range_to_prefixes,
)

PlensKeyT = Tuple[int, int]  # (dir index, family)


@dataclass
class Image:
    """What one policy id holds in the maps."""

    peers: Dict[PeerPrefix, int] = field(default_factory=dict)  # -> class id
    plens: Dict[PlensKeyT, Tuple[int, ...]] = field(default_factory=dict)
    top16: Dict[PlensKeyT, bytes] = field(default_factory=dict)  # 8 KiB bitmaps
    world: Dict[PlensKeyT, int] = field(default_factory=dict)  # -> world class id
    cover: Dict[PlensKeyT, Dict[int, int]] = field(default_factory=dict)  # top16_cover()

    def classes(self) -> Set[int]:
        return set(self.peers.values()) | set(self.world.values())


def _mask_words(family: int, plen: int) -> ct.Array[ct.c_uint32]:
    bits = 32 if family == 4 else 128
    mask = ((1 << plen) - 1) << (bits - plen) if plen else 0
    return abi.addr_words(mask.to_bytes(bits // 8, "big"))


def set_top16(bits: bytearray, family: int, plen: int, net: int) -> None:
    """Mark the values of the top 16 address bits that prefix ``net/plen`` covers
    (bit b = byte b>>3, bit b&7: the little-endian __u64 words of the C side)."""
    if plen == 0:
        bits[:] = b"\xff" * len(bits)
        return
    top = net >> ((32 if family == 4 else 128) - 16)
    for b in range(top, top + (1 << (16 - min(plen, 16)))):
        bits[b >> 3] |= 1 << (b & 7)


def _top(family: int, net: int) -> int:
    return net >> ((32 if family == 4 else 128) - 16)


def top16_cover(pol: Policy) -> Dict[PlensKeyT, Dict[int, int]]:
    """Per (dir, family): top-16 value -> how many prefixes of length >= 16
    lie under it (what a change adds to or takes from the bitmap)."""
    out: Dict[PlensKeyT, Dict[int, int]] = {k: {} for k in pol.plens}
    for (d, family, plen, net) in pol.peers:
        if plen >= 16:
            cover = out[(d, family)]
            top = _top(family, net)
            cover[top] = cover.get(top, 0) + 1
    return out


def top16_bitmaps(pol: Policy, cover: Dict[PlensKeyT, Dict[int, int]]
                  ) -> Dict[PlensKeyT, bytes]:
    """Per (dir, family): which values of an address's top 16 bits some
    prefix (or exempt address) covers -- the datapath's first, cheapest test."""
    maps = {k: bytearray(abi.TOP16_WORDS * 8) for k in pol.plens}
    for key, bits in maps.items():
        for top in cover[key]:
            bits[top >> 3] |= 1 << (top & 7)
    exempt = [(d, fam, plen, net) for d, fam in pol.plens for fam2, plen, net in pol.exempt
              if fam2 == fam]
    short = [k for k in pol.peers if k[2] < 16]
    for (d, family, plen, net) in [*short, *exempt]:
        if (d, family) in maps:
            set_top16(maps[(d, family)], family, plen, net)
    return {k: bytes(v) for k, v in maps.items()}


PEER_MAPS = {4: "sg_peers4", 6: "sg_peers"}  # family -> its prefixes' map


def _peer_key(pid: int, k: PeerPrefix) -> Union[abi.Peer4Key, abi.PeerKey]:
    d, family, plen, net = k
    if family == 4:
        return abi.Peer4Key(policy_id=pid, dir=d, plen=plen,
                            addr=abi.addr_words(net.to_bytes(4, "big"))[0])
    return abi.PeerKey(policy_id=pid, dir=d, family=family, plen=plen,
                       addr=abi.addr_words(net.to_bytes(16, "big")))


class PolicyMaps:
    def __init__(self, map_of: Callable[[str], bpfsys.Map]) -> None:
        self.map_of = map_of
        self.classes: Dict[ClassContent, int] = {}
        self.class_keys: Dict[int, Tuple[List[int], List[abi.PortKey]]] = {}
        self.images: Dict[int, Image] = {}
        self.foreign: Optional[Set[int]] = None  # class ids found at start
        self.next_class = 1
        # group set -> (serial, image, exempt entries) of its last compile's image
        self.built: Dict[Tuple[str, ...], Tuple[int, Image, Tuple[Tuple[int, int, int], ...]]] = {}

    def start(self, next_class: int) -> None:
        """Once per process: learn which class ids the maps already use."""
        if self.foreign is not None:
            return
        self.foreign = {k.cls for k in self.map_of("sg_ports").keys()}  # type: ignore[attr-defined]
        self.next_class = max([next_class, *[c + 1 for c in self.foreign]])

    # ------------------------------------------------------------ classes

    def intern(self, content: ClassContent) -> int:
        cls = self.classes.get(content)
        if cls is not None:
            return cls
        cls = self.next_class
        self.next_class += 1
        protos, lpm_keys = [], []
        keys, vals = [], []
        lpm = self.map_of("sg_ports_lpm")
        for proto, segs in class_segments(content).items():
            val = abi.Ports()
            if len(segs) <= SEGS_INLINE:
                val.n = len(segs)
                for i, (lo, hi, idx, flags) in enumerate(segs):
                    val.seg[i] = abi.Seg(lo=lo, hi=hi, rule_index=idx, flags=flags)
            else:
                val.n = abi.SEGS_LPM
                for lo, hi, idx, flags in segs:
                    for port, plen in range_to_prefixes(lo, hi):
                        k = abi.PortKey(prefixlen=48 + plen, cls=cls, proto=proto,
                                        port=socket.htons(port))
                        lpm.update(k, abi.PortVal(rule_index=idx, flags=flags))
                        lpm_keys.append(k)
            keys.append(abi.PortsKey(cls=cls, proto=proto))
            vals.append(val)
            protos.append(proto)
        self.map_of("sg_ports").update_batch(keys, vals)
        self.classes[content] = cls
        self.class_keys[cls] = (protos, lpm_keys)
        return cls

    def image_of(self, pol: Policy) -> Image:
        """The image of a compiled policy: from the image of the group set's
        previous compile when ``pol`` says what changed since (only its
        changed prefixes are interned and only their top-16 bits redone),
        else from scratch."""
        last = self.built.get(pol.groups)
        if last is not None and pol.since is not None and last[0] == pol.since:
            img = self._patched(pol, last[1], last[2])
        else:
            cover = top16_cover(pol)
            img = Image(peers={k: self.intern(c) for k, c in pol.peers.items()},
                        plens=dict(pol.plens), top16=top16_bitmaps(pol, cover),
                        world={k: self.intern(c) for k, c in pol.world.items()}, cover=cover)
        self.built[pol.groups] = (pol.serial, img, pol.exempt)
        return img

    def _patched(self, pol: Policy, old: Image, old_exempt: Tuple[Tuple[int, int, int], ...]
                 ) -> Image:
        peers = dict(old.peers)
        cover = {k: dict(v) for k, v in old.cover.items()}
        cleared = False
        for key in pol.changed:
            content = pol.peers.get(key)
            had = key in peers
            if content is None:
                peers.pop(key, None)
            else:
                peers[key] = self.intern(content)
            if had == (content is not None) or key[2] < 16:
                continue  # the prefix's presence did not change (short ones: below)
            slot = cover.setdefault(key[:2], {})
            top = _top(key[1], key[3])
            n = slot.get(top, 0) + (1 if content is not None else -1)
            if n:
                slot[top] = n
            else:
                del slot[top]
                cleared = True
        img = Image(peers=peers, plens=dict(pol.plens),
                    world={k: self.intern(c) for k, c in pol.world.items()}, cover=cover)
        if cleared or pol.exempt != old_exempt or pol.plens.keys() != old.plens.keys() or any(
                k[2] < 16 for k in pol.changed):
            img.top16 = top16_bitmaps(pol, cover)
        else:  # bits are only added
            img.top16 = {}
            for slot_key, bitmap in old.top16.items():
                new_tops = [k for k in pol.changed if k[:2] == slot_key]
                if not new_tops:
                    img.top16[slot_key] = bitmap
                    continue
                bits = bytearray(bitmap)
                for k in new_tops:
                    top = _top(k[1], k[3])
                    bits[top >> 3] |= 1 << (top & 7)
                img.top16[slot_key] = bytes(bits)
        return img

    # ------------------------------------------------------------ images

    def write(self, pid: int, new: Image, old: Optional[Image]) -> int:
        """Make policy id ``pid`` hold ``new``; ``old`` is what it holds now
        (None: nothing). Returns the number of map entries written or deleted."""
        old = old or Image()
        plens = self.map_of("sg_plens")
        up = [(k, c) for k, c in new.peers.items() if old.peers.get(k) != c]
        gone = [k for k in old.peers if k not in new.peers]
        for family, name in PEER_MAPS.items():
            peers = self.map_of(name)
            mine = [(k, c) for k, c in up if k[1] == family]
            peers.update_batch([_peer_key(pid, k) for k, _ in mine],
                               [ct.c_uint32(c) for _, c in mine])
            peers.delete_many([_peer_key(pid, k) for k in gone if k[1] == family])
        for (d, family), lens in new.plens.items():
            bitmap = new.top16[(d, family)]
            if old.plens.get((d, family)) != lens or old.top16.get((d, family)) != bitmap:
                val = abi.Plens(n=len(lens))
                for i, plen in enumerate(lens):
                    val.len[i] = abi.Plen(mask=_mask_words(family, plen), plen=plen)
                ct.memmove(ct.addressof(val.top16), bitmap, len(bitmap))
                plens.update(abi.PlensKey(policy_id=pid, dir=d, family=family), val)
        for d, family in old.plens:
            if (d, family) not in new.plens:
                plens.delete(abi.PlensKey(policy_id=pid, dir=d, family=family))
        self.images[pid] = new
        return len(up) + len(gone)

    def delete_policy(self, pid: int) -> None:
        img = self.images.pop(pid, None)
        if img is not None:
            self.write(pid, Image(), img)
            self.images.pop(pid, None)
            return
        for name in (*PEER_MAPS.values(), "sg_plens"):  # an id of an earlier process: scan
            m = self.map_of(name)
            m.delete_many([k for k in m.keys() if k.policy_id == pid])  # type: ignore[attr-defined]

    def gc_classes(self, unknown_policies: bool) -> int:
        """Delete classes no image uses. Classes found at start are kept while
        a policy of an earlier process (whose classes we do not know) lives."""
        live: Set[int] = set()
        for img in self.images.values():
            live |= img.classes()
        dead = [c for c in self.class_keys if c not in live]
        ports, lpm = self.map_of("sg_ports"), self.map_of("sg_ports_lpm")
        for cls in dead:
            protos, lpm_keys = self.class_keys.pop(cls)
            ports.delete_many([abi.PortsKey(cls=cls, proto=p) for p in protos])
            for k in lpm_keys:
                lpm.delete(k)
        self.classes = {k: c for k, c in self.classes.items() if c in self.class_keys}
        written = {id(img) for img in self.images.values()}  # patch only from a live image
        self.built = {g: b for g, b in self.built.items() if id(b[1]) in written}
        if self.foreign and not unknown_policies:
            old = self.foreign - live
            ports.delete_many([k for k in ports.keys() if k.cls in old])  # type: ignore[attr-defined]
            for k in lpm.keys():
                if k.cls in old:  # type: ignore[attr-defined]
                    lpm.delete(k)
            self.foreign = set()
            return len(dead) + len(old)
        return len(dead)
