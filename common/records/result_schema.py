"""The result document ("ts-bench-result" version 1, see common.records.results) as typed pydantic models, and its check.

Strict on required keys and their types (no coercion: 1.0 is no integer, "1" no number, true neither),
tolerant of extra keys. Times are seconds, shapes (x, y, z) voxel counts, spacing mm.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from common.core.errors import InputError
from common.core.json_errors import EXPECTED, first_error, got, problem, where

SCHEMA_NAME = "ts-bench-result"
SCHEMA_VERSION = 1
STAGES = ("load", "preprocess", "inference", "postprocess", "passport", "save")
WEIGHTS = ("official", "standin")
STATUSES = ("ok", "failed")


def is_number(x: Any) -> bool:
    """A finite int or float (bool is no number)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x: Any) -> bool:
    """An int that is no bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def _one_of(values: tuple[str, ...]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in values:
            raise problem("field", f"must be one of {', '.join(values)}, got {value!r}")
        return value
    return AfterValidator(check)


def _list_of(check: Any, text: str, non_empty: bool = False) -> BeforeValidator:
    def validate(value: Any) -> Any:
        if isinstance(value, list) and ((non_empty and not value) or not all(check(v) for v in value)):
            raise problem("field", f"must be {text}")
        return value
    return BeforeValidator(validate)


def _count_or_null(value: Any) -> Any:
    if value is not None and (not is_int(value) or value < 0):
        raise problem("field", "must be an integer >= 0 or null")
    return value


def _stages(value: Any) -> Any:
    for name, seconds in (value.items() if isinstance(value, dict) else ()):
        if name not in STAGES:
            raise problem("place", f"has unknown stage {name!r} (allowed: {', '.join(STAGES)})")
        if not is_number(seconds):
            raise problem("place", "must be a finite number of seconds", at=f".{name}")
    return value


def _labels_map(value: Any) -> Any:
    if not isinstance(value, dict):
        raise problem("field", "must be an object {label id: name}")
    return value


def _ignored(value: Any) -> Any:
    for i, item in enumerate(value or []):
        if not isinstance(item, dict) or not isinstance(item.get("file"), str) or not isinstance(item.get("reason"), str):
            raise problem("place", "must be an object with 'file' and 'reason' strings", at=f"[{i}]")
    return value or None


Seconds = Annotated[float, Field(allow_inf_nan=False)]
Count = Annotated[int | None, BeforeValidator(_count_or_null)]
Stages = Annotated[dict[str, float], BeforeValidator(_stages)]


class _Doc(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class ModelDoc(_Doc):
    """Which network: name, "official" or "standin" weights, sha256 of the weights (or null), label names."""

    name: str
    weights: Annotated[str, _one_of(WEIGHTS)]
    sha256: str | None
    labels: Annotated[dict[Any, Any], BeforeValidator(_labels_map)] = {}


class RepeatDoc(_Doc):
    """One timed run: wall seconds, seconds per stage, peak RSS bytes."""

    peak_rss_bytes: Count = None
    total_s: Seconds
    stages: Stages


class MedianDoc(_Doc):
    """Medians over the repeats (seconds) and their spread; n = number of repeats."""

    total_s: Seconds
    min_total_s: Seconds
    max_total_s: Seconds
    iqr_total_s: Seconds
    n: int
    stages: Stages

    @model_validator(mode="after")
    def _consistent(self) -> MedianDoc:
        if not (0 <= self.min_total_s <= self.total_s <= self.max_total_s) or self.iqr_total_s < 0:
            raise problem("place", f"is inconsistent: total_s {self.total_s:g} must lie within min_total_s "
                                   f"{self.min_total_s:g} .. max_total_s {self.max_total_s:g} (and iqr_total_s >= 0)")
        return self


class ScanDoc(_Doc):
    """One scan: input, grid (x, y, z voxels, mm), outcome, timed runs and their medians."""

    file: str
    scan_id: str
    orientation: str
    shape: Annotated[list[int], _list_of(is_int, "a non-empty list of integers", non_empty=True)]
    spacing_mm: Annotated[list[float], _list_of(is_number, "a non-empty list of numbers", non_empty=True)]
    status: Annotated[str, _one_of(STATUSES)]
    error: str | None
    mask: str | None
    labels_present: Annotated[list[int], _list_of(is_int, "a list of integers")]
    n_tiles: Count = None
    peak_rss_bytes: Count = None
    peak_rss_method: str | None = None
    repeats: list[RepeatDoc]
    median: MedianDoc | None


class ResultDoc(_Doc):
    """A whole result file (the schema and version are checked before, to say "not a result" plainly)."""

    script: str
    method: str
    created: str
    machine: dict[str, Any]
    versions: dict[str, Any]
    settings: dict[str, Any]
    summary: dict[str, Any]
    model: ModelDoc
    complete: bool | None = None
    ignored: Annotated[list[dict[str, Any]] | None, BeforeValidator(_ignored)] = None
    scans: list[ScanDoc]


def _message(err: ErrorDetails) -> str:
    at, kind = where(err), err["type"]
    if kind == "missing":
        return f"missing required field '{at}'"
    if kind == "field":
        return f"field '{at}' {err['msg']}"
    if kind == "place":
        return f"'{at}' {err['msg']}"
    if kind == "finite_number":
        return f"field '{at}' is not a finite number"
    if kind in ("model_type", "model_attributes_type") and isinstance(err["loc"][-1], int):
        return f"'{at}' must be an object"
    if kind == "bool_type":
        return f"field '{at}' must be true or false"
    nullable = " or null" if at.rsplit(".", 1)[-1] in ("error", "mask", "sha256", "median") else ""
    return f"field '{at}' must be {EXPECTED.get(kind, kind)}{nullable}, got {got(err)}"


def validate_result(obj: Any, path: str | Path | None = None) -> dict:
    """Check ``obj`` against the result schema; return it. Raises InputError ('<path>: <problem>', one line)."""
    if not isinstance(obj, dict):
        raise InputError(path, f"not a ts-bench result (top level is a JSON {type(obj).__name__}, expected an object)")
    if obj.get("schema") != SCHEMA_NAME:
        raise InputError(path, f"not a ts-bench result (schema {obj.get('schema')!r}, expected {SCHEMA_NAME!r})")
    if "schema_version" not in obj:
        raise InputError(path, "missing required field 'schema_version'")
    version = obj["schema_version"]
    if version != SCHEMA_VERSION or not is_int(version):
        raise InputError(path, f"result schema version {version}, this program reads version {SCHEMA_VERSION}")
    try:
        ResultDoc.model_validate(obj)
    except ValidationError as exc:
        raise InputError(path, _message(first_error(exc))) from None
    return obj
