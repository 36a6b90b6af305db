"""The Lua scripts, read once from package data and registered per client from one table.

The ``.lua`` files live in the repository's top-level ``lua/`` folder; the wheel ships
them as ``crmcache/lua/`` (hatch ``force-include``). An editable install does not see
that copy, so the loader falls back to the source tree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ._replies import script_contract

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = [
    "SCRIPT_NAMES",
    "RegisteredScript",
    "ScriptLike",
    "Scripts",
    "load_script_source",
    "register_scripts",
]

#: Every script crmcache runs; each is ``lua/<name>.lua``.
SCRIPT_NAMES = (
    "delete_if_equals",
    "prefs_invalidate",
    "prefs_set",
    "rate_limit",
    "rate_limits",
)

_SOURCE_TREE_LUA = Path(__file__).resolve().parents[2] / "lua"


@cache
def load_script_source(name: str) -> str:
    """Return the source of ``lua/<name>.lua``.

    Raises:
        FileNotFoundError: the script is neither in the installed package nor in the
            source tree (a broken install).
    """
    if name not in SCRIPT_NAMES:
        raise ValueError(f"unknown script {name!r}")
    packaged = resources.files("crmcache").joinpath("lua", f"{name}.lua")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    fallback = _SOURCE_TREE_LUA / f"{name}.lua"
    if fallback.is_file():
        return fallback.read_text(encoding="utf-8")
    raise FileNotFoundError(
        f"Lua script {name}.lua is missing from the crmcache package and from {fallback}"
    )


class ScriptLike(Protocol):
    """What the pools need of a registered script."""

    @property
    def sha(self) -> str:
        """The script's SHA1, as EVALSHA wants it."""
        ...

    @property
    def script(self) -> str | bytes:
        """The source, for SCRIPT LOAD after NOSCRIPT."""
        ...

    @property
    def check(self) -> Callable[[object, Sequence[Any]], bool]:
        """The reply's contract (``crmcache._replies``), from the script's header."""
        ...


@dataclass(frozen=True, slots=True)
class RegisteredScript:
    """One script as redis-py registered it, with its name and reply contract."""

    name: str
    sha: str
    script: str | bytes
    check: Callable[[object, Sequence[Any]], bool]


@dataclass(frozen=True, slots=True)
class Scripts:
    """The registered scripts of one client. Calling one runs EVALSHA, and on NOSCRIPT
    (after a restart or ``SCRIPT FLUSH``) redis-py loads it again by itself."""

    delete_if_equals: ScriptLike
    prefs_invalidate: ScriptLike
    prefs_set: ScriptLike
    rate_limit: ScriptLike
    rate_limits: ScriptLike


def register_scripts(client: redis.Redis | redis.asyncio.Redis) -> Scripts:
    """Register every script on ``client`` (no round trip: SHA is computed locally)."""
    sources = {name: load_script_source(name) for name in SCRIPT_NAMES}
    registered: dict[str, ScriptLike] = {}
    for name, source in sources.items():
        # redis-py's Script and AsyncScript both carry .sha and .script (typed loosely).
        script: Any = client.register_script(source)
        registered[name] = RegisteredScript(name, script.sha, script.script, script_contract(name))
    return Scripts(**registered)
