"""Resume keys for stage 06: a scan is skipped only when its outputs were made from the same input content,
the same weights and the same configuration.

Beside a scan's outputs (``<id>_seg.nii.gz``, ``<id>_passport.json``) 06 writes ``<id>_run.json`` last,
atomically, holding the run key:

    {"schema": "ts-bench-run-key", "schema_version": 1,
     "input_sha256": ..., "weights_sha256": ..., "config": {...}, ...informational fields}

Only the three key fields are compared; a missing, unreadable or other-version record means "recompute".
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from common.core.atomic import atomic_write_json

SCHEMA = "ts-bench-run-key"
SCHEMA_VERSION = 1
CHUNK = 1 << 20  # 1 MiB
KEY_FIELDS = ("input_sha256", "weights_sha256", "config")
NO_RECORD = "no run record (outputs from an older version or an interrupted run)"


def _update_from_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)


def input_digest(path: str | Path) -> str:
    """SHA-256 hex digest of a scan's content, read in 1 MiB chunks.

    A file: the sha256 of its bytes. A folder (DICOM series): the sha256 over its files in sorted
    relative-path order, each as its relative POSIX path, a NUL, its size (8 bytes) and then its bytes, so
    that renaming, adding or removing a file changes the digest too.
    """
    path = Path(path)
    digest = hashlib.sha256()
    if not path.is_dir():
        _update_from_file(digest, path)
        return digest.hexdigest()
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    for rel, file in files:
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0" + file.stat().st_size.to_bytes(8, "little"))
        _update_from_file(digest, file)
    return digest.hexdigest()


def config_key(run_config: dict[str, Any], *, passport_resolution: str, max_points: int,
               no_passport: bool) -> dict[str, Any]:
    """The configuration part of a run key: ``RunConfig.to_dict()`` without its free-text ``name``, plus
    the 06 options that change the outputs (the passport's resolution and boundary points, or None when
    no passport is written)."""
    cfg = {k: v for k, v in run_config.items() if k != "name"}
    passport = None if no_passport else {"resolution": passport_resolution, "max_points": int(max_points)}
    return {"run_config": cfg, "passport": passport}


def run_key(input_sha256: str, weights_sha256: str, config: dict[str, Any]) -> dict[str, Any]:
    """A run key as plain JSON data (the config is normalised through JSON so that it compares equal to
    one read back from disk)."""
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "input_sha256": str(input_sha256),
            "weights_sha256": str(weights_sha256), "config": json.loads(json.dumps(config))}


def sidecar_path(out_dir: str | Path, scan_id: str) -> Path:
    """Where the run key of the scan with batch id ``scan_id`` (common.imaging.discovery) lives: ``<out_dir>/<id>_run.json``."""
    return Path(out_dir) / f"{scan_id}_run.json"


def write_key(path: str | Path, key: dict[str, Any], **info: Any) -> Path:
    """Write ``key`` (plus informational fields such as the scan's path) atomically to ``path``."""
    return atomic_write_json(path, {**key, **info})


def read_key(path: str | Path) -> dict[str, Any]:
    """Read a run key. Raises FileNotFoundError when absent, ValueError (one line) when unreadable, not a
    run key or another schema version."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} file")
    if obj.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{SCHEMA} version {obj.get('schema_version')!r}, this program writes {SCHEMA_VERSION}")
    if not (isinstance(obj.get("input_sha256"), str) and isinstance(obj.get("weights_sha256"), str)
            and isinstance(obj.get("config"), dict)):
        raise ValueError("lacks input_sha256, weights_sha256 or config")
    return obj


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def config_changes(saved: dict[str, Any], current: dict[str, Any], limit: int = 3) -> list[str]:
    """Settings that differ between two configuration keys, as "a.b: old -> new" (at most ``limit``, then
    "+N more")."""
    old, new = _flatten(saved), _flatten(current)
    changed = [f"{k}: {old[k] if k in old else 'unset'} -> {new[k] if k in new else 'unset'}"
               for k in sorted(set(old) | set(new)) if k not in old or k not in new or old[k] != new[k]]
    return changed[:limit] + ([f"+{len(changed) - limit} more"] if len(changed) > limit else [])


def stale_reasons(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """Why outputs made under run key ``saved`` are stale for ``current`` ([] = up to date).

    Each reason starts with what changed: "input content", "weights" or "configuration"; a missing record
    (None) gives NO_RECORD.
    """
    if saved is None:
        return [NO_RECORD]
    reasons = []
    if saved.get("input_sha256") != current["input_sha256"]:
        reasons.append("input content changed (same name, different sha256)")
    if saved.get("weights_sha256") != current["weights_sha256"]:
        reasons.append(f"weights changed (sha256 {str(saved.get('weights_sha256'))[:12]}… -> "
                       f"{current['weights_sha256'][:12]}…)")
    if saved.get("config") != current["config"]:
        reasons.append("configuration changed (" + ", ".join(config_changes(saved.get("config") or {},
                                                                             current["config"])) + ")")
    return reasons


def recompute_reasons(sidecar: str | Path, current: dict[str, Any], outputs: list[Path]) -> list[str]:
    """Why a scan whose outputs should be ``outputs`` must be (re)computed under run key ``current``:
    missing outputs, a missing or unreadable run record, or stale_reasons(). [] = up to date, skip it."""
    missing = [p.name for p in outputs if not Path(p).exists()]
    if missing:
        return [f"outputs missing ({', '.join(missing)})"]
    try:
        saved = read_key(sidecar)
    except FileNotFoundError:
        saved = None
    except ValueError as exc:
        return [f"unreadable run record {Path(sidecar).name} ({exc})"]
    return stale_reasons(saved, current)
