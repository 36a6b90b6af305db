"""Templates from files, with the cache in front.

Files are laid out as the spec's example reads them: ``<root>/<channel>/<name>.<ext>``,
e.g. ``templates/email/welcome.html`` or ``templates/sms/otp.txt``. A read checks the
cache, and on a miss reads the file and caches it (templates have no TTL). ``warm()``
loads a whole folder in one batched write.

``FileTemplateSource`` goes with a ``CRMCacheManager``, ``AsyncFileTemplateSource`` (whose
methods are coroutines) with an ``AsyncCRMCacheManager``; each refuses the other's
manager with ``TypeError``.
"""

from __future__ import annotations

from pathlib import Path

from ._async.file_templates import AsyncFileTemplateSource
from ._sync.file_templates import TEMPLATE_EXTENSIONS, FileTemplateSource
from .cache_manager import CRMCacheManager

__all__ = [
    "TEMPLATE_EXTENSIONS",
    "AsyncFileTemplateSource",
    "FileTemplateSource",
    "warm_templates",
]


def warm_templates(cache: CRMCacheManager, directory: str | Path) -> int:
    """Load every ``<directory>/<channel>/<name>.<ext>`` into the cache in one write."""
    return FileTemplateSource(directory, cache).warm()
