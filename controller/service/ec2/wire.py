"""The EC2 Query protocol, derived from EC2's service model (botocore's
``ec2/2016-11-15/service-2.json``), never hand-written per action.

Requests: ``Action=X&Version=2016-11-15&IpPermissions.1.IpRanges.1.CidrIp=...``.
A member travels under its ``queryName``, else its ``locationName`` with a
capital first letter, else its own name; list elements are ``.1``, ``.2``...
(botocore's EC2Serializer writes exactly this; ``parse`` reads it back into
the parameters the JSON API takes: member names, typed values).

Answers: ``<XResponse xmlns=...><requestId>..</requestId>`` and the output
shape's members under their ``locationName``, lists as ``<item>`` elements.
Errors: ``<Response><Errors><Error><Code>..``."""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple
from xml.etree import ElementTree as ET

from botocore.loaders import create_loader
from botocore.model import OperationModel, ServiceModel, Shape

from controller.policy.errors import ApiError

API_VERSION = "2016-11-15"
XMLNS = f"http://ec2.amazonaws.com/doc/{API_VERSION}/"
MAX_PARAMS = 20000  # name=value pairs in one request
MAX_INDEX = 100000  # a list element's number (``Foo.N``)
MAX_DEPTH = 12  # dots in one parameter name
_INT = re.compile(r"-?[0-9]{1,19}\Z")


@functools.cache
def service() -> ServiceModel:
    """EC2's model, as the installed botocore has it."""
    return ServiceModel(create_loader().load_service_model("ec2", "service-2", API_VERSION), "ec2")


def operation(action: str) -> OperationModel:
    return service().operation_model(action)


def wire_name(shape: Shape, name: str) -> str:
    """The name a member travels under in a request (EC2Serializer's rule)."""
    ser = shape.serialization
    if "queryName" in ser:
        return str(ser["queryName"])
    if "name" in ser:
        loc = str(ser["name"])
        return loc[0].upper() + loc[1:]
    return name


# --------------------------------------------------------------------------- requests


def parse(pairs: Sequence[Tuple[str, str]], op: OperationModel) -> Dict[str, Any]:
    """Form pairs (without Action and Version) -> the action's parameters."""
    if len(pairs) > MAX_PARAMS:
        raise ApiError("InvalidParameterValue", f"{len(pairs)} parameters, at most {MAX_PARAMS}")
    tree: Dict[str, Any] = {}
    for key, value in pairs:
        parts = key.split(".")
        if len(parts) > MAX_DEPTH or not all(parts):
            raise ApiError("InvalidParameter", f"The parameter {key!r} is malformed")
        node = tree
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            have = node.get(part)
            if last:
                if have is not None:
                    raise ApiError("InvalidParameterCombination",
                                   f"The parameter {key} is given more than once")
                node[part] = value
            else:
                if have is None:
                    have = node[part] = {}
                elif not isinstance(have, dict):
                    raise ApiError("InvalidParameter",
                                   f"The parameter {'.'.join(parts[:i + 1])} is a value "
                                   f"and also has members ({key})")
                node = have
    shape = op.input_shape
    if shape is None:
        if tree:
            raise ApiError("UnknownParameter",
                           f"The parameter {next(iter(tree))} is not recognized")
        return {}
    return _structure(tree, shape, "")


def _structure(node: Any, shape: Shape, path: str) -> Dict[str, Any]:
    if not isinstance(node, dict):
        raise ApiError("InvalidParameterValue", f"{path} needs members, not a value")
    members = {wire_name(m, n): (n, m) for n, m in shape.members.items()}
    out: Dict[str, Any] = {}
    for key, child in node.items():
        if key not in members:
            raise ApiError("UnknownParameter", f"The parameter {path}{key} is not recognized")
        name, member = members[key]
        out[name] = _value(child, member, f"{path}{key}")
    return out


def _value(node: Any, shape: Shape, path: str) -> Any:
    kind = shape.type_name
    if kind == "structure":
        return _structure(node, shape, path + ".")
    if kind == "list":
        if node == "":  # the Query protocol's empty list
            return []
        if not isinstance(node, dict):
            raise ApiError("InvalidParameterValue", f"{path} is a list: give {path}.1, {path}.2, ...")
        items: List[Tuple[int, Any]] = []
        for k, v in node.items():
            if not k.isdigit() or not k.isascii() or not 1 <= int(k) <= MAX_INDEX:
                raise ApiError("InvalidParameter", f"{path}.{k}: a list element's number must "
                               f"be 1-{MAX_INDEX}")
            items.append((int(k), v))
        return [_value(v, shape.member, f"{path}.{i}") for i, v in sorted(items)]
    if kind == "map":
        raise ApiError("InvalidParameter", f"{path}: map parameters are not supported")
    if isinstance(node, dict):
        raise ApiError("InvalidParameterValue", f"{path} is a value, not a structure")
    text: str = node
    if kind == "string":
        return text
    if kind in ("integer", "long"):
        if not _INT.match(text):
            raise ApiError("InvalidParameterValue", f"{path}: {text!r} is not an integer")
        return int(text)
    if kind == "boolean":
        if text.lower() not in ("true", "false"):
            raise ApiError("InvalidParameterValue", f"{path}: {text!r} is not true or false")
        return text.lower() == "true"
    if kind in ("float", "double"):
        try:
            return float(text)
        except ValueError:
            raise ApiError("InvalidParameterValue", f"{path}: {text!r} is not a number") from None
    if kind == "timestamp":
        try:
            return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ApiError("InvalidParameterValue",
                           f"{path}: {text!r} is not an ISO 8601 time") from None
    if kind == "blob":
        try:
            return base64.b64decode(text, validate=True)
        except (ValueError, binascii.Error):
            raise ApiError("InvalidParameterValue", f"{path}: not base64") from None
    raise ApiError("InvalidParameter", f"{path}: type {kind} is not supported")


# --------------------------------------------------------------------------- answers


def answer(op: OperationModel, result: Dict[str, Any], request_id: str) -> bytes:
    """A result of the JSON API -> EC2's XML for the operation. Keys the
    output shape does not have (sgctl's extras) are left out."""
    root = ET.Element(f"{op.name}Response", xmlns=XMLNS)
    ET.SubElement(root, "requestId").text = request_id
    if op.output_shape is not None:
        _fill(root, result, op.output_shape)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8")


def _fill(parent: ET.Element, value: Dict[str, Any], shape: Shape) -> None:
    for name, member in shape.members.items():
        v = value.get(name)
        if v is None:
            continue
        tag = member.serialization.get("name", name)
        if member.type_name == "list" and member.serialization.get("flattened"):
            for item in v:
                _put(ET.SubElement(parent, tag), item, member.member)
        else:
            _put(ET.SubElement(parent, tag), v, member)


def _put(el: ET.Element, v: Any, shape: Shape) -> None:
    kind = shape.type_name
    if kind == "structure":
        if isinstance(v, dict):
            _fill(el, v, shape)
    elif kind == "list":
        tag = shape.member.serialization.get("name", "member")
        for item in v:
            _put(ET.SubElement(el, tag), item, shape.member)
    elif kind == "boolean":
        el.text = "true" if v else "false"
    elif kind == "timestamp":
        el.text = v.strftime("%Y-%m-%dT%H:%M:%S.000Z") if isinstance(v, datetime.datetime) \
            else str(v)
    elif kind == "blob":
        el.text = base64.b64encode(v).decode()
    else:
        el.text = str(v)


def error(code: str, message: str, request_id: str) -> bytes:
    root = ET.Element("Response")
    err = ET.SubElement(ET.SubElement(root, "Errors"), "Error")
    ET.SubElement(err, "Code").text = code
    ET.SubElement(err, "Message").text = message
    ET.SubElement(root, "RequestID").text = request_id
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8")


def action_of(pairs: Sequence[Tuple[str, str]]) -> Tuple[str, Optional[str],
                                                          List[Tuple[str, str]]]:
    """(Action, Version, the other pairs)."""
    action: Optional[str] = None
    version: Optional[str] = None
    rest = []
    for k, v in pairs:
        if k == "Action":
            action = v
        elif k == "Version":
            version = v
        else:
            rest.append((k, v))
    if not action:
        raise ApiError("MissingAction", "The request must contain the parameter Action")
    return action, version, rest
