"""The errors of bad input: a document's (``ValidationError``: which object,
which field) and an API request's (``ApiError``: EC2's error code). Both
carry the EC2 code the API answers with."""

from __future__ import annotations


class ValidationError(ValueError):
    """Bad input. ``obj`` names the object, ``fieldname`` the field."""

    def __init__(self, obj: str, fieldname: str, message: str,
                 code: str = "InvalidParameterValue") -> None:
        obj = obj or repr(obj)  # an empty name is shown as ''
        self.obj = obj
        self.fieldname = fieldname
        self.message = message
        self.code = code  # the EC2 error code the API answers with
        super().__init__(f"{obj}: {fieldname}: {message}")


class ApiError(Exception):
    """An EC2-style error: ``code`` is the EC2 error code."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class EnforcementError(RuntimeError):
    """A valid state this host cannot enforce as it is: a device missing or
    not Ethernet, the programs refused, an attach failed."""
