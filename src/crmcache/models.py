"""Data models cached by crmcache: client preferences and message channels.

Import path kept from the spec: ``from crmcache.models import ClientPreferences,
MessageChannel``.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ._sendtime import check_when, next_sendable, sendable

__all__ = ["MAX_VERSION", "ClientPreferences", "LeaseState", "MessageChannel", "SendClaim"]

#: Versions are compared inside Lua, whose numbers are doubles: keep them exact.
MAX_VERSION = 2**53 - 1


class MessageChannel(StrEnum):
    """A channel a message can be sent over. The value is what appears in cache keys."""

    EMAIL = "email"
    SMS = "sms"
    WHATSAPP = "whatsapp"


class LeaseState(StrEnum):
    """Outcome of ``acquire_load_lease``: load and release, wait for the holder, or just
    load (no cache to coordinate through)."""

    ACQUIRED = "acquired"
    BUSY = "busy"
    UNAVAILABLE = "unavailable"


class SendClaim(StrEnum):
    """Outcome of ``try_claim_send``: this caller won the claim (send), another caller
    claimed the key first (a duplicate: do not send), or Redis could not be asked (the
    caller decides; ``claim_send`` answers by ``send_guard_policy``)."""

    CLAIMED = "claimed"
    DUPLICATE = "duplicate"
    UNAVAILABLE = "unavailable"


class ClientPreferences(BaseModel):
    """How and when a client wants to be contacted.

    Only ``client_id`` is required. ``version`` is the database row's version: it grows by
    at least one with every saved change, and the cache uses it to refuse stale writes.

    Quiet hours are whole hours of the client's wall clock (``timezone``), the half-open
    span ``[quiet_hours_start:00, quiet_hours_end:00)``; a start after the end spans
    midnight; equal hours, or either one None, mean none. :meth:`can_send_at` and
    :meth:`next_send_time` apply them (and ``opt_out``), DST included.
    """

    model_config = ConfigDict(validate_assignment=True, extra="ignore")

    client_id: str = Field(min_length=1, max_length=256)
    preferred_channels: list[MessageChannel] = Field(
        default_factory=lambda: [MessageChannel.EMAIL]
    )
    timezone: str = Field(default="UTC", max_length=64)
    #: A BCP 47 language tag; 35 characters hold every registered tag.
    language: str = Field(default="en", min_length=1, max_length=35)
    opt_out: bool = False
    quiet_hours_start: int | None = Field(default=None, ge=0, le=23)
    quiet_hours_end: int | None = Field(default=None, ge=0, le=23)
    version: int = Field(default=0, ge=0, le=MAX_VERSION)

    @property
    def preferred_channel(self) -> MessageChannel:
        """The first preferred channel (email when the list is empty)."""
        return self.preferred_channels[0] if self.preferred_channels else MessageChannel.EMAIL

    def can_send_at(self, when: datetime) -> bool:
        """True if a message may go to this client at the instant ``when``: not opted out,
        and ``when`` is outside the quiet hours on the client's wall clock.

        Pure (no I/O). The instant is judged by the local hour it shows in ``timezone``:
        an hour a DST change skips is never quiet, an hour it repeats is quiet both times.

        Args:
            when: an aware ``datetime`` (any time zone).

        Raises:
            TypeError: ``when`` is not a ``datetime``, or is naive (it names no instant).
        """
        when = check_when(when)
        if self.opt_out:
            return False
        return sendable(when, self._zone(), self.quiet_hours_start, self.quiet_hours_end)

    def next_send_time(self, when: datetime) -> datetime | None:
        """The earliest instant at or after ``when`` at which :meth:`can_send_at` is True,
        as an aware ``datetime`` in UTC; None if the client opted out (no instant ever is).

        ``when`` itself (in UTC) if it is outside the quiet hours; else the end of the
        quiet hours: the first instant the client's wall clock shows ``quiet_hours_end``,
        or, when a DST change skips that time, the instant of the change. Nothing in
        between is sendable. UTC, because comparing two datetimes of one ``ZoneInfo``
        ignores the DST fold; ``.astimezone(ZoneInfo(prefs.timezone))`` shows it as the
        client sees it. Pure (no I/O).

        Raises:
            TypeError: ``when`` is not a ``datetime``, or is naive.
        """
        when = check_when(when)
        if self.opt_out:
            return None
        return next_sendable(when, self._zone(), self.quiet_hours_start, self.quiet_hours_end)

    def _zone(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            # Only a model built without validation (model_construct) gets here.
            raise ValueError(
                f"timezone must be an IANA zone name, got {self.timezone!r}"
            ) from None

    @field_validator("preferred_channels")
    @classmethod
    def _distinct_channels(cls, value: list[MessageChannel]) -> list[MessageChannel]:
        # Order is preference; a repeat adds nothing (and would not fit the database column).
        return list(dict.fromkeys(value))

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone must be an IANA zone name, got {value!r}") from None
        return value
