"""Typed JSON documents at the file boundary: pydantic's first error as the one-line problem an InputError says.

Each schema module (common.records.result_schema, common.inference.run_config, common.records.passport_model) declares pydantic v2
models and words its errors itself; this module holds what they share: where an error is ("scans[0].median"),
custom errors raised by validators (``problem``) and the first error of a ValidationError.
"""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

# what a pydantic type error expected, as the messages name it (Python type names, as json.loads makes them)
EXPECTED = {"string_type": "str", "int_type": "int", "dict_type": "dict", "list_type": "list", "bool_type": "bool",
            "float_type": "int or float", "model_type": "dict", "model_attributes_type": "dict"}


def problem(kind: str, text: str, at: str = "", **context: Any) -> PydanticCustomError:
    """A custom validation error of ``kind`` whose words are ``text``; ``at`` extends its location (".load",
    "[0]"). Raise it from a validator."""
    return PydanticCustomError(kind, text, {"at": at, **context})


def where(err: ErrorDetails) -> str:
    """The error's location as a path: ('scans', 0, 'median') -> "scans[0].median" (plus a custom error's "at")."""
    text = ""
    for part in err["loc"]:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part != "[key]":
            text += f".{part}" if text else str(part)
    return text + str((err.get("ctx") or {}).get("at", ""))


def first_error(exc: ValidationError) -> ErrorDetails:
    """The first error pydantic found (fields are checked in declaration order)."""
    return exc.errors(include_url=False)[0]


def got(err: ErrorDetails) -> str:
    """Type name of the offending value, as Python names it."""
    return type(err["input"]).__name__
