"""The docs site builds strictly, lists every page, and documents every public name; README and CHANGELOG.

The site: `bash .ci/venv python -m mkdocs build --strict -f docs/mkdocs.yml` (mkdocs-material +
mkdocstrings, the `docs` extra).
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import replace_wrap

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG = DOCS / "mkdocs.yml"
API_NAMES = sorted(n for n in replace_wrap.__all__ if n != "__version__")
needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs / mkdocstrings not installed (pip install '.[docs]')",
)


def nav_pages() -> list[str]:
    from mkdocs.config import load_config

    def walk(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                yield from walk(value)
            else:
                yield value

    return list(walk(load_config(config_file=str(CONFIG)).nav))


@needs_mkdocs
def test_docs_build_strictly_and_render_every_public_name(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(CONFIG), "-d", str(site)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,  # any cwd: paths are relative to the config
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in nav_pages():
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.exists(), page
    api = (site / "api" / "index.html").read_text()
    missing = [n for n in API_NAMES if f'id="replace_wrap.{n}"' not in api]
    assert not missing, f"not rendered in the API reference: {missing}"
    assert not (site / "mkdocs.yml").exists() and not (site / "_hooks.py").exists()
    # Documented examples are the real files: the snippets were included, not left as markers.
    quickstart = html.unescape(re.sub(r"<[^>]+>", "", (site / "quickstart" / "index.html").read_text()))
    assert "--8<--" not in quickstart
    assert "replace_wrap.convert(model, every=args.every)" in quickstart  # from examples/timm_train_loop.py
    assert "trainable parameters" in quickstart and "peak RSS (process)" in quickstart  # the demo's table


def test_every_public_name_is_in_the_api_reference():
    api = (DOCS / "api.md").read_text()
    missing = [n for n in API_NAMES if not re.search(rf"^::: replace_wrap\.{n}$", api, re.MULTILINE)]
    assert not missing, f"add '::: replace_wrap.<name>' to docs/api.md for {missing}"
    assert "__version__" in api


@needs_mkdocs
def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    pages = nav_pages()
    files = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(set(pages)) == sorted(pages), "a page is listed twice in the nav"
    assert [f for f in files if f not in pages] == [], "docs/*.md missing from the nav in docs/mkdocs.yml"
    assert [p for p in pages if p not in files] == [], "nav entries without a docs/*.md file"


def test_snippets_point_at_existing_sections():
    for page in DOCS.glob("*.md"):
        for target in re.findall(r'--8<-- "([^"]+)"', page.read_text()):
            path, _, section = target.partition(":")
            assert (ROOT / path).exists(), f"{page.name}: {path} does not exist"
            if section:
                text = (ROOT / path).read_text()
                assert f"--8<-- [start:{section}]" in text and f"--8<-- [end:{section}]" in text, (
                    page.name,
                    target,
                )


def test_readme_starts_with_the_demo_and_the_test_command():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0] == "```bash"
    assert lines[1].startswith("bash .ci/venv python -m replace_wrap demo ")
    assert lines[2].startswith("bash .ci/venv python -m pytest ")


def test_changelog_and_version_tell_what_changed():
    from packaging.version import Version

    version = Version(replace_wrap.__version__)  # PEP 440, else this raises
    changelog = (ROOT / "CHANGELOG.md").read_text()
    sections = re.findall(r"^## \[([^\]]+)\]", changelog, re.MULTILINE)
    assert sections, "CHANGELOG.md has no '## [version]' section"
    # A development version has its changes under [Unreleased]; a release has its own section.
    expected = "Unreleased" if version.is_devrelease or version.is_prerelease else str(version)
    assert sections[0] == expected
    first = changelog.split("## [", 2)[1]
    assert re.search(r"^### (Added|Changed|Fixed|Removed|Deprecated|Security)$", first, re.MULTILINE)
