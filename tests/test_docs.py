"""The docs site builds with ``mkdocs build --strict``, and its examples run.

Every page named in ``mkdocs.yml``'s nav must exist (and every page under ``docs/`` be in
the nav), the strict build must pass (broken links, anchors and docstrings fail it), and
the API reference must be generated from the docstrings. Every ```python block of the
pages runs as ``tests/test_readme.py`` runs README's: on its own, in a fresh interpreter,
against the test session's Redis and a SQLite (and, where set, PostgreSQL) database, with
the same markers (``<!-- readme-test: skip (reason) -->``, ``<!-- readme-test: requires
(crmcache.Name, ...) -->``) for blocks that cannot run here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from test_readme import (
    README,
    Block,
    python_blocks,
    run_example,
)

# README's database fixture, by the name it is imported as (requested below, indirectly).
from test_readme import database_url as readme_database_url  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
MKDOCS_YML = ROOT / "mkdocs.yml"
DOCS = ROOT / "docs"
_NAV_PAGE = re.compile(r"^\s*-\s*(?:[^:]+:\s*)?(?P<page>[\w./-]+\.md)\s*$")


def nav_pages() -> list[str]:
    """The pages ``mkdocs.yml``'s nav lists, relative to ``docs/``, in order."""
    lines = MKDOCS_YML.read_text(encoding="utf-8").splitlines()
    start = lines.index("nav:")
    pages = []
    for line in lines[start + 1 :]:
        if line and not line.startswith(" "):
            break  # the next top-level key
        found = _NAV_PAGE.match(line)
        if found:
            pages.append(found["page"])
    return pages


PAGES = nav_pages()
BLOCKS = [
    (page, block)
    for page in PAGES
    if (DOCS / page).is_file()
    for block in python_blocks((DOCS / page).read_text(encoding="utf-8"))
]
CASES = [
    pytest.param(block, backend, id=f"{page}-{block.id}-{backend}")
    for page, block in BLOCKS
    for backend in (("sqlite", "postgresql") if block.uses_database else ("sqlite",))
]


def test_every_page_in_the_nav_exists_and_every_page_is_in_the_nav() -> None:
    assert len(PAGES) >= 15, PAGES
    guides = {page for page in PAGES if page.startswith("guides/")}
    assert {
        "guides/preferences.md",
        "guides/templates.md",
        "guides/rate-limits.md",
        "guides/near-cache.md",
        "guides/failure-behaviour.md",
        "guides/deployment.md",
        "guides/cluster-sentinel.md",
        "guides/metrics.md",
    } <= guides
    assert [page for page in PAGES if not (DOCS / page).is_file()] == []
    on_disk = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert sorted(on_disk - set(PAGES)) == []


def test_the_home_page_shows_the_quick_start_commands_as_readme_does() -> None:
    """The two Quick start commands, verbatim (CI checks README's against .ci/run)."""
    readme = README.read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in quick.splitlines() if line.strip()]
    assert len(commands) == 2
    assert all(command.startswith("python3 -m venv .venv") for command in commands)
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for command in commands:
        assert command in index


def test_readme_links_to_the_docs_resolve() -> None:
    """README is the landing page: its relative links name files that exist (the Markdown
    pages, so they render on a code host), with anchors the page has, and every guide is
    linked from it."""
    readme = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\((?!https?://)([^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert len(links) >= 10, links
    assert [path for path, _ in links if not (ROOT / path).is_file()] == []
    for path, anchor in links:
        if anchor and path.endswith(".md"):
            headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", (ROOT / path).read_text("utf-8"), re.M)
            slugs = {
                re.sub(r"[\s-]+", "-", re.sub(r"[^\w\s-]", "", h.replace("`", "").lower())).strip(
                    "-"
                )
                for h in headings
            }
            assert anchor in slugs, (path, anchor)
    linked = {path for path, _ in links}
    guides = {f"docs/{page}" for page in PAGES if page.startswith("guides/")}
    assert sorted(guides - linked) == []


def test_the_docs_examples_are_found_and_skips_give_a_reason() -> None:
    """A broken extraction cannot pass silently; a skip marker must say why."""
    assert len(BLOCKS) >= 12
    assert {"guides/preferences.md", "guides/deployment.md", "index.md"} <= {
        page for page, _ in BLOCKS
    }
    assert [f"{page}:{block.line}" for page, block in BLOCKS if block.skip == ""] == []


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed: pip install -e '.[docs]' (the test extra has it)",
)
def test_mkdocs_build_strict_passes(tmp_path: Path) -> None:
    """``mkdocs build --strict``: any warning (a broken link or anchor, a page missing
    from the nav, a docstring mkdocstrings cannot render) fails the build."""
    site = tmp_path / "site"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
        ),
        "NO_MKDOCS_2_WARNING": "1",
    }
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(MKDOCS_YML),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    for page in PAGES:
        built = site / (
            page.removesuffix(".md") + "/index.html" if page != "index.md" else "index.html"
        )
        assert built.is_file(), page
    # The API reference is generated from the docstrings, inherited mixin methods included.
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for anchor in (
        "crmcache.CRMCacheManager.check_rate_limit",
        "crmcache.AsyncCRMCacheManager.get_client_preferences",
        "crmcache.models.ClientPreferences",
        "crmcache.testing.RedisServer",
        "crmcache.repository.CommunicationRepository",
    ):
        assert f'id="{anchor}"' in api, anchor


@pytest.mark.parametrize(("block", "readme_database_url"), CASES, indirect=["readme_database_url"])
def test_docs_block_runs(
    block: Block,
    readme_database_url: str,  # noqa: F811 - the imported fixture, parametrized
    redis_url: str,
    raw: redis.Redis,
    tmp_path: Path,
) -> None:
    """The block runs to the end, as written, against a real Redis and database."""
    run_example(block, "this docs page", readme_database_url, redis_url, tmp_path)
