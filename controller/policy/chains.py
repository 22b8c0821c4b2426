"""How the prefixes of one (policy, direction, family) nest, kept up to date
change by change -- the index behind the compiler's fold (compiler.py,
step 1): a prefix with ``CHAIN_MAX - 1`` nested prefixes below it carries
the rules of all its ancestors.

Each prefix has a *parent* (the longest other prefix containing it), its
*children* and a *height* (0 for a prefix with nothing inside it, else one
more than its highest child). ``out(p)`` is the rule set a prefix's class
holds: its own rules, or for a *deep* prefix (height >= CHAIN_MAX - 1 and a
parent) the union along its chain of parents.

A change (prefixes added, removed, their own rules changed) returns the
prefixes whose ``out`` may have changed: the touched ones and their deep
descendants (only a deep prefix's class depends on its ancestors, and
nothing below a prefix of height < CHAIN_MAX - 1 is deep), plus the
ancestors whose height changed. Many changes at once are cheaper as a
rebuild, which sorts once instead of scanning siblings per prefix.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set, Tuple

from controller.abi import CHAIN_MAX

Prefix = Tuple[int, int]  # (prefix length, network as int)
DEEP = CHAIN_MAX - 1  # the height from which a prefix carries its ancestors' rules
REBUILD_AT = 256  # prefixes added or removed at once from which a rebuild is cheaper


class Chains:
    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.parent: Dict[Prefix, Optional[Prefix]] = {}
        self.children: Dict[Optional[Prefix], Set[Prefix]] = {None: set()}
        self.height: Dict[Prefix, int] = {}
        self.per_plen: Dict[int, int] = {}  # prefix length -> how many prefixes have it
        self._plens: Optional[List[int]] = []  # the lengths present, longest first (cache)

    def _mask(self, plen: int) -> int:
        full = (1 << self.bits) - 1
        return full ^ ((1 << (self.bits - plen)) - 1)

    def plens(self) -> List[int]:
        if self._plens is None:
            self._plens = sorted(self.per_plen, reverse=True)
        return self._plens

    def _find_parent(self, p: Prefix) -> Optional[Prefix]:
        for plen in self.plens():
            if plen < p[0]:
                sup = (plen, p[1] & self._mask(plen))
                if sup in self.parent:
                    return sup
        return None

    def _count(self, plen: int, delta: int) -> None:
        n = self.per_plen.get(plen, 0) + delta
        if n:
            self.per_plen[plen] = n
        else:
            del self.per_plen[plen]
        if (n == 0) or (n == delta):  # a length appeared or went
            self._plens = None

    def is_deep(self, p: Prefix) -> bool:
        return self.height[p] >= DEEP and self.parent[p] is not None

    # ------------------------------------------------------------ changes

    def rebuild(self, prefixes: Iterable[Prefix]) -> None:
        self.parent, self.children, self.height, self.per_plen = {}, {None: set()}, {}, {}
        self._plens = None
        ordered = sorted(prefixes)  # shortest first: a parent is known before its children
        for p in ordered:
            self._count(p[0], 1)
        for p in ordered:
            par = self._find_parent(p)
            self.parent[p] = par
            self.children.setdefault(par, set()).add(p)
            self.height[p] = 0
        for p in reversed(ordered):  # longest first: children's heights are final
            par = self.parent[p]
            if par is not None and self.height[par] < self.height[p] + 1:
                self.height[par] = self.height[p] + 1

    def _reheight(self, start: Optional[Prefix], changed: Set[Prefix]) -> None:
        """Recompute heights from ``start`` up while they change."""
        p = start
        while p is not None:
            kids = self.children.get(p)
            h = 1 + max(self.height[c] for c in kids) if kids else 0
            if h == self.height[p]:
                return
            self.height[p] = h
            changed.add(p)
            p = self.parent[p]

    def add(self, p: Prefix, changed: Set[Prefix]) -> None:
        par = self._find_parent(p)
        self._count(p[0], 1)
        self.parent[p], self.height[p] = par, 0
        mine: Set[Prefix] = set()
        if p[0] < self.bits:  # a host prefix contains nothing else
            mask = self._mask(p[0])
            siblings = self.children.setdefault(par, set())
            mine = {c for c in siblings if c[0] > p[0] and c[1] & mask == p[1]}
            siblings -= mine
            for c in mine:
                self.parent[c] = p
        self.children.setdefault(par, set()).add(p)
        if mine:
            self.children[p] = mine
            self.height[p] = 1 + max(self.height[c] for c in mine)
        changed.add(p)
        self._reheight(par, changed)

    def remove(self, p: Prefix, changed: Set[Prefix]) -> None:
        par = self.parent.pop(p)
        del self.height[p]
        self._count(p[0], -1)
        self.children[par].discard(p)
        kids = self.children.pop(p, set())
        for c in kids:
            self.parent[c] = par
            changed.add(c)  # its chain lost a prefix
        self.children.setdefault(par, set()).update(kids)
        changed.discard(p)
        self._reheight(par, changed)

    def affected(self, touched: Iterable[Prefix]) -> Set[Prefix]:
        """``touched`` (still present) and their deep descendants."""
        out: Set[Prefix] = set()
        stack = [p for p in touched if p in self.parent]
        while stack:
            p = stack.pop()
            if p in out:
                continue
            out.add(p)
            stack.extend(c for c in self.children.get(p, ()) if self.height[c] >= DEEP)
        return out

    def chain(self, p: Prefix) -> List[Prefix]:
        """``p`` and its ancestors."""
        out = []
        q: Optional[Prefix] = p
        while q is not None:
            out.append(q)
            q = self.parent[q]
        return out
