"""Document text -> Python objects, with bounds a hostile document cannot pass.

JSON first, then YAML (libyaml's C parser when present). Both refuse:
documents over ``MAX_DOCUMENT_BYTES``, nesting deeper than ``MAX_DEPTH``,
duplicate mapping keys (a later key would silently replace an earlier
object) and, in YAML, aliases (``*a``, ``<<: *a``: the expansion is what an
alias bomb multiplies). The YAML tree is checked as nodes, before any
object is built, so a bomb costs its own size and no more.
CloudFormation's short intrinsics (``!Ref x``, ``!GetAtt a.b``, ``!Sub``…)
become their long forms (``{"Ref": "x"}``).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

import yaml

from ..model import ValidationError

MAX_DOCUMENT_BYTES = 48 << 20  # ~250k rules in YAML; the API body limit is above it
MAX_DEPTH = 64  # nesting of mappings/sequences (a template needs about 12)

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
WITH_LIBYAML = _Base is not yaml.SafeLoader


def _error(where: str, message: str) -> ValidationError:
    return ValidationError("document", where, message)


class _Loader(_Base):  # type: ignore[misc,valid-type]
    """Safe YAML plus CloudFormation's short-form tags."""


def _tag(name: str, split_dot: bool = False):  # type: ignore[no-untyped-def]
    def construct(loader: Any, node: yaml.Node) -> Dict[str, Any]:
        if isinstance(node, yaml.ScalarNode):
            val: Any = loader.construct_scalar(node)
            if split_dot:
                val = str(val).split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            val = loader.construct_sequence(node, deep=True)
        else:
            val = loader.construct_mapping(node, deep=True)
        return {name: val}
    return construct


_Loader.add_constructor("!Ref", _tag("Ref"))
_Loader.add_constructor("!GetAtt", _tag("Fn::GetAtt", split_dot=True))
for _short in ("Sub", "Join", "Select", "Split", "ImportValue", "Base64", "GetAZs", "If",
               "Equals", "And", "Or", "Not", "FindInMap", "Cidr"):
    _Loader.add_constructor(f"!{_short}", _tag(f"Fn::{_short}"))


def _line(node: yaml.Node) -> str:
    return f"line {node.start_mark.line + 1}"


def _check_nodes(root: yaml.Node) -> None:
    """Every node once (no aliases), depth bounded, keys scalar and unique."""
    seen: set = set()
    stack: List[Tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if id(node) in seen:
            raise _error(_line(node), "YAML aliases (*name, <<: *name) are not accepted: "
                         "write the value out")
        seen.add(id(node))
        if depth > MAX_DEPTH:
            raise _error(_line(node), f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            keys: Dict[str, yaml.Node] = {}
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode):
                    raise _error(_line(key), "a mapping key must be a plain value")
                if key.tag == "tag:yaml.org,2002:merge":
                    raise _error(_line(key), "YAML merge keys (<<) are not accepted")
                if key.value in keys:
                    raise _error(_line(key), f"duplicate key {key.value!r} (first at "
                                 f"{_line(keys[key.value])}): one of them would be lost")
                keys[key.value] = key
                stack.append((value, depth + 1))


def parse_yaml(text: str) -> Any:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node)
        return loader.construct_document(node)
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
