"""The async facade's source of truth.

``manager.py``, ``pool.py`` and ``repository.py`` here are the only hand-written copies of
the I/O code; ``scripts/unasync.py`` generates their sync twins in ``crmcache/_sync/``
(``python scripts/unasync.py --check`` in CI fails if a twin is stale). Only
``primitives.py`` is written twice, by hand: the handful of concurrency primitives whose
sync and async forms differ in more than ``async``/``await``.
"""
