"""The lean data-path pool (generated sync twin of ``crmcache/_async/pool.py``)."""

from __future__ import annotations

from ._guard import POOL_EXHAUSTED
from ._sync.pool import LeanPool
from ._sync.primitives import FairSlots

__all__ = ["POOL_EXHAUSTED", "FairSlots", "LeanPool"]
