"""The lean data-path pool (generated sync twin of ``crmcache/_async/pool.py``)."""

from __future__ import annotations

from ._sync.pool import POOL_EXHAUSTED, LeanPool
from ._sync.primitives import FairSlots

__all__ = ["POOL_EXHAUSTED", "FairSlots", "LeanPool"]
