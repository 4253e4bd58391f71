"""The one registration pipeline: rigid (Tier 1) -> thin-plate spline (Tier 2) -> Transform.

Used by registration/register.py, the accuracy harness and the batch mode. The Transform maps MOVING world
mm -> FIXED world mm (RAS+), with the displacement grid (fixed frame) when the deformable tier ran.
"""
from __future__ import annotations

from typing import Any

from registration.deformable import DeformableResult, register_deformable, to_transform
from registration.options import DeformableOptions, RigidOptions
from registration.rigid import RigidResult, register_rigid
from registration.structures import Structures
from registration.transform import Transform


class TierError(ValueError):
    """A tier could not be fitted. ``tier``: "rigid" or "deformable"; the original exception (a ValueError,
    np.linalg.LinAlgError included) is ``__cause__`` and gives the message."""

    def __init__(self, tier: str, cause: ValueError):
        super().__init__(str(cause))
        self.tier = tier


def register_passports(fixed: Structures, moving: Structures, rigid: RigidOptions | None = None,
                       deformable: DeformableOptions | None = DeformableOptions(),  # noqa: B008 - frozen
                       meta: dict[str, Any] | None = None
                       ) -> tuple[RigidResult, DeformableResult | None, Transform]:
    """Rigid (+ TPS unless ``deformable`` is None) registration of two passports.

    Returns (rigid result, deformable result or None, combined Transform with ``meta``). A ValueError of a
    tier (no common structure, a singular spline system...) is raised as TierError from it.
    """
    try:
        rigid_result = register_rigid(fixed, moving, rigid or RigidOptions())
    except ValueError as exc:
        raise TierError("rigid", exc) from exc
    defo = None
    if deformable is not None:
        try:
            defo = register_deformable(fixed, moving, rigid_result, deformable)
        except ValueError as exc:
            raise TierError("deformable", exc) from exc
    return rigid_result, defo, to_transform(rigid_result, defo, meta)
