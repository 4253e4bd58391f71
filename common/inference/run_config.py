"""The run configuration: which backend segments a scan, its settings and the pipeline options, spelled once.

``RunConfig`` (with ``OrtSettings`` and ``SegmentOptions``) is a typed pydantic model: Python code builds and
changes it as a plain object, and a run-configuration file ("ts-bench-run-config" version 1, 05's
optimized_config.json) is checked against the same fields when it is read. Every key of a file is optional (a
missing one keeps the default); an unknown key is a typo and refused, and so is an invalid value, in one line:
"'segment.tile_step' must be a number in (0, 1], not 0".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from common.core.atomic import atomic_write_json
from common.core.errors import InputError
from common.core.json_errors import EXPECTED, problem, where
from common.inference.precision import PRECISIONS, Precision, is_approximate

CONFIG_SCHEMA = "ts-bench-run-config"
Backend = Literal["onnxruntime", "pytorch", "pytorch_channels_last"]  # common.inference.predictor_factory
BACKENDS: tuple[str, ...] = get_args(Backend)
CHANNELS_LAST: Backend = "pytorch_channels_last"  # common.inference.torch_channels_last, 06's default


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


class _Settings(BaseModel):
    """Typed, strict, no unknown keys; changed in place by code that tunes it (05's sweep, a cluster worker)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class OrtSettings(_Settings):
    """ONNX Runtime session settings; 0 threads = ONNX Runtime's default (one per physical core)."""

    intra_op_threads: Annotated[int, _integer(0)] = 0
    inter_op_threads: Annotated[int, _integer(0)] = 0
    graph_optimization: Annotated[Literal["disable", "basic", "extended", "all"],
                                  _one_of("disable", "basic", "extended", "all")] = "all"
    execution_mode: Annotated[Literal["sequential", "parallel"], _one_of("sequential", "parallel")] = "sequential"
    # ONNX Runtime's memory-pattern planner pre-allocates one block for every activation of the whole
    # network: 2.8 GB of peak for one 112x112x128 tile vs 1.6 GB without it, at the same speed (measured on
    # 2 cores, graph optimisation disabled). The arena is what makes repeated tiles fast (without it: +25 %
    # time). Both default to ONNX Runtime's own defaults; RunConfig.fastest_exact_onnx() turns the pattern off.
    mem_pattern: bool = True
    cpu_mem_arena: bool = True
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])


class SegmentOptions(_Settings):
    """Pipeline options. Defaults reproduce the official fast pipeline (TotalSegmentator 2.18)."""

    resample_order: Annotated[int, _integer(0, 5)] = 1      # official since 2.16 (resampling_order=1)
    tile_step: Annotated[float, BeforeValidator(_fraction)] = 0.8  # official for 'total' since 2.16 (nnU-Net: 0.5)
    batch_size: Annotated[int, _integer(1)] = 1              # tiles per predictor call
    accumulate: Annotated[Literal["float16", "float32"], _one_of("float16", "float32")] = "float16"  # nnU-Net 2.x
    resample_threads: Annotated[int, _integer(1)] = 1        # threads for the two zoom steps (1 = scipy's single call)


class RunConfig(_Settings):
    """Everything that decides how a scan is segmented: backend, its settings, pipeline options."""

    name: str = "default"
    backend: Annotated[Backend, _one_of(*BACKENDS)] = "onnxruntime"
    ort: OrtSettings = Field(default_factory=OrtSettings)
    onnx_norm: Annotated[Literal["precise", "native"], _one_of("precise", "native")] = "precise"  # ONNX InstanceNorm
    torch_threads: Annotated[int, _integer(0)] = 0     # 0 = torch's default (one per physical core)
    keep_freed_memory: bool = False                    # glibc keeps freed memory for reuse (common.core.heap)
    # the network's arithmetic (common.inference.precision): "float32" is exact mode; "bf16" (channels-last
    # backend only) is opt-in and approximate, and every output of such a run says so
    precision: Annotated[Precision, _one_of(*PRECISIONS)] = "float32"
    segment: SegmentOptions = Field(default_factory=SegmentOptions)

    def with_precision(self, precision: str | None) -> RunConfig:
        """This configuration with the network's ``precision`` (None: unchanged); an approximate one is named so."""
        if precision is None or precision == self.precision:
            return self
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
        name = self.name + (f" [approximate: {precision} network]" if is_approximate(precision) else " [exact]")
        return self.model_copy(update={"precision": precision, "name": name})

    @property
    def approximate(self) -> bool:
        """True when the network does not run the exact float32 arithmetic (``precision`` other than float32)."""
        return is_approximate(self.precision)

    @classmethod
    def fastest_exact(cls) -> RunConfig:
        """The fastest configuration with the official arithmetic known on a 2-core x86 CPU (06's and the
        console's default when no 05 result exists): nnU-Net's PyTorch network run channels-last on oneDNN
        (common.inference.torch_channels_last) with glibc keeping freed memory (common.core.heap), faithful
        pipeline options. Per 112x112x128 tile on 2 threads it took 3.45-3.98 s against 5.50-6.59 s for ONNX
        Runtime and 5.81 s for the plain PyTorch network (python -m common.cli.profile_tile, two runs;
        PERFORMANCE.md). 05 re-measures it on each machine."""
        return cls(backend=CHANNELS_LAST, keep_freed_memory=True,
                   name="built-in fastest exact (PyTorch channels-last on oneDNN, freed memory kept)")

    @classmethod
    def fastest_exact_onnx(cls) -> RunConfig:
        """The fastest exact ONNX Runtime configuration (for ONNX Runtime's other providers, e.g. CUDA):
        graph optimisation disabled (the precise-InstanceNorm export runs faster without the optimizer's
        layout rewrites), memory pattern off (same speed, 1.2 GB less peak), faithful pipeline options."""
        return cls(ort=OrtSettings(graph_optimization="disable", mem_pattern=False),
                   name="built-in fastest exact ONNX Runtime (graph optimisation disabled, memory pattern off)")

    @property
    def threads(self) -> int:
        """The backend's configured thread count (0: the library's default)."""
        return self.ort.intra_op_threads if self.backend == "onnxruntime" else self.torch_threads

    def to_dict(self) -> dict[str, Any]:
        """The configuration as its file holds it (schema first)."""
        return {"schema": CONFIG_SCHEMA, "schema_version": 1, **self.model_dump(mode="json")}


class RunConfigFile(RunConfig):
    """A run configuration file: the configuration plus its schema and what 05 notes about how it chose it."""

    schema_name: str = Field(CONFIG_SCHEMA, alias="schema")
    schema_version: int = 1
    name: str = "loaded"
    chosen_by: Any = None
    threshold: Any = None
    reference: Any = None
    sweep_seconds: Any = None
    sweep_agreement: Any = None

    def config(self) -> RunConfig:
        """The run configuration alone (05's notes and the schema left out)."""
        return RunConfig(**{name: getattr(self, name) for name in RunConfig.model_fields})


KNOWN_KEYS = sorted(field.alias or name for name, field in RunConfigFile.model_fields.items())


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


def read_config_document(d: Any) -> RunConfigFile:
    """``d`` (a parsed run-configuration file) checked; ValueError (one line: why not) when it is not a valid
    configuration."""
    if not isinstance(d, dict):
        raise ValueError(f"a run configuration is a JSON object, not a JSON {type(d).__name__}")
    if d.get("schema") != CONFIG_SCHEMA or d.get("schema_version") != 1:
        raise ValueError(f"not a {CONFIG_SCHEMA} version 1 file")
    try:
        return RunConfigFile.model_validate(d)
    except ValidationError as exc:
        raise ValueError(_message(exc.errors(include_url=False))) from None


def save_config(cfg: RunConfig, path: Path, extra: dict[str, Any] | None = None) -> Path:
    return atomic_write_json(path, {**cfg.to_dict(), **(extra or {})})


def load_config(path: Path) -> RunConfig:
    """Read a run configuration (05's optimized_config.json or save_config's output); InputError (one line)
    when it is unreadable, another schema, or holds an unknown key or an invalid value."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"unreadable run configuration ({exc})") from exc
    try:
        doc = read_config_document(d)
    except ValueError as exc:
        raise InputError(path, f"invalid run configuration: {exc}") from None
    return doc.config()
