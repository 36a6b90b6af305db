"""Send guards: one claim per message (``<prefix>:send:<idempotency_key>``), so a retried
message is never sent twice.

A claim is one atomic ``SET key <token> NX PX <ttl>``: the first caller wins, every later
one (a retry, a redelivery, another worker) is refused until the claim expires. The value
is this manager's token (random, made with the manager), so ``release_send`` deletes a
claim only if this manager made it (``lua/delete_if_equals.lua``: compare and delete in
one step): a claim that expired and was taken by another process is never released by
the first one.
"""

from __future__ import annotations

import logging

from .._config import SendGuardPolicy, check_send_guard_policy
from .._guard import FAILED
from .._keys import check_id
from .._stats import Counter
from .._validate import ttl_ms
from ..models import SendClaim
from .core import AsyncCacheCore

__all__ = ["DEFAULT_SEND_CLAIM_TTL", "AsyncSendGuardsMixin"]

logger = logging.getLogger("crmcache")

#: Seconds a send claim lives by default: retries of one message within a day are refused.
DEFAULT_SEND_CLAIM_TTL = 86400


class AsyncSendGuardsMixin(AsyncCacheCore):
    """``claim_send``, ``try_claim_send``, ``release_send``."""

    async def try_claim_send(
        self, idempotency_key: str, ttl: int = DEFAULT_SEND_CLAIM_TTL
    ) -> SendClaim:
        """Claim the right to send the message named ``idempotency_key``, saying exactly
        what happened.

        Args:
            idempotency_key: names the message, the same on every retry of it (e.g.
                ``"campaign-7:client-123:step-2"``); key ``<prefix>:send:<idempotency_key>``.
            ttl: whole seconds the claim lives (> 0, at most ten years): the horizon
                within which retries are refused. Default one day.

        Returns:
            ``SendClaim.CLAIMED``: this caller won, send (and ``release_send`` if the send
            fails); ``SendClaim.DUPLICATE``: someone claimed it first, do not send;
            ``SendClaim.UNAVAILABLE``: Redis could not be asked (down, the breaker
            open, the cache disabled or closed): counted, logged, the caller decides
            (requeue, or send at the risk of a duplicate).

        Raises:
            TypeError, ValueError: bad ``idempotency_key`` or ``ttl`` (the error names it).
        """
        claim = await self._claim(idempotency_key, ttl)
        if claim is SendClaim.UNAVAILABLE:
            self._log_degraded("the caller was told UNAVAILABLE")
        return claim

    async def claim_send(
        self,
        idempotency_key: str,
        ttl: int = DEFAULT_SEND_CLAIM_TTL,
        *,
        policy: SendGuardPolicy | None = None,
    ) -> bool:
        """Claim the right to send the message named ``idempotency_key``: True for the
        first claim (send it), False for every later one until the claim expires (a
        retry of a message already claimed: do not send).

        One atomic ``SET <prefix>:send:<idempotency_key> <token> NX PX <ttl>``.

        Args:
            idempotency_key: names the message, the same on every retry of it.
            ttl: whole seconds the claim lives (> 0, at most ten years); default one day.
            policy: what to answer when Redis cannot be asked: ``"open"`` True (send; a
                duplicate is possible), ``"closed"`` False (do not send; the message is
                dropped like a duplicate); default ``send_guard_policy`` (``"open"``).
                Either way the answer is counted (``send_claims_degraded``) and logged
                (at most once per 30 s); :meth:`try_claim_send` tells it apart.

        Raises:
            TypeError, ValueError: bad ``idempotency_key``, ``ttl`` or ``policy``.
        """
        chosen = (
            self.settings.send_guard_policy
            if policy is None
            else check_send_guard_policy(policy, "policy")
        )
        claim = await self._claim(idempotency_key, ttl)
        if claim is SendClaim.CLAIMED:
            return True
        if claim is SendClaim.DUPLICATE:
            return False
        if chosen == "open":
            self._log_degraded(
                "answered True by send_guard_policy 'open': a retried message may be sent twice"
            )
            return True
        self._log_degraded(
            "answered False by send_guard_policy 'closed': messages are dropped as if they "
            "were duplicates"
        )
        return False

    async def release_send(self, idempotency_key: str) -> bool:
        """Give up a claim whose send failed, so a retry of the message may claim it.

        Deletes the claim only if this manager made it (compare and delete in one step):
        a claim that expired and was taken by another process, or one another process
        made, is left alone. Call it only after a claim you won: tasks and threads of one
        manager share its token.

        Returns:
            True if the claim was deleted; False if it was not this manager's, had
            expired, or Redis could not be asked (the claim then lives out its ``ttl``
            and retries meanwhile are refused as duplicates).

        Raises:
            TypeError, ValueError: bad ``idempotency_key``.
        """
        key = self._keys.send_key(check_id("idempotency_key", idempotency_key, self._max_id))
        transport = self._active()
        if transport is None:
            return False
        reply = await self._call(
            "release_send",
            transport.evalsha,
            transport.scripts.delete_if_equals,
            [key],
            ["value", self._send_token],
        )
        if reply is FAILED or reply != 1:
            return False
        self._stats.count(Counter.SEND_CLAIMS_RELEASED)
        return True

    async def _claim(self, idempotency_key: str, ttl: int) -> SendClaim:
        """One ``SET NX PX``, counted by its outcome."""
        key = self._keys.send_key(check_id("idempotency_key", idempotency_key, self._max_id))
        claim_ms = ttl_ms("ttl", ttl)
        transport = self._active()
        if transport is not None:
            reply = await self._call(
                "claim_send",
                transport.execute,
                "SET",
                key,
                self._send_token,
                "NX",
                "PX",
                claim_ms,
            )
            if reply is not FAILED:
                # SET NX answers OK when it set the key, nil when the key exists.
                if reply:
                    self._stats.count(Counter.SEND_CLAIMS_WON)
                    return SendClaim.CLAIMED
                self._stats.count(Counter.SEND_CLAIMS_REFUSED)
                return SendClaim.DUPLICATE
        self._stats.count(Counter.SEND_CLAIMS_DEGRADED)
        return SendClaim.UNAVAILABLE

    def _log_degraded(self, answer: str) -> None:
        """Log a claim answered without Redis, at most once per 30 s (the count of those
        held back goes with the next line)."""
        suppressed = self._send_guard_log.ready()
        if suppressed is not None:
            reason = "Redis could not be asked" if self.enabled else "the cache is off"
            logger.warning(
                "claim_send without Redis (%s): %s (%d more not logged)",
                reason,
                answer,
                suppressed,
            )
