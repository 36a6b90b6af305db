"""The sync facade: generated from ``crmcache/_async`` by ``scripts/unasync.py``.

Do not edit ``manager.py``, ``pool.py`` or ``repository.py`` here: edit their async
originals and run ``python scripts/unasync.py``. ``primitives.py`` is hand-written.
"""
