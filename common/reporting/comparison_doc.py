"""The comparison document (schema "ts-bench-comparison"): frozen dataclasses, written once to comparison.json.

Times are seconds, memory bytes, Dice and voxel agreement fractions 0..1, throughput Mvoxel/s. Label ids are
ints in memory; JSON turns them into string keys when the document is saved (``ComparisonDoc.to_json``).
Field order is the JSON key order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

COMPARISON_SCHEMA = "ts-bench-comparison"
COMPARISON_VERSION = 1
STANDIN_WARNING = ("> **Stand-in weights (seeded random, exact Task 297 architecture): timings and pipeline "
                   "agreement are real; anatomical accuracy is NOT.**")

Number = int | float  # values copied from result files keep their JSON type


@dataclass(frozen=True)
class Reference:
    label: str
    method: str
    file: str


@dataclass(frozen=True)
class InputInfo:
    """Provenance of one result file."""

    label: str
    method: str
    script: str
    file: str
    created: str
    model: dict[str, Any]  # name, weights, sha256
    machine: dict[str, Any]
    versions: dict[str, Any]
    settings: dict[str, Any]


@dataclass(frozen=True)
class Models:
    standin: bool
    same_weights: bool
    weights: list[str]
    sha256: list[str]


@dataclass(frozen=True)
class GroundTruth:
    dir: str
    found: list[str]
    missing: list[str]


@dataclass(frozen=True)
class Row:
    """One (scan, method): latency vs the reference, agreement with the reference's mask (and ground truth), size
    and memory. Dice maps are label id -> Dice; ``missing``/``extra`` are structure names."""

    scan_id: str
    method: str  # the result's label
    is_reference: bool
    status: str
    error: str | None
    voxels: int
    median_total_s: Number | None
    min_total_s: Number | None
    max_total_s: Number | None
    repeats: int
    stages: dict[str, Number]
    ref_median_total_s: Number | None
    speedup: float | None
    voxel_agreement: float | None
    dice: dict[int, float] | None
    mean_dice: float | None
    n_classes_ref: int | None
    n_classes: int | None
    missing: list[str] | None
    extra: list[str] | None
    gt_dice: dict[int, float] | None
    gt_mean_dice: float | None
    pair_error: str | None
    gt_error: str | None
    reoriented: str | None
    gt_reoriented: str | None
    inference_s_per_tile: Number | None
    efficiency: Number | None
    n_tiles: int | None
    n_tiles_source: str | None  # "result", "reference" or "estimated"
    size_class: str
    peak_rss_bytes: int | None
    peak_rss_method: str | None
    ref_peak_rss_bytes: int | None
    rss_ratio: float | None


@dataclass(frozen=True)
class GroundTruthDice:
    """A method's Dice vs ground truth, pooled over (scan, class) pairs."""

    gt_dice_quantiles: dict[str, float | None]
    gt_mean_dice: float | None
    gt_dice_buckets: dict[str, int]
    n_gt_dice: int


@dataclass(frozen=True)
class MethodSummary:
    """One result over its scans; speedups, agreement and memory ratios over the scans compared with the reference."""

    method: str
    script: str
    is_reference: bool
    weights: str | None
    sha256: str | None
    n_scans: int
    n_ok: int
    n_failed: int
    success_rate: float | None
    latency: dict[str, Number | None]  # common.records.metrics.latency_stats
    throughput_mvox_s: float | None
    stages_mean_s: dict[str, float]
    total_mean_s: float | None
    n_compared: int
    speedup_total: float | None
    speedup_median: float | None
    mean_voxel_agreement: float | None
    mean_dice: float | None
    dice_buckets: dict[str, int] | None
    n_dice: int
    median_peak_rss_bytes: float | None
    max_peak_rss_bytes: int | None
    median_rss_ratio: float | None
    ground_truth: GroundTruthDice | None = None  # only with a ground-truth folder; its keys join this object's
    arithmetic: str = "exact"  # common.inference.precision.label: "exact" or "approximate (bf16 network)"
    limit: dict[str, Any] | None = None  # the compute limit: {"precision", "peak_gflops", "limit_s_per_tile", "source"}
    approximation: dict[str, Any] | None = None  # an approximate run's margin analysis (common.inference.margins)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "ground_truth"}
        if self.ground_truth is not None:
            out.update(dataclasses.asdict(self.ground_truth))
        return out


@dataclass(frozen=True)
class SizeClass:
    """One size class (tile band) x method: medians over that class's scans where the figure exists."""

    size_class: str
    method: str
    is_reference: bool
    n_scans: int
    n_ok: int
    tiles_min: int | None
    tiles_max: int | None
    median_speedup: float | None
    median_total_s: float | None
    median_peak_rss_bytes: float | None
    median_rss_ratio: float | None


@dataclass(frozen=True)
class ComparisonDoc:
    """Everything comparison.json holds; ``rows`` are in scan order, then result order."""

    created: str
    machine: dict[str, Any]  # the reference run's
    versions: dict[str, Any]  # the reference run's
    report_versions: dict[str, Any]
    reference: Reference
    inputs: list[InputInfo]
    models: Models
    warnings: list[str]
    notes: list[str]
    structure_names: dict[int, str]  # label id -> name, ids ascending
    ground_truth: GroundTruth | None
    scans: list[str]
    rows: list[Row]
    methods: dict[str, MethodSummary]  # by label, reference first
    size_classes: list[SizeClass]
    plots: dict[str, str]  # plot key -> PNG file name (next to comparison.json)
    schema: str = COMPARISON_SCHEMA
    schema_version: int = COMPARISON_VERSION

    def __post_init__(self) -> None:
        """The one consistency check: every row and size class names a scan and a method of this document."""
        if self.reference.label not in self.methods:
            raise ValueError(f"reference {self.reference.label!r} has no method summary")
        scans = set(self.scans)
        for r in self.rows:
            if r.method not in self.methods or r.scan_id not in scans:
                raise ValueError(f"row ({r.scan_id!r}, {r.method!r}) names an unknown scan or method")
        for c in self.size_classes:
            if c.method not in self.methods:
                raise ValueError(f"size class row names an unknown method {c.method!r}")

    def to_json(self) -> dict[str, Any]:
        """The JSON object (key order as in schema version 1; int label keys become strings when dumped)."""
        def plain(obj: Any) -> Any:
            return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj

        return {
            "schema": self.schema, "schema_version": self.schema_version, "created": self.created,
            "machine": self.machine, "versions": self.versions, "report_versions": self.report_versions,
            "reference": plain(self.reference), "inputs": [plain(i) for i in self.inputs],
            "models": plain(self.models), "warnings": self.warnings, "notes": self.notes,
            "structure_names": self.structure_names, "ground_truth": plain(self.ground_truth),
            "scans": self.scans, "rows": [plain(r) for r in self.rows],
            "methods": {k: m.to_json() for k, m in self.methods.items()},
            "size_classes": [plain(c) for c in self.size_classes], "plots": self.plots,
        }
