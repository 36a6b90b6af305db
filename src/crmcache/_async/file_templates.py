"""Templates from files, with the cache in front (both facades; see ``crmcache.templates``).

Files are laid out as the spec's example reads them: ``<root>/<channel>/<name>.<ext>``,
e.g. ``templates/email/welcome.html`` or ``templates/sms/otp.txt``. A read checks the
cache, and on a miss reads the file and caches it (templates have no TTL). ``warm()``
loads a whole folder in one batched write. Files are small and local: they are read
directly, also on the async facade.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from .._keys import TemplateRef, check_channel, check_id
from ..models import MessageChannel
from .manager import AsyncCRMCacheManager

__all__ = ["TEMPLATE_EXTENSIONS", "AsyncFileTemplateSource"]

logger = logging.getLogger("crmcache")

#: File extensions tried, in this order, for ``<root>/<channel>/<name>.<ext>``.
TEMPLATE_EXTENSIONS = (".html", ".txt", ".md", ".j2", ".jinja", ".tmpl")


class AsyncFileTemplateSource:
    """Templates read from ``<root>/<channel>/<name>.<ext>``, cached in Redis.

    Args:
        root: the templates folder.
        cache: the cache (an ``AsyncCRMCacheManager``); None reads the files every time.
        extensions: file extensions to try, in order.

    Raises:
        TypeError: ``cache`` is a manager of the other facade (its calls would return
            coroutines where text is expected, or block the event loop).
        ValueError: ``root`` is not a folder.
    """

    def __init__(
        self,
        root: str | Path,
        cache: AsyncCRMCacheManager | None = None,
        *,
        extensions: Iterable[str] = TEMPLATE_EXTENSIONS,
    ) -> None:
        if cache is not None and not isinstance(cache, AsyncCRMCacheManager):
            raise TypeError(
                f"cache: {type(self).__name__} works with {AsyncCRMCacheManager.__name__} "
                f"(the same facade), not {type(cache).__name__}"
            )
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"root must be a folder of templates: {str(root)!r}")
        self.cache = cache
        self.extensions = tuple(extensions)
        self.file_reads = 0
        #: What the last :meth:`warm` left out: ``(path under the root, reason)``.
        self.skipped: list[tuple[str, str]] = []

    @staticmethod
    def _check_name(name: object) -> str:
        checked = check_id("name", name, 256)
        if "/" in checked or "\\" in checked or checked.startswith("."):
            raise ValueError(f"name must be a plain file stem for a file template: {name!r}")
        return checked

    def path_for(self, name: str, channel: MessageChannel | str) -> Path | None:
        """The file holding template ``name`` for ``channel``, or None if there is none.

        When several extensions exist for one name, the first in ``extensions`` wins.

        Raises:
            TypeError, ValueError: a bad ``name`` (also one that would leave the folder,
                such as ``../x``) or an unknown ``channel``.
        """
        folder = self.root / check_channel(channel).value
        checked = self._check_name(name)
        for ext in self.extensions:
            candidate = folder / f"{checked}{ext}"
            if candidate.is_file():
                return candidate
        return None

    def _read(self, name: str, channel: MessageChannel | str) -> str | None:
        path = self.path_for(name, channel)
        if path is None:
            return None
        self.file_reads += 1
        return path.read_text(encoding="utf-8")

    async def get(self, name: str, channel: MessageChannel | str) -> str | None:
        """Template text: from the cache, else from its file (then cached); None if no file.

        Raises:
            TypeError, ValueError: a bad name or channel; ``UnicodeDecodeError`` (a
                ValueError) for a file that is not UTF-8.
        """
        self._check_name(name)
        if self.cache is not None:
            cached = await self.cache.get_template(name, channel)
            if cached is not None:
                return cached
        content = self._read(name, channel)
        if content is not None and self.cache is not None:
            await self._cache_one(name, channel, content)
        return content

    async def get_many(self, templates: Iterable[TemplateRef]) -> dict[TemplateRef, str | None]:
        """Many templates: one batched cache read, files for the misses, one batched write."""
        refs = list(templates)
        if self.cache is None:
            return {ref: self._read(*ref) for ref in refs}
        found = await self.cache.get_templates(refs)
        loaded: dict[TemplateRef, str] = {}
        for ref, content in found.items():
            if content is None:
                text = self._read(*ref)
                if text is not None:
                    loaded[ref] = found[ref] = text
        if loaded:
            await self._cache_many(loaded)
        return found

    async def warm(self) -> int:
        """Load every template file under the root into the cache in one batched write.

        Files are chosen as :meth:`get` chooses them. Everything else is left out and
        listed in :attr:`skipped` with the reason: files outside a channel folder, unknown
        channel folders, nested folders, hidden files, unknown extensions, a file whose
        name another extension already took, names a template cannot have, and files
        that are not UTF-8 (also logged).

        Returns:
            How many templates were written to the cache (0 without a cache, or if Redis
            is away).
        """
        self.skipped = []
        self._survey_root()
        batch: dict[TemplateRef, str] = {}
        for channel in MessageChannel:
            folder = self.root / channel.value
            if folder.is_dir():
                batch.update(self._survey_channel(channel, folder))
        if self.cache is None or not batch:
            return 0
        return await self._cache_many(batch)

    def _survey_root(self) -> None:
        """Note what at the root is not a channel folder."""
        channels = [channel.value for channel in MessageChannel]
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                self._skip(entry, "hidden")
            elif not entry.is_dir():
                self._skip(entry, "not in a channel folder (<channel>/<name>.<ext>)")
            elif entry.name not in channels:
                self._skip(entry, f"unknown channel folder (channels: {', '.join(channels)})")

    def _survey_channel(self, channel: MessageChannel, folder: Path) -> dict[TemplateRef, str]:
        """The templates of one channel folder, read; everything else noted as skipped."""
        stems: dict[str, list[Path]] = {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                self._skip(path, "hidden")
            elif path.is_dir():
                self._skip(path, "nested folder (templates are <channel>/<name>.<ext>)")
            elif path.suffix not in self.extensions:
                self._skip(path, f"not a template file (extensions: {', '.join(self.extensions)})")
            else:
                stems.setdefault(path.stem, []).append(path)
        found: dict[TemplateRef, str] = {}
        for stem, paths in sorted(stems.items()):
            try:
                chosen = self.path_for(stem, channel) or paths[0]
                content = self._read(stem, channel)
            except UnicodeDecodeError as exc:
                logger.warning("template %s/%s skipped: %s", channel.value, stem, exc)
                self._skip(paths[0], f"not UTF-8 text ({exc.reason} at byte {exc.start})")
                continue
            except (TypeError, ValueError) as exc:
                self._skip(paths[0], f"not a template name: {exc}")
                continue
            for other in paths:
                if other != chosen:
                    self._skip(other, f"{chosen.name} has the same name and is used")
            if content is not None:
                found[stem, channel] = content
        return found

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped.append((path.relative_to(self.root).as_posix(), reason))

    async def _cache_one(self, name: str, channel: MessageChannel | str, content: str) -> bool:
        if self.cache is None:
            return False
        try:
            return await self.cache.set_template(name, channel, content)
        except ValueError as exc:  # too large to cache: still served from the file
            logger.warning("template %s/%s not cached: %s", channel, name, exc)
            return False

    async def _cache_many(self, batch: dict[TemplateRef, str]) -> int:
        """Write ``batch`` in one MSET (one by one if some are too large); return how many
        were written."""
        if self.cache is None:
            return 0
        try:
            return len(batch) if await self.cache.set_templates(batch) else 0
        except ValueError as exc:
            logger.warning("templates not cached in one batch (%s); caching one by one", exc)
            stored = 0
            for (name, ch), content in batch.items():
                stored += await self._cache_one(name, ch, content)
            return stored
