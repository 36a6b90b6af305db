"""The database behind the cache: the ``PreferenceStore`` protocol and a SQL implementation.

``CommunicationRepository(db_manager=...)`` takes any object with the two methods of
:class:`PreferenceStore`. :class:`SQLPreferenceStore` is the shipped one, on SQLAlchemy 2
Core: SQLite (a file, or ``:memory:``, the embedded default) and PostgreSQL (psycopg 3).
It creates its table if missing.

Versions give optimistic concurrency: a row starts at version 1 and every save adds one.
A save names the version it was based on; if the row has moved on since, the save fails
with :class:`~crmcache.StaleVersionError` instead of overwriting someone else's change.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import orjson
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    MetaData,
    SmallInteger,
    String,
    Table,
    create_engine,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

from ._config import mask_url
from ._errors import ConfigurationError, StaleVersionError
from .models import ClientPreferences, MessageChannel

__all__ = [
    "DEFAULT_TABLE",
    "AsyncPreferenceStore",
    "PreferenceStore",
    "SQLPreferenceStore",
    "ThreadedAsyncStore",
]

DEFAULT_TABLE = "crm_client_preferences"


@runtime_checkable
class PreferenceStore(Protocol):
    """What ``CommunicationRepository`` needs from its ``db_manager``."""

    def load_preferences(self, client_id: str) -> ClientPreferences | None:
        """Return the client's row, or None if there is none."""
        ...

    def save_preferences(self, preferences: ClientPreferences) -> ClientPreferences:
        """Save ``preferences``, based on the row at ``preferences.version``.

        ``version == 0`` creates the row. Returns the saved row with its new version.

        Raises:
            StaleVersionError: the row is no longer at ``preferences.version``.
        """
        ...


@runtime_checkable
class AsyncPreferenceStore(Protocol):
    """What ``AsyncCommunicationRepository`` needs from its ``db_manager``: the same two
    methods as :class:`PreferenceStore`, awaitable."""

    async def load_preferences(self, client_id: str) -> ClientPreferences | None:
        """Return the client's row, or None if there is none."""
        ...

    async def save_preferences(self, preferences: ClientPreferences) -> ClientPreferences:
        """Save ``preferences`` (see :meth:`PreferenceStore.save_preferences`)."""
        ...


class ThreadedAsyncStore:
    """An :class:`AsyncPreferenceStore` over a blocking store, which runs in a thread.

    ``AsyncCommunicationRepository(db_manager=ThreadedAsyncStore(SQLPreferenceStore(url)))``
    keeps the event loop free while SQLAlchemy's blocking driver works.
    """

    def __init__(self, store: PreferenceStore) -> None:
        self.store = store

    async def load_preferences(self, client_id: str) -> ClientPreferences | None:
        """Load in a worker thread."""
        return await asyncio.to_thread(self.store.load_preferences, client_id)

    async def save_preferences(self, preferences: ClientPreferences) -> ClientPreferences:
        """Save in a worker thread."""
        return await asyncio.to_thread(self.store.save_preferences, preferences)


def _engine_url(url: str) -> str:
    """Use psycopg 3 for a bare ``postgresql://`` URL (SQLAlchemy would pick psycopg2)."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class SQLPreferenceStore:
    """Client preferences in a SQL table (SQLite or PostgreSQL), with versioned saves.

    Args:
        url: a SQLAlchemy URL; ``postgresql://`` means psycopg 3. Default: an in-memory
            SQLite database shared by all threads of this process.
        table_name: the table to use (created if missing).
        engine: an engine of your own, instead of ``url``.

    Raises:
        ConfigurationError: ``url`` cannot be parsed or names no known driver.
    """

    def __init__(
        self,
        url: str = "sqlite:///:memory:",
        *,
        table_name: str = DEFAULT_TABLE,
        engine: Engine | None = None,
    ) -> None:
        if engine is None:
            engine = self._make_engine(url)
        self.engine = engine
        self.table = Table(
            table_name,
            MetaData(),
            Column("client_id", String(256), primary_key=True),
            Column("preferred_channels", String(200), nullable=False),
            Column("timezone", String(64), nullable=False),
            Column("language", String(35), nullable=False),
            Column("opt_out", Boolean, nullable=False),
            Column("quiet_hours_start", SmallInteger, nullable=True),
            Column("quiet_hours_end", SmallInteger, nullable=True),
            Column("version", BigInteger, nullable=False),
            Column("updated_at", DateTime(timezone=True), nullable=False),
        )
        self.table.metadata.create_all(self.engine, checkfirst=True)
        self._lock = threading.Lock()
        # SQLite connections must not be used by two threads at once, and concurrent
        # writers get "database is locked": serialize in-process. PostgreSQL runs free.
        is_sqlite = self.engine.dialect.name == "sqlite"
        self._serial: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if is_sqlite else contextlib.nullcontext()
        )
        self.loads = 0
        self.saves = 0

    @staticmethod
    def _make_engine(url: str) -> Engine:
        try:
            parsed = make_url(_engine_url(url))
            if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
                # One connection shared by every thread, or each would see its own empty db.
                return create_engine(
                    parsed, poolclass=StaticPool, connect_args={"check_same_thread": False}
                )
            if parsed.get_backend_name() == "sqlite":
                return create_engine(parsed, connect_args={"check_same_thread": False})
            return create_engine(parsed, pool_pre_ping=True)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises several unrelated types
            raise ConfigurationError(
                f"db url {mask_url(url)!r} is not usable: {type(exc).__name__}"
            ) from None

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"<SQLPreferenceStore {url} table={self.table.name}>"

    def close(self) -> None:
        """Close the engine's pooled connections."""
        self.engine.dispose()

    # -- rows <-> models ------------------------------------------------------------------

    @staticmethod
    def _row_values(prefs: ClientPreferences, version: int) -> dict[str, Any]:
        return {
            "client_id": prefs.client_id,
            "preferred_channels": orjson.dumps(
                [c.value for c in prefs.preferred_channels]
            ).decode(),
            "timezone": prefs.timezone,
            "language": prefs.language,
            "opt_out": prefs.opt_out,
            "quiet_hours_start": prefs.quiet_hours_start,
            "quiet_hours_end": prefs.quiet_hours_end,
            "version": version,
            "updated_at": datetime.now(UTC),
        }

    @staticmethod
    def _model(row: Any) -> ClientPreferences:  # noqa: ANN401 - a SQLAlchemy Row
        return ClientPreferences(
            client_id=row.client_id,
            preferred_channels=[MessageChannel(c) for c in orjson.loads(row.preferred_channels)],
            timezone=row.timezone,
            language=row.language,
            opt_out=row.opt_out,
            quiet_hours_start=row.quiet_hours_start,
            quiet_hours_end=row.quiet_hours_end,
            version=row.version,
        )

    # -- the protocol ---------------------------------------------------------------------

    def load_preferences(self, client_id: str) -> ClientPreferences | None:
        """Return the client's row, or None."""
        with self._lock:
            self.loads += 1
        return self._select(client_id)

    def _select(self, client_id: str) -> ClientPreferences | None:
        with self._serial, self.engine.connect() as conn:
            row = conn.execute(
                select(self.table).where(self.table.c.client_id == client_id)
            ).first()
        return None if row is None else self._model(row)

    def save_preferences(self, preferences: ClientPreferences) -> ClientPreferences:
        """Save ``preferences`` if the row is still at ``preferences.version``.

        Returns:
            The saved row, its version one higher.

        Raises:
            StaleVersionError: someone saved the row since it was read (or, for version 0,
                the row already exists).
        """
        if not isinstance(preferences, ClientPreferences):
            raise TypeError(
                f"preferences must be ClientPreferences, not {type(preferences).__name__}"
            )
        based_on = preferences.version
        values = self._row_values(preferences, based_on + 1)
        t = self.table
        with self._serial, self.engine.connect() as conn:
            if based_on == 0:
                try:
                    conn.execute(insert(t).values(values))
                    saved = True
                except IntegrityError:
                    saved = False
            else:
                result = conn.execute(
                    update(t)
                    .where(t.c.client_id == preferences.client_id, t.c.version == based_on)
                    .values(values)
                )
                saved = result.rowcount == 1
            if saved:
                conn.commit()
            else:
                conn.rollback()
        if not saved:
            self._raise_stale(preferences)
        with self._lock:
            self.saves += 1
        return preferences.model_copy(update={"version": based_on + 1})

    def _raise_stale(self, preferences: ClientPreferences) -> None:
        current = self._select(preferences.client_id)  # not a load the caller asked for
        actual = None if current is None else current.version
        raise StaleVersionError(
            f"preferences of {preferences.client_id!r} were saved at version {actual} since "
            f"version {preferences.version} was read; reload and apply the change again",
            expected=preferences.version,
            actual=actual,
        )

    # -- bulk helpers (not part of the protocol) ------------------------------------------

    def insert_many(self, rows: Iterable[ClientPreferences]) -> int:
        """Insert new rows at version 1 in one transaction; returns how many."""
        values = [self._row_values(p, 1) for p in rows]
        if not values:
            return 0
        with self._serial, self.engine.begin() as conn:
            conn.execute(insert(self.table), values)
        return len(values)

    def drop_table(self) -> None:
        """Drop the table (tests and demos clean up with it)."""
        self.table.drop(self.engine, checkfirst=True)
