"""Input formats: AWS JSON, CloudFormation, native YAML. ``load_file`` detects which."""

from __future__ import annotations

import gc
from typing import Any, Optional

from controller.policy.errors import ValidationError
from controller.policy.formats import aws, cfn, native
from controller.policy.formats.text import MAX_DOCUMENT_BYTES
from controller.policy.formats.text import parse as text_parse
from controller.policy.model import State, validate


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
    # a document is millions of small acyclic objects: the cyclic GC would
    # rescan them over and over while they are built (a 100k-rule load took
    # 2.5x as long with it on)
    enabled = gc.isenabled()
    gc.disable()
    try:
        return load_document(text_parse(text), stack_name)
    finally:
        if enabled:
            gc.enable()


def read_document(path: str) -> str:
    """A document file's text, refused before reading when it is too big."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise ValidationError(path, "(file)", exc.strerror or str(exc)) from None
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ValidationError(path, "(size)", f"more than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(path, "(encoding)", f"not UTF-8 text: {exc}") from None


def load_file(path: str, stack_name: Optional[str] = None) -> State:
    text = read_document(path)
    try:
        return load_text(text, stack_name or cfn.stack_name_for(path))
    except ValidationError as exc:
        raise ValidationError(f"{path}: {exc.obj}", exc.fieldname, exc.message) from None
