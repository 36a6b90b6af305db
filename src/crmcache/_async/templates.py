"""Message templates: single and batched reads and writes
(``<prefix>:template:<channel>:<name>``, no expiry)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import cast

from .._codec import WRONG_TYPE, CorruptValue, check_template_content, decode_template
from .._guard import FAILED
from .._keys import TemplateRef, template_key_for, template_keys
from .._near import MISSING
from .._pending import PendingKind
from .._stats import Counter, Kind
from ..models import MessageChannel
from .core import AsyncCacheCore

__all__ = ["AsyncTemplatesMixin"]

logger = logging.getLogger("crmcache")


class AsyncTemplatesMixin(AsyncCacheCore):
    """``get_template(s)``, ``set_template(s)``, ``invalidate_template``."""

    async def get_template(self, name: str, channel: MessageChannel | str) -> str | None:
        """Return a cached template's text, or ``None`` on a miss.

        Raises:
            TypeError, ValueError: bad ``name`` or unknown ``channel``.
        """
        key = template_key_for(name, channel, self._max_id, self._template_prefix)
        transport = self._active()
        if transport is None:
            self._stats.miss(Kind.TEMPLATES)
            return None
        near = self._near
        token = 0
        if near is not None:
            if not near.live:
                self._start_listener()
            held = near.get(key)
            if held is not MISSING:
                self._stats.near_hit(Kind.TEMPLATES)
                return cast("str", held)
            token = near.token()
        raw = await self._call("get_template", transport.get_large, key)
        if raw is FAILED:
            self._stats.count(Counter.READS_FAILED)
        content = await self._decode_template(key, raw)
        if near is not None and content is not None:
            near.put(key, content, token)
        return content

    async def get_templates(
        self, templates: Iterable[TemplateRef]
    ) -> dict[TemplateRef, str | None]:
        """Fetch many templates in one round trip (``MGET``).

        Args:
            templates: ``(name, channel)`` pairs; the channel as MessageChannel or str.

        Returns:
            A dict from each requested ``(name, channel)`` pair, as given, to its text or
            ``None`` for a miss. (``MessageChannel`` is a ``str`` enum, so
            ``result["welcome", "email"]`` and ``result["welcome", MessageChannel.EMAIL]``
            find the same entry.)

        Raises:
            TypeError, ValueError: a bad pair, or more than 10,000 of them.
        """
        refs, keys = template_keys(
            templates, self._max_id, self._template_prefix, self._template_keys
        )
        transport = self._active()
        if transport is None or not keys:
            self._stats.miss(Kind.TEMPLATES, len(keys))
            return dict.fromkeys(refs)
        near = self._near
        token = 0
        found: dict[TemplateRef, str | None] = {}
        if near is not None:
            if not near.live:
                self._start_listener()
            token = near.token()
            remote_refs, remote_keys = [], []
            for ref, key in zip(refs, keys, strict=True):
                held = near.get(key)
                if held is MISSING:
                    remote_refs.append(ref)
                    remote_keys.append(key)
                else:
                    found[ref] = held
            self._stats.near_hit(Kind.TEMPLATES, len(found))
            if not remote_keys:
                return found
            refs, keys = remote_refs, remote_keys
        raws = await self._call("get_templates", transport.mget, keys)
        if raws is FAILED:
            self._stats.count(Counter.READS_FAILED)
            self._stats.miss(Kind.TEMPLATES, len(keys))
            return {**found, **dict.fromkeys(refs)}
        # Decoded inline and counted once per batch: per-item calls cost more than the
        # MGET itself on a 50-template batch.
        hits = 0
        for ref, key, raw in zip(refs, keys, cast("list[bytes | None]", raws), strict=True):
            if raw is None:
                found[ref] = None
                continue
            try:
                found[ref] = text = raw.decode("utf-8")
                hits += 1
                if near is not None:
                    near.put(key, text, token)
            except UnicodeDecodeError:
                await self._evict(key, raw, "template is not valid UTF-8")
                found[ref] = None
        self._stats.hit(Kind.TEMPLATES, hits)
        self._stats.miss(Kind.TEMPLATES, len(keys) - hits)
        logger.debug("batched template fetch: %d hits, %d misses", hits, len(keys) - hits)
        return found

    async def _decode_template(self, key: str, raw: object) -> str | None:
        if raw is None or raw is FAILED:
            self._stats.miss(Kind.TEMPLATES)
            logger.debug("cache miss: %s", key)
            return None
        if raw is WRONG_TYPE:
            await self._evict(key, None, "wrong type")
            self._stats.miss(Kind.TEMPLATES)
            return None
        try:
            content = decode_template(raw)  # type: ignore[arg-type]
        except CorruptValue as exc:
            await self._evict(key, raw, str(exc))  # type: ignore[arg-type]
            self._stats.miss(Kind.TEMPLATES)
            return None
        self._stats.hit(Kind.TEMPLATES)
        logger.debug("cache hit: %s", key)
        return content

    async def set_template(self, name: str, channel: MessageChannel | str, content: str) -> bool:
        """Cache a template's text, with no expiry (templates are invalidated by hand).

        Returns:
            True if stored; False if Redis was unavailable (logged, counted) or disabled.

        Raises:
            TypeError: ``content`` is not a str; bad ``name``/``channel``.
            ValueError: ``content`` is larger than ``max_template_bytes``; bad
                ``name``/``channel``.
        """
        key = template_key_for(name, channel, self._max_id, self._template_prefix)
        data = check_template_content(content, self.settings.max_template_bytes)
        transport = self._active()
        if transport is None:
            return False
        self._near_forget(key)
        stored = await self._call("set_template", transport.execute, "SET", key, data)
        self._near_forget(key)
        if stored is FAILED:
            self._stats.count(Counter.WRITES_FAILED)
            return False
        self._stats.count(Counter.WRITES)
        logger.debug("cached %s (%d bytes)", key, len(data))
        return True

    async def set_templates(self, templates: Mapping[TemplateRef, str]) -> bool:
        """Cache many templates in one round trip (``MSET``), with no expiry.

        Returns:
            True if all were stored; False if Redis was unavailable or disabled.

        Raises:
            TypeError, ValueError: as for :meth:`set_template`, for any entry.
        """
        if not isinstance(templates, Mapping):
            raise TypeError(
                f"templates must be a mapping of (name, channel) to content, "
                f"not {type(templates).__name__}"
            )
        refs, keys = template_keys(
            templates.keys(), self._max_id, self._template_prefix, self._template_keys
        )
        limit = self.settings.max_template_bytes
        data = {
            key: check_template_content(templates[ref], limit)
            for ref, key in zip(refs, keys, strict=True)
        }
        if not data:
            return True
        transport = self._active()
        if transport is None:
            return False
        self._near_forget(*data)
        stored = await self._call("set_templates", transport.mset, data)
        self._near_forget(*data)
        if stored is FAILED:
            self._stats.count(Counter.WRITES_FAILED)
            return False
        self._stats.count(Counter.WRITES, len(data))
        return True

    async def invalidate_template(self, name: str, channel: MessageChannel | str) -> bool:
        """Remove a cached template.

        Returns:
            True if Redis processed the delete (whether or not the key existed); False if
            Redis was unavailable (logged at WARNING, counted) or the cache is disabled.
        """
        key = template_key_for(name, channel, self._max_id, self._template_prefix)
        transport = self._active()
        if transport is None:
            return False
        return await self._invalidate(
            "invalidate_template", PendingKind.TEMPLATE, key, None, transport.execute, "DEL", key
        )
