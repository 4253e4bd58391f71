"""The run configuration file ("ts-bench-run-config" version 1, common.inference.run_config.RunConfig) as typed pydantic models.

Every key is optional (a missing one keeps RunConfig's default); an unknown key is a typo and refused, and so is
an invalid value, in one line: "'segment.tile_step' must be a number in (0, 1], not 0".
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from common.core.json_errors import EXPECTED, problem, where
from common.inference.pipeline import SegmentOptions
from common.inference.predictors import OrtSettings
from common.inference.torch_channels_last import BACKEND as CHANNELS_LAST

CONFIG_SCHEMA = "ts-bench-run-config"
BACKENDS = ("onnxruntime", "pytorch", CHANNELS_LAST)  # common.inference.run_config.build_predictor


def _one_of(*values: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        if value not in values:
            raise problem("value", f"must be one of {', '.join(values)}")
        return value
    return BeforeValidator(check)


def _integer(low: int, high: int | None = None) -> BeforeValidator:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise problem("value", f"must be an integer {low}..{high}" if high is not None else
                          f"must be an integer >= {low}")
        return value
    return BeforeValidator(check)


def _fraction(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise problem("value", "must be a number in (0, 1]")
    return value


_ORT, _SEG = OrtSettings(), SegmentOptions()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class OrtDoc(_Section):
    """common.inference.predictors.OrtSettings: thread counts (0 = ONNX Runtime's default), graph level, memory options."""

    intra_op_threads: Annotated[int, _integer(0)] = _ORT.intra_op_threads
    inter_op_threads: Annotated[int, _integer(0)] = _ORT.inter_op_threads
    graph_optimization: Annotated[str, _one_of("disable", "basic", "extended", "all")] = _ORT.graph_optimization
    execution_mode: Annotated[str, _one_of("sequential", "parallel")] = _ORT.execution_mode
    mem_pattern: bool = _ORT.mem_pattern
    cpu_mem_arena: bool = _ORT.cpu_mem_arena
    providers: list[str] = Field(default_factory=lambda: list(_ORT.providers))


class SegmentDoc(_Section):
    """common.inference.pipeline.SegmentOptions: resampling order, tile step (fraction of a tile), logit sums, threads."""

    resample_order: Annotated[int, _integer(0, 5)] = _SEG.resample_order
    tile_step: Annotated[float, BeforeValidator(_fraction)] = _SEG.tile_step
    batch_size: Annotated[int, _integer(1)] = _SEG.batch_size
    accumulate: Annotated[str, _one_of("float16", "float32")] = _SEG.accumulate
    resample_threads: Annotated[int, _integer(1)] = _SEG.resample_threads


class RunConfigDoc(_Section):
    """A run configuration file: which backend and its settings, plus what 05 notes about how it chose it."""

    schema_name: str = Field(CONFIG_SCHEMA, alias="schema")
    schema_version: int = 1
    name: str = "loaded"
    backend: Annotated[str, _one_of(*BACKENDS)] = "onnxruntime"
    ort: OrtDoc = Field(default_factory=OrtDoc)
    onnx_norm: Annotated[str, _one_of("precise", "native")] = "precise"
    torch_threads: Annotated[int, _integer(0)] = 0
    keep_freed_memory: bool = False
    segment: SegmentDoc = Field(default_factory=SegmentDoc)
    chosen_by: Any = None
    threshold: Any = None
    reference: Any = None
    sweep_seconds: Any = None
    sweep_agreement: Any = None


KNOWN_KEYS = sorted(field.alias or name for name, field in RunConfigDoc.model_fields.items())


def _message(errors: list[ErrorDetails]) -> str:
    """The problem to report: unknown keys first (all of them), then the first invalid value."""
    top = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1)
    if top:
        return f"unknown key(s) {', '.join(top)} (known: {', '.join(KNOWN_KEYS)})"
    for section in ("ort", "segment"):
        for e in errors:
            if e["loc"] == (section,) and e["type"] == "model_type":
                return f"'{section}' must be an object, not a JSON {type(e['input']).__name__}"
        bad = sorted(where(e) for e in errors if e["type"] == "extra_forbidden" and e["loc"][0] == section)
        if bad:
            return f"unknown key(s) {', '.join(bad)}"
    err = errors[0]
    text = err["msg"] if err["type"] == "value" else f"must be {EXPECTED.get(err['type'], err['type'])}"
    return f"'{where(err)}' {text}, not {err['input']!r}"


def read_config_document(d: Any) -> RunConfigDoc:
    """``d`` (a parsed run-configuration file) as a checked RunConfigDoc; ValueError (one line: why not) when it
    is not a valid configuration."""
    if not isinstance(d, dict):
        raise ValueError(f"a run configuration is a JSON object, not a JSON {type(d).__name__}")
    if d.get("schema") != CONFIG_SCHEMA or d.get("schema_version") != 1:
        raise ValueError(f"not a {CONFIG_SCHEMA} version 1 file")
    try:
        return RunConfigDoc.model_validate(d)
    except ValidationError as exc:
        raise ValueError(_message(exc.errors(include_url=False))) from None
