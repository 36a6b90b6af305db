"""Every ```python block of README.md runs as written.

Each block runs on its own, in a fresh interpreter whose working directory is a temporary
folder, with ``REDIS_URL`` pointing at the test session's Redis (flushed first) and
``DATABASE_URL`` at a temporary SQLite file, or, for blocks that use ``DATABASE_URL``, also
at the test PostgreSQL (``CRMCACHE_TEST_POSTGRES_URL``) in a schema of its own. The folder
holds the template files the README's examples read (``templates/<channel>/<name>.<ext>``).
A block whose code awaits at the top level runs under ``asyncio.run``, as it would in
``python -m asyncio``. Connections to port 6379 are refused, so a block that ignored
``REDIS_URL`` fails instead of touching someone's Redis.

A block that cannot run on its own (a shell session, a web app) is marked in the README
with ``<!-- readme-test: skip (the reason) -->`` on the line before its fence. A block that
uses names of an API still being built is marked ``<!-- readme-test: requires
(crmcache.Name, ...) -->``: it runs where every name exists and is skipped, saying which
is missing, where one does not.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import pytest
import redis
from sqlalchemy import create_engine, text

from conftest import postgres_url

README = Path(__file__).resolve().parent.parent / "README.md"
_FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
_HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*$")
_SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\s*(?:\((?P<reason>[^)]*)\))?\s*-->\s*$")
_REQUIRES = re.compile(r"^<!--\s*readme-test:\s*requires\s*\((?P<names>[^)]*)\)\s*-->\s*$")

#: Files the examples read, as the README lays them out.
TEMPLATE_FILES = {
    "templates/email/welcome.html": "<h1>Welcome, {{name}}</h1>",
    "templates/email/footer.html": "<p>Unsubscribe</p>",
    "templates/sms/welcome.txt": "Welcome, {{name}}",
}

#: What runs each block: top-level await under asyncio.run; port 6379 refused.
RUNNER = """
import ast, asyncio, inspect, socket, sys

_connect = socket.socket.connect


refused = []


def _refuse_6379(self, address):
    if isinstance(address, tuple) and len(address) >= 2 and address[1] == 6379:
        refused.append(address)
        raise ConnectionRefusedError("README test: port 6379 is off limits; use REDIS_URL")
    return _connect(self, address)


socket.socket.connect = _refuse_6379
path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    code = compile(f.read(), path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
namespace = {"__name__": "__main__"}
if code.co_flags & inspect.CO_COROUTINE:
    asyncio.run(eval(code, namespace))
else:
    exec(code, namespace)
if refused:
    # crmcache degrades instead of raising, so a block that ignored REDIS_URL would pass.
    sys.exit(f"the block connected to port 6379 instead of REDIS_URL: {refused[0]}")
"""


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README."""

    line: int  # of the opening fence, 1-based
    heading: str
    code: str
    skip: str | None  # the reason given by a skip marker, "" for a marker without one
    requires: tuple[str, ...] = ()  # dotted names (module.attribute) the block needs

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"L{self.line}-{slug or 'top'}"

    @property
    def uses_database(self) -> bool:
        return "DATABASE_URL" in self.code


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of ``text``, with their heading and skip marker."""
    blocks: list[Block] = []
    lines = text.splitlines()
    heading = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = _FENCE.match(line)
        if fence is None:
            title = _HEADING.match(line)
            if title:
                heading = title["title"]
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not _FENCE.match(lines[end]):
            end += 1
        if fence["lang"] in ("python", "py"):
            before = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            marker = _SKIP.match(before.strip())
            skip = None if marker is None else (marker["reason"] or "").strip()
            needs = _REQUIRES.match(before.strip())
            requires = () if needs is None else tuple(_names(needs["names"]))
            code = "\n".join(lines[index + 1 : end]) + "\n"
            blocks.append(Block(index + 1, heading, code, skip, requires))
        index = end + 1
    return blocks


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def missing(names: tuple[str, ...]) -> list[str]:
    """Those of the dotted ``names`` (a module, then attributes) that do not exist."""
    return [name for name in names if not _exists(name)]


def _exists(name: str) -> bool:
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))
DATABASE_CASES = [
    pytest.param(block, backend, id=f"{block.id}-{backend}")
    for block in BLOCKS
    for backend in (("sqlite", "postgresql") if block.uses_database else ("sqlite",))
]


def test_the_parser_finds_the_readme_examples() -> None:
    """A sanity check of the extraction itself, so a broken parser cannot pass silently."""
    assert len(BLOCKS) >= 8
    headings = {block.heading for block in BLOCKS}
    assert {"The API by example", "Client preferences", "asyncio"} <= headings
    sample = python_blocks(
        "# T\n```python\nx = 1\n```\n\n<!-- readme-test: skip (a web app) -->\n"
        "```python\napp = 2\n```\n```bash\nls\n```\n"
    )
    assert [(b.line, b.code, b.skip) for b in sample] == [
        (2, "x = 1\n", None),
        (7, "app = 2\n", "a web app"),
    ]
    needing = python_blocks(
        "<!-- readme-test: requires (crmcache.CRMCacheManager, crmcache.NoSuchName) -->\n"
        "```python\ny = 1\n```\n"
    )
    assert [(b.skip, b.requires) for b in needing] == [
        (None, ("crmcache.CRMCacheManager", "crmcache.NoSuchName"))
    ]
    assert missing(needing[0].requires) == ["crmcache.NoSuchName"]
    assert missing(("no_such_module.x", "crmcache._sync.manager.CRMCacheManager.nope")) == [
        "no_such_module.x",
        "crmcache._sync.manager.CRMCacheManager.nope",
    ]
    assert missing(("crmcache._sync.manager.CRMCacheManager.claim_send",)) == []


def test_every_skip_marker_states_its_reason() -> None:
    """``<!-- readme-test: skip -->`` needs a reason in parentheses."""
    assert [block.id for block in BLOCKS if block.skip == ""] == []


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A SQLite file in tmp_path, or the test PostgreSQL restricted to a fresh schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/crm.db"
        return
    url = postgres_url()
    schema = f"readme_{uuid4().hex[:12]}"
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        separator = "&" if "?" in url else "?"
        yield f"{url}{separator}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def _run(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = cwd / f"readme_{block.id}.py"
    script.write_text(block.code, encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-c", RUNNER, str(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(("block", "database_url"), DATABASE_CASES, indirect=["database_url"])
def test_readme_block_runs(
    block: Block, database_url: str, redis_url: str, raw: redis.Redis, tmp_path: Path
) -> None:
    """The block runs to the end, as written, against a real Redis and database."""
    run_example(block, "README.md", database_url, redis_url, tmp_path)


def run_example(
    block: Block, source: str, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Run ``block`` (from the file ``source``) to the end in ``tmp_path`` against the
    Redis at ``redis_url`` and the database at ``database_url``; skip a block its file
    marks, or one whose names this build lacks; fail with its output if it exits non-zero."""
    if block.skip is not None:
        pytest.skip(f"{source} marks this block: {block.skip}")
    absent = missing(block.requires)
    if absent:
        pytest.skip(f"{source} block needs {', '.join(absent)}, not in this build")
    for name, content in TEMPLATE_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content, encoding="utf-8")
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    for name in ("CACHE_TTL", "ENABLE_CACHING"):
        env.pop(name, None)
    completed = _run(block, tmp_path, env)
    if completed.returncode != 0:
        pytest.fail(
            f"{source} line {block.line} ({block.heading}) exited {completed.returncode}:\n"
            f"{block.code}\n--- stderr ---\n{completed.stderr}\n--- stdout ---\n"
            f"{completed.stdout}",
            pytrace=False,
        )
