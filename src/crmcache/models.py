"""Data models cached by crmcache: client preferences and message channels.

Import path kept from the spec: ``from crmcache.models import ClientPreferences,
MessageChannel``.
"""

from __future__ import annotations

from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
