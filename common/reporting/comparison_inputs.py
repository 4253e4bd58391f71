"""The inputs of a comparison: result files (ts-bench-result), the reference among them, structure names and
the warnings that the files' models and machines call for."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.core.errors import InputError
from common.imaging.labels import total_class_names_if_installed
from common.records.results import read_result
from common.reporting.comparison_doc import InputInfo

REFERENCE_METHOD = "official_pytorch"
DEFAULT_RESULT_FILES = ("03_vanilla.json", "04_onnx.json", "05_optimized.json", "06_inference.json")


@dataclass
class Entry:
    """One loaded result file; ``label`` is its unique display name (the method, de-duplicated)."""

    label: str
    path: Path
    result: dict
    scans: dict[str, dict] = field(default_factory=dict)  # scan_id -> scan record

    @property
    def method(self) -> str:
        return self.result["method"]

    @property
    def model(self) -> dict:
        return self.result["model"]


def default_result_paths(folder: str | Path) -> tuple[list[Path], list[str]]:
    """The default result files present in ``folder`` and notes about the absent ones."""
    folder = Path(folder)
    found, notes = [], []
    for name in DEFAULT_RESULT_FILES:
        p = folder / name
        if p.is_file():
            found.append(p)
        else:
            notes.append(f"{p} not found: skipped (run its script to include it)")
    return found, notes


def load_entries(paths: Sequence[str | Path]) -> list[Entry]:
    """Read result files (InputError on a bad one); give each a unique label (method, or method#2 ...)."""
    entries: list[Entry] = []
    seen_paths: set[Path] = set()
    for p in paths:
        path = Path(p)
        if path.resolve() in seen_paths:
            continue
        seen_paths.add(path.resolve())
        res = read_result(path)
        label = res["method"]
        taken = {e.label for e in entries}
        n = 2
        while label in taken:
            label = f"{res['method']}#{n}"
            n += 1
        scans: dict[str, dict] = {}
        for rec in res["scans"]:
            scans.setdefault(rec["scan_id"], rec)
        entries.append(Entry(label, path, res, scans))
    return entries


def choose_reference(entries: Sequence[Entry], spec: str | None = None) -> Entry:
    """The reference entry: ``spec`` names a result file, a method or a label; by default the first result whose
    method is "official_pytorch", else the first result. Raises InputError when ``spec`` matches nothing."""
    if spec:
        for e in entries:
            if spec in (e.label, e.method) or _same_file(e.path, spec):
                return e
        raise InputError(spec, "reference is neither one of the result files nor a method among them "
                               f"({', '.join(e.label for e in entries)})")
    for e in entries:
        if e.method == REFERENCE_METHOD:
            return e
    return entries[0]


def _same_file(a: Path, b: str | Path) -> bool:
    try:
        return Path(b).exists() and a.resolve() == Path(b).resolve()
    except OSError:
        return False


def structure_names(entries: Sequence[Entry], reference: Entry) -> dict[int, str]:
    """Label id -> structure name: the reference model's "labels", another result's, else TotalSegmentator's
    "total" class names when the model is a TotalSegmentator total model; unknown ids become "label_<n>"."""
    for e in [reference, *entries]:
        labels = e.model.get("labels")
        if isinstance(labels, dict) and labels:
            out = {}
            for k, v in labels.items():
                try:
                    out[int(k)] = str(v)
                except (TypeError, ValueError):
                    continue
            if out:
                return out
    name = str(reference.model.get("name", "")).lower()
    if "297" in name or "total" in name:
        return total_class_names_if_installed()
    return {}


def provenance(e: Entry) -> InputInfo:
    """Where one result came from: file, script, model, machine, versions, settings."""
    r = e.result
    return InputInfo(
        label=e.label, method=e.method, script=r["script"], file=str(e.path), created=r["created"],
        model={k: r["model"].get(k) for k in ("name", "weights", "sha256")},
        machine=r["machine"], versions=r["versions"], settings=r["settings"])


def input_warnings(entries: Sequence[Entry]) -> tuple[list[str], bool, bool]:
    """(warnings, any stand-in weights, all the same weights) over the results' models and machines."""
    warns: list[str] = []
    standin = any(e.model.get("weights") == "standin" for e in entries)
    ids = {(e.model.get("name"), e.model.get("weights"), e.model.get("sha256")) for e in entries}
    same = len(ids) == 1
    if not same:
        desc = "; ".join(f"{e.label}: {e.model.get('weights')} {str(e.model.get('sha256'))[:12]}" for e in entries)
        warns.append(f"Results used different model weights ({desc}): Dice and voxel agreement between "
                     "different weights compare different networks, not pipelines, and are meaningless.")
    if any(e.model.get("sha256") is None for e in entries):
        warns.append("Some results do not record the sha256 of their weights; identical weights cannot be confirmed.")
    machines = {(e.result["machine"].get("cpu_model"), e.result["machine"].get("usable_cores")) for e in entries}
    if len(machines) > 1:
        warns.append("Results come from different machines (CPU model or usable cores differ): "
                     "timings and speedups are not comparable.")
    return warns, standin, same
