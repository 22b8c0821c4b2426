"""Document text -> Python objects, with bounds a hostile document cannot pass.

JSON first, then YAML (libyaml's C parser when present). Both refuse:
documents over ``MAX_DOCUMENT_BYTES``, nesting deeper than ``MAX_DEPTH``,
duplicate mapping keys (a later key would silently replace an earlier
object) and, in YAML, aliases (``*a``, ``<<: *a``: the expansion is what an
alias bomb multiplies). YAML is built straight from the parser's events
with those checks on the way, so a bomb costs its own size and no more.
CloudFormation's short intrinsics (``!Ref x``, ``!GetAtt a.b``, ``!Sub``…)
become their long forms (``{"Ref": "x"}``).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

import yaml

from controller.policy.errors import ValidationError

MAX_DOCUMENT_BYTES = 48 << 20  # ~250k rules in YAML; the API body limit is above it
MAX_DEPTH = 64  # nesting of mappings/sequences (a template needs about 12)

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
WITH_LIBYAML = _Base is not yaml.SafeLoader


def _error(where: str, message: str) -> ValidationError:
    return ValidationError("document", where, message)


class _Loader(_Base):  # type: ignore[misc,valid-type]
    """libyaml's parser with PyYAML's safe resolver and scalar constructors."""

    _by_first: Dict[str, list] = {}

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        """PyYAML's resolver, with the candidate list per first character
        computed once: a plain scalar is resolved in one dict lookup and its
        regexes (the generic version costs ~75% of a 100k-rule load)."""
        if kind is yaml.ScalarNode and implicit[0]:
            first = value[:1]
            cands = self._by_first.get(first)
            if cands is None:
                cands = (self.yaml_implicit_resolvers.get(first, [])
                         + self.yaml_implicit_resolvers.get(None, []))
                self._by_first[first] = cands
            for tag, regexp in cands:
                if regexp.match(value):
                    return tag
            return self.DEFAULT_SCALAR_TAG
        return super().resolve(kind, value, implicit)


# CloudFormation's short forms: tag -> the long form's key
SHORT_FORMS = {"!Ref": "Ref", "!GetAtt": "Fn::GetAtt",
               **{f"!{n}": f"Fn::{n}" for n in (
                   "Sub", "Join", "Select", "Split", "ImportValue", "Base64", "GetAZs", "If",
                   "Equals", "And", "Or", "Not", "FindInMap", "Cidr")}}
_COLLECTION_TAGS = ("tag:yaml.org,2002:seq", "tag:yaml.org,2002:map")
_MERGE = "tag:yaml.org,2002:merge"
_STR = "tag:yaml.org,2002:str"
_UNSET = object()


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}"


class _Frame:
    """A collection being built: its container, the keys seen (mapping), a
    key waiting for its value, and the short form it is the argument of."""

    __slots__ = ("value", "keys", "key", "wrap", "mark")

    def __init__(self, value: Any, wrap: Optional[str], mark: Any) -> None:
        self.value = value
        self.mark = mark
        self.keys: Dict[Any, Any] = {}
        self.key: Any = _UNSET
        self.wrap = wrap


def _build(loader: Any) -> Any:
    """libyaml's events -> Python objects in one pass, refusing as it goes:
    aliases, merge keys, tags other than the standard ones and
    CloudFormation's, keys that are not plain values or are repeated, and
    nesting deeper than MAX_DEPTH. Nothing an alias could multiply is ever
    built, and no node tree is kept (half the time of compose + construct)."""
    loader.get_event()  # stream start
    if loader.check_event(yaml.StreamEndEvent):
        return None
    loader.get_event()  # document start
    root: Any = _UNSET
    stack: List[_Frame] = []
    constructors = loader.yaml_constructors

    def put(value: Any, mark: Any, raw: Optional[str]) -> None:
        nonlocal root
        if not stack:
            root = value
            return
        top = stack[-1]
        if isinstance(top.value, list):
            top.value.append(value)
        elif top.key is _UNSET:
            if raw is None or not isinstance(value, (str, int, float, bool)) and value is not None:
                raise _error(_where(mark), "a mapping key must be a plain value")
            if value in top.keys:
                raise _error(_where(mark), f"duplicate key {raw!r} (first at "
                             f"{top.keys[value]}): one of them would be lost")
            top.keys[value] = _where(mark)
            top.key = value
        else:
            top.value[top.key] = value
            top.key = _UNSET

    while True:
        ev = loader.get_event()
        kind = type(ev)
        if kind is yaml.ScalarEvent:
            tag = ev.tag
            if tag in SHORT_FORMS:
                arg: Any = ev.value.split(".", 1) if tag == "!GetAtt" else ev.value
                put({SHORT_FORMS[tag]: arg}, ev.start_mark, None)
                continue
            if tag is None or tag == "!":
                tag = loader.resolve(yaml.ScalarNode, ev.value, ev.implicit)
            if tag == _STR:  # most scalars: the text is the value
                put(ev.value, ev.start_mark, ev.value)
                continue
            if tag == _MERGE:
                raise _error(_where(ev.start_mark), "YAML merge keys (<<) are not accepted")
            fn = constructors.get(tag)
            if fn is None or not tag.startswith("tag:yaml.org,2002:"):
                raise _error(_where(ev.start_mark), f"the tag {tag} is not accepted")
            node = yaml.ScalarNode(tag, ev.value, ev.start_mark, ev.end_mark, style=ev.style)
            put(fn(loader, node), ev.start_mark, ev.value)
        elif kind is yaml.SequenceStartEvent or kind is yaml.MappingStartEvent:
            if len(stack) >= MAX_DEPTH:
                raise _error(_where(ev.start_mark), f"nested deeper than {MAX_DEPTH} levels")
            wrap = SHORT_FORMS.get(ev.tag) if ev.tag else None
            if ev.tag not in (None, "!", *_COLLECTION_TAGS) and wrap is None:
                raise _error(_where(ev.start_mark), f"the tag {ev.tag} is not accepted")
            stack.append(_Frame([] if kind is yaml.SequenceStartEvent else {}, wrap,
                                ev.start_mark))
        elif kind is yaml.SequenceEndEvent or kind is yaml.MappingEndEvent:
            frame = stack.pop()
            put(frame.value if frame.wrap is None else {frame.wrap: frame.value}, frame.mark,
                None)
        elif kind is yaml.AliasEvent:
            raise _error(_where(ev.start_mark), "YAML aliases (*name) are not accepted: "
                         "write the value out")
        elif kind is yaml.DocumentEndEvent:
            break
    if not loader.check_event(yaml.StreamEndEvent):
        raise _error("(syntax)", "more than one YAML document (---): give one")
    return None if root is _UNSET else root


def parse_yaml(text: str) -> Any:
    loader = _Loader(text)
    try:
        return _build(loader)
    except ValidationError:
        raise
    except yaml.YAMLError as exc:
        raise _error("(syntax)", f"not valid YAML: {exc}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. int('9' * 5000), !!binary
        raise _error("(syntax)", f"a YAML value cannot be read: {exc}") from None
    finally:
        loader.dispose()


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _error("(syntax)", f"duplicate key {key!r}: one of them would be lost")
        out[key] = value
    return out


def _depth_ok(doc: Any) -> None:
    stack = [(doc, 1)]
    while stack:
        val, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _error("(syntax)", f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(val, dict):
            stack.extend((v, depth + 1) for v in val.values())
        elif isinstance(val, list):
            stack.extend((v, depth + 1) for v in val)


def check_object(doc: Any) -> None:
    """The bounds for a document that arrives already parsed (an API body)."""
    _depth_ok(doc)


def parse(text: str) -> Any:
    """JSON or YAML text -> objects; ValidationError naming what is wrong."""
    if not isinstance(text, str):
        raise _error("(document)", "must be text")
    if len(text) > MAX_DOCUMENT_BYTES:
        raise _error("(size)", f"{len(text)} bytes, at most {MAX_DOCUMENT_BYTES}")
    if text.lstrip()[:1] in ("{", "["):
        try:
            doc = json.loads(text, object_pairs_hook=_no_duplicates)
        except RecursionError:
            raise _error("(syntax)", f"nested deeper than {MAX_DEPTH} levels") from None
        except ValueError as exc:
            if isinstance(exc, ValidationError):
                raise
            doc = _NOT_JSON
        if doc is not _NOT_JSON:
            _depth_ok(doc)
            return doc
    return parse_yaml(text)


_NOT_JSON = object()
