"""Input formats: AWS JSON, CloudFormation, native YAML. ``load_file`` detects which."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from ..model import State, ValidationError, validate
from . import aws, cfn, native


def load_document(doc: Any, stack_name: str = "stack") -> State:
    """Parsed document -> validated State. Raises ValidationError."""
    if cfn.is_template(doc):
        state = cfn.load(doc, stack_name)
    elif isinstance(doc, dict) and any(k in doc for k in aws.AWS_KEYS):
        state = aws.load(doc)
    elif native.is_native(doc):
        state = native.load(doc)
    else:
        raise ValidationError("document", "(top level)",
                              "not a CloudFormation template (Resources), AWS JSON "
                              f"({', '.join(aws.AWS_KEYS)}) or native YAML "
                              f"({', '.join(native.NATIVE_KEYS)})")
    return validate(state)


def load_text(text: str, stack_name: str = "stack") -> State:
    try:
        doc = json.loads(text)
    except ValueError:
        try:
            doc = cfn.parse_text(text)
        except yaml.YAMLError as exc:
            raise ValidationError("document", "(syntax)", f"neither JSON nor YAML: {exc}") from None
    return load_document(doc, stack_name)


def load_file(path: str, stack_name: Optional[str] = None) -> State:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValidationError(path, "(file)", exc.strerror or str(exc)) from None
    try:
        return load_text(text, stack_name or cfn.stack_name_for(path))
    except ValidationError as exc:
        raise ValidationError(f"{path}: {exc.obj}", exc.fieldname, exc.message) from None
