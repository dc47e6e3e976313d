"""Model families, one module each behind the ``ModelOps`` protocol (``base``); this registry names them.

Adding a family is adding its module (its ``ModelOps`` subclass: pipeline class, prompt encoding, denoiser call,
offline random-weight builder, stage split where strategy hybrid applies) and one line here; the planner's
profile of the family lives in the core (``stadi.families``), which a test keeps in step with this registry.
"""

from __future__ import annotations

from typing import Any

from stadi_worker.models.base import ModelOps
from stadi_worker.models.flux import FluxOps
from stadi_worker.models.pixart import PixArtOps
from stadi_worker.models.sd3 import SD3Ops
from stadi_worker.models.sd15 import SD15Ops
from stadi_worker.models.sdxl import SDXLOps

FAMILIES: dict[str, type[ModelOps]] = {ops.family: ops for ops in (SDXLOps, SD15Ops, SD3Ops, PixArtOps, FluxOps)}


def family_ops(family: str) -> type[ModelOps]:
    """The ``ModelOps`` class of ``family``; ValueError names the families this worker runs."""
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"family {family!r} is not supported by this worker; "
                         f"supported: {', '.join(FAMILIES)}") from None


def ops_for(pipe: Any, family: str) -> ModelOps:
    """``family``'s ops bound to a loaded pipeline."""
    return family_ops(family)(pipe)
