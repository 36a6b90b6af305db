"""The I/O code of both facades, written once.

``crmcache/_async/`` is the source; ``scripts/unasync.py`` generates every module of
``crmcache/_sync/`` from it except ``primitives.py`` (``python scripts/unasync.py --check``
in CI fails if a twin is stale, missing or left over). ``primitives.py`` is written twice,
by hand: the few concurrency primitives whose sync and async forms differ in more than
``async``/``await``.
"""
