"""Which model and weights made each registration input, compared between the two: the one rule of
registration/register.py and the batch mode (registration/batch.py, evaluate.py --batch).

A passport written by 06 or ``totalseg-fast --passport`` carries ``model`` = ModelSpec.provenance()
(common/inference/model.py): name (the dataset folder), trainer_plans_config, fold, weights ("standin" or
"official"), sha256 (of the checkpoint), folder and, for stand-ins, a "standin" dict. ``check_inputs`` gives the
record that registration.json and transform.json keep under "provenance":

    {"fixed": INPUT, "moving": INPUT, "mismatches": [MISMATCH, ...], "allow_mixed_weights": bool}
    INPUT    = {"passport": path | null, "passport_sha256": hex | null, "known": bool, "weights", "name",
                "trainer_plans_config", "fold", "sha256", "folder" (each null when not recorded)[, "standin"]}
    MISMATCH = {"field": "weights" | "model" | "sha256" | "provenance", "fixed", "moving", "message": one line}

The rule, and why:

- weights kind differs with a stand-in on one side: refused (InputError naming both files) unless
  ``allow_mixed_weights``; then a "weights" mismatch. A stand-in's labels come from seeded random weights, not
  anatomy, so a transform between them and an official segmentation measures nothing; doing it on purpose
  (e.g. to test the pipeline) must be said, and is recorded.
- model (name, trainer_plans_config or fold) differs: one "model" mismatch, not refused: two real models
  (e.g. total and total_3mm) both segment anatomy, so the registration still means something, but its
  accuracy is that of the mix.
- sha256 differs while the weights kind and the model agree: one "sha256" mismatch (another checkpoint of the
  same model: another download or version, a changed file). Not reported when the weights kind or the model
  already differ: different ones always have different checkpoints, and both sha256 are in the record anyway.
- unknown provenance (no model block, or one without "weights": passports older than the block, synthetic ones,
  label maps in the batch mode): ``known: false``, never refused. Both unknown: no mismatch and no warning;
  there is nothing to compare, and it is the normal case of synthetic and old passports (a warning on every
  such run would teach people to ignore it). Exactly one unknown: one "provenance" mismatch, because a
  stand-in/official mix can hide exactly there: one input is known to come from some model and the other
  cannot be checked against it.

Each mismatch is one line (``message``); the command lines print each once as "warning: ..." on stderr.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common.core.errors import InputError
from common.records.passport import file_sha256
from common.records.passport_model import Passport

MODEL_KEYS = ("name", "trainer_plans_config", "fold")
RECORD_KEYS = ("weights", *MODEL_KEYS, "sha256", "folder")
STANDIN = "standin"


def input_provenance(passport: Any, path: str | Path | None) -> dict[str, Any]:
    """The provenance INPUT record of one registration input: a Passport (its ``model`` block) or plain structures
    (no model: unknown). ``path``: the passport file read (hashed), or None when there is none (a label map)."""
    model = passport.model if isinstance(passport, Passport) else {}
    model = model if isinstance(model, dict) else {}
    file = Path(path) if path is not None else None
    record: dict[str, Any] = {"passport": str(file) if file is not None else None,
                              "passport_sha256": file_sha256(file) if file is not None and file.is_file() else None}
    weights = model.get("weights")
    record["known"] = isinstance(weights, str) and bool(weights)
    record.update({key: model.get(key) for key in RECORD_KEYS})
    if isinstance(model.get(STANDIN), dict):
        record[STANDIN] = model[STANDIN]
    return record


def _model_text(record: dict[str, Any]) -> str:
    return f"{record['name']}/{record['trainer_plans_config']} fold {record['fold']}"


def _short(sha: Any) -> str:
    return str(sha)[:12] if sha else "none"


def _differs(a: Any, b: Any) -> bool:
    """Both recorded and different (a fold of 0 and "0" is the same fold)."""
    return a is not None and b is not None and str(a) != str(b)


def is_mixed(fixed: dict[str, Any], moving: dict[str, Any]) -> bool:
    """True when one input has stand-in weights and the other another (known) weights kind."""
    kinds = {fixed["weights"], moving["weights"]}
    return fixed["known"] and moving["known"] and len(kinds) == 2 and STANDIN in kinds


def compare(fixed: dict[str, Any], moving: dict[str, Any], allow_mixed_weights: bool = False) -> list[dict[str, Any]]:
    """The MISMATCH records between two INPUT records (the rule in the module docstring), at most one per field."""
    fname, mname = fixed["passport"], moving["passport"]
    if not fixed["known"] and not moving["known"]:
        return []
    if not (fixed["known"] and moving["known"]):
        known, unknown = (fixed, moving) if fixed["known"] else (moving, fixed)
        side, other = ("moving", "fixed") if known is fixed else ("fixed", "moving")
        return [{"field": "provenance", "fixed": fixed["weights"], "moving": moving["weights"],
                 "message": f"provenance unknown for the {side} input {unknown['passport'] or '(a label map)'} "
                            f"(no model recorded: an older or synthetic passport), so it cannot be checked against "
                            f"the {other} passport {known['passport']} ({known['weights']} weights, "
                            f"{_model_text(known)})"}]
    out: list[dict[str, Any]] = []
    if _differs(fixed["weights"], moving["weights"]):
        note = " (mixed on purpose: --allow-mixed-weights)" if allow_mixed_weights and is_mixed(fixed, moving) else ""
        out.append({"field": "weights", "fixed": fixed["weights"], "moving": moving["weights"],
                    "message": f"weights differ: fixed {fname} has {fixed['weights']} weights, moving {mname} "
                               f"has {moving['weights']}{note}"})
    if any(_differs(fixed[k], moving[k]) for k in MODEL_KEYS):
        out.append({"field": "model", "fixed": {k: fixed[k] for k in MODEL_KEYS},
                    "moving": {k: moving[k] for k in MODEL_KEYS},
                    "message": f"models differ: fixed {fname} comes from {_model_text(fixed)}, moving {mname} "
                               f"from {_model_text(moving)}"})
    if not out and _differs(fixed["sha256"], moving["sha256"]):
        out.append({"field": "sha256", "fixed": fixed["sha256"], "moving": moving["sha256"],
                    "message": f"checkpoints differ (same model, {fixed['weights']} weights): fixed {fname} sha256 "
                               f"{_short(fixed['sha256'])}..., moving {mname} sha256 {_short(moving['sha256'])}..."})
    return out


def check_inputs(fixed: Any, fixed_path: str | Path | None, moving: Any, moving_path: str | Path | None, *,
                 allow_mixed_weights: bool = False) -> dict[str, Any]:
    """The provenance record of registering ``moving`` onto ``fixed`` (Passports or plain structures, read from
    the files named, or None). Stand-in and official weights mixed without ``allow_mixed_weights``: InputError
    (one line naming both files), raised before any work."""
    f, m = input_provenance(fixed, fixed_path), input_provenance(moving, moving_path)
    if is_mixed(f, m) and not allow_mixed_weights:
        raise InputError(moving_path, f"{m['weights']} weights, but the fixed passport {fixed_path} has "
                                      f"{f['weights']} weights: a stand-in's labels are not anatomy, so the "
                                      "registration would mean nothing; pass --allow-mixed-weights to register "
                                      "them anyway")
    return {"fixed": f, "moving": m, "mismatches": compare(f, m, allow_mixed_weights),
            "allow_mixed_weights": bool(allow_mixed_weights)}


def warning_lines(record: dict[str, Any] | None, prefix: str = "") -> list[str]:
    """One "warning: ..." line per mismatch of a provenance record (``prefix``: e.g. a pair id and ": ")."""
    return [f"warning: {prefix}{m['message']}" for m in (record or {}).get("mismatches", [])]
