"""Reading one field of a document, shared by every format: a wrong type is
an error naming the object and the field, a missing optional field its
empty value."""

from __future__ import annotations

from typing import Any, Dict, List

from controller.policy.errors import ValidationError


def seq(val: Any, obj: str, key: str) -> List[Any]:
    """A list (None: empty)."""
    if val is None:
        return []
    if not isinstance(val, list):
        raise ValidationError(obj, key, "must be a list")
    return val


def mapping(val: Any, obj: str, key: str, required: bool = False) -> Dict[str, Any]:
    """An object (None: empty, unless ``required``)."""
    if val is None and not required:
        return {}
    if not isinstance(val, dict):
        raise ValidationError(obj, key, "must be an object")
    return val


def text(val: Any, obj: str, key: str, default: str = "") -> str:
    """A string (None: ``default``)."""
    if val is None:
        return default
    if not isinstance(val, str):
        raise ValidationError(obj, key, f"{val!r} is not a string")
    return val


def string(val: Any, obj: str, key: str) -> str:
    """A string, required."""
    if not isinstance(val, str):
        raise ValidationError(obj, key, f"{val!r} is not a string")
    return val


def tag_map(val: Any, obj: str, key: str = "tags") -> Dict[str, str]:
    """A mapping of strings to strings (None: empty)."""
    tags = mapping(val, obj, key)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise ValidationError(obj, key, "tag keys and values must be strings")
    return dict(tags)
